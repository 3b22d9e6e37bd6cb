"""The project as others get it: a wheel and an sdist built by ``python -m build``, a bundle zip downloaded with
``monai.bundle download``, and the main job run from outside the repository with neither the checkout nor an
editable install on the path."""

import glob
import json
import os
import sys
import tarfile
import zipfile

import pytest
import torch

from monai.networks.nets import BasicUNet

from conftest import REPO, TINY_UNET, child_venv, run_command

sys.path.insert(0, os.path.join(REPO, "tools"))
from package_bundle import package  # noqa: E402

# its module fixtures are built once: every test of the file in one pytest-xdist process
pytestmark = pytest.mark.xdist_group("test_packaging")

MAIN_BUNDLE = "hybridmim_unet_pretrain"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = run_command([sys.executable, "-m", "build", "--outdir", str(out), REPO], cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_build_makes_a_wheel_and_an_sdist_with_the_schemas(dist):
    (wheel,) = glob.glob(str(dist / "*.whl"))
    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hybridmim_components/schemas/bundle_metadata_schema.json" in names
    assert "hybridmim_components/input_checks.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Python: >=3.10" in metadata and "Requires-Dist: monai<1.7,>=1.6" in metadata
    assert any(n.endswith("/setup.cfg") for n in tarfile.open(sdist).getnames())


@pytest.mark.slow
def test_zip_downloads_with_monai_and_runs_from_the_installed_wheel(dist, tiny_ct_phantoms, tmp_path):
    archive = package(os.path.join(REPO, "bundles", MAIN_BUNDLE), output_dir=str(tmp_path / "zips"))
    assert not any(n.startswith(f"{MAIN_BUNDLE}/data/") for n in zipfile.ZipFile(archive).namelist())

    python = child_venv(str(tmp_path / "venv"), parent_pth_files=False)  # no editable install of the checkout
    (wheel,) = glob.glob(str(dist / "*.whl"))
    proc = run_command([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = run_command([python, "-c", "import hybridmim_components; print(hybridmim_components.__file__)"],
                        cwd=str(tmp_path))
    assert str(tmp_path / "venv") in where.stdout, where.stdout + where.stderr  # the wheel, not the checkout

    downloads = tmp_path / "downloads"
    proc = run_command([python, "-m", "monai.bundle", "download", "--name", MAIN_BUNDLE,
                        "--url", f"file://{archive}", "--bundle_dir", str(downloads)], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = downloads / MAIN_BUNDLE
    assert json.load(open(root / "configs" / "metadata.json"))["version"]

    proc = run_command(
        [python, "-m", "monai.bundle", "run", "training", "--config_file", str(root / "configs" / "train.json"),
         "--bundle_root", str(root), "--dataset_dir", tiny_ct_phantoms, "--features", TINY_UNET,
         "--roi_size", "[32,32,32]", "--reconstruction_roi", "[16,16,16]", "--sub_volume_size", "16",
         "--patch_size", "8", "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1",
         "--num_workers", "0"],
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=json.loads(TINY_UNET)).load_state_dict(
        torch.load(root / "models" / "model.pt", weights_only=True), strict=True
    )
