"""The project as others get it: a wheel and an sdist built by ``python -m build``, a bundle zip downloaded with
``monai.bundle download``, and the main job run from outside the repository with neither the checkout nor an
editable install on the path."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from monai.networks.nets import BasicUNet

from conftest import REPO, TINY_UNET, child_venv, load_tool, run_command

from hybridmim_studies.packaging import package

verify_bundles = load_tool("verify_bundles")

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


def unpack(archive: str, where) -> str:
    zipfile.ZipFile(archive).extractall(where)
    (top,) = {name.split("/")[0] for name in zipfile.ZipFile(archive).namelist()}
    return os.path.join(str(where), top)


@pytest.mark.parametrize("bundle", sorted(os.listdir(os.path.join(REPO, "bundles"))))
def test_every_zip_carries_the_package_it_was_made_with(bundle, tmp_path):
    import hybridmim_components
    from hybridmim_studies.packaging import IMPORT_PACKAGE, IMPORT_SCRIPTS, package_files, vendored_differences

    root = unpack(package(os.path.join(REPO, "bundles", bundle), output_dir=str(tmp_path)), tmp_path / "unpacked")
    vendored = json.load(open(os.path.join(root, "scripts", "vendored.json")))
    assert vendored["version"] == hybridmim_components.__version__ and vendored["files"] == package_files()
    assert vendored_differences(root) == []
    for name in os.listdir(os.path.join(REPO, "bundles", bundle, "configs")):
        if not name.endswith(".json"):
            continue
        ours, shipped = (json.load(open(os.path.join(r, "configs", name))) for r in (os.path.join(REPO, "bundles", bundle), root))
        if IMPORT_PACKAGE in ours.get("imports", []):  # scripts first, then the package; nothing else changed
            at = shipped["imports"].index(IMPORT_SCRIPTS)
            assert shipped["imports"][at + 1] == IMPORT_PACKAGE
            shipped["imports"].remove(IMPORT_SCRIPTS)
        assert shipped == ours, name


def test_a_vendored_copy_that_differs_from_the_package_of_its_version_is_found(tmp_path):
    from hybridmim_studies.packaging import vendored_differences

    root = unpack(package(os.path.join(REPO, "bundles", "msd_spleen_segmentation"), output_dir=str(tmp_path)), tmp_path / "u")
    target = os.path.join(root, "scripts", "hybridmim_components", "losses.py")
    with open(target, "a") as f:
        f.write("# edited after packaging\n")
    assert any("losses.py: its content is not the hash" in p for p in vendored_differences(root))
    # recorded consistently, but not the code of that version: still found
    vendored_file = os.path.join(root, "scripts", "vendored.json")
    vendored = json.load(open(vendored_file))
    vendored["files"]["hybridmim_components/losses.py"] = hashlib.sha256(open(target, "rb").read()).hexdigest()
    json.dump(vendored, open(vendored_file, "w"))
    assert vendored_differences(root) == ["hybridmim_components/losses.py: differs from hybridmim-components "
                                          f"{vendored['version']} (changed)"]
    with pytest.raises(ValueError, match="not the one it claims to be"):
        verify_bundles.check_vendored(root)


def test_metadata_lists_only_packages_the_registry_has(tmp_path):
    for bundle in sorted(os.listdir(os.path.join(REPO, "bundles"))):
        verify_bundles.check_packages(os.path.join(REPO, "bundles", bundle))
    # the negative control: the collection's own package, which is on no registry, is refused by name
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(REPO, "bundles", "msd_spleen_segmentation", "configs"), broken / "configs")
    meta = json.load(open(broken / "configs" / "metadata.json"))
    meta["required_packages_version"]["hybridmim-components"] = "0.1.0"
    json.dump(meta, open(broken / "configs" / "metadata.json", "w"))
    with pytest.raises(ValueError, match=r"no hybridmim-components==0\.1\.0"):
        verify_bundles.check_packages(str(broken))


def bundle_run(python: str, root: str, config: str, *args: str) -> str:
    """``monai.bundle run`` of a downloaded bundle as its docs say: from its folder, with the given python."""
    proc = run_command([python, "-m", "monai.bundle", "run", "--config_file", config, *args], cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_downloaded_zip_runs_where_only_monai_and_its_metadata_packages_are_installed(tmp_path):
    """A fresh virtual environment with torch, monai[fire] and the metadata's packages from the registry (no
    install of this project): each workflow of a downloaded pre-training and fine-tuning zip, on the phantoms it
    writes itself."""
    from bundle_env import bundle_env

    python = bundle_env()
    absent = run_command([python, "-c", "import hybridmim_components"], cwd=str(tmp_path))
    assert absent.returncode != 0 and "No module named 'hybridmim_components'" in absent.stderr  # really absent
    downloads, tiny = tmp_path / "downloads", ["--features", TINY_UNET, "--roi_size", "[32,32,32]", "--num_workers", "0"]
    roots = {}
    for bundle in (MAIN_BUNDLE, "msd_spleen_segmentation"):
        archive = package(os.path.join(REPO, "bundles", bundle), output_dir=str(tmp_path / "zips"))
        proc = run_command([python, "-m", "monai.bundle", "download", "--name", bundle, "--url", f"file://{archive}",
                            "--bundle_dir", str(downloads)], cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        roots[bundle] = str(downloads / bundle)

    pre = roots[MAIN_BUNDLE]
    bundle_run(python, pre, "configs/train.json", *tiny, "--reconstruction_roi", "[16,16,16]", "--sub_volume_size",
               "16", "--patch_size", "8", "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1",
               "--probe_interval", "0")
    plan = json.load(open(os.path.join(pre, "models", "plan.json")))
    assert plan["versions"]["hybridmim_components"] == json.load(open(os.path.join(pre, "scripts", "vendored.json")))["version"]
    BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=json.loads(TINY_UNET)).load_state_dict(
        torch.load(os.path.join(pre, "models", "model.pt"), weights_only=True), strict=True)
    bundle_run(python, pre, "configs/inference.json", *tiny[:4],
               "--dataset_dir", os.path.join(pre, "data", "phantoms_ct"))

    fine = roots["msd_spleen_segmentation"]
    finetune = [*tiny, "--num_folds", "2", "--max_epochs", "1"]
    log = bundle_run(python, fine, "configs/train.json", *finetune, "--pretrained", os.path.join(pre, "models", "model.pt"),
                     "--transfer", "encoder")
    assert "transfer: encoder" in log
    bundle_run(python, fine, "['configs/train.json','configs/evaluate.json']", *finetune)
    assert json.load(open(os.path.join(fine, "eval", "metrics.json")))["val_mean_dice"]["cases"]
    bundle_run(python, fine, "configs/inference.json", *tiny[:4],
               "--dataset_dir", os.path.join(fine, "data", "phantoms_spleen", "imagesTr"))
    assert glob.glob(os.path.join(fine, "predictions", "*_seg.nii.gz"))
    # the multi-GPU config, whose initialize starts the process group: two processes (gloo) under torchrun
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
                           "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", *finetune,
                           "--bundle_root", str(tmp_path / "two")], cwd=fine, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "two" / "models" / "model.pt")


@pytest.mark.slow
def test_an_installed_package_of_the_same_version_wins_over_the_vendored_copy(tmp_path):
    """The repository's own environment (the editable install) imports its package, not the zip's copy; an
    environment without it imports the copy."""
    from bundle_env import bundle_env

    root = unpack(package(os.path.join(REPO, "bundles", "msd_spleen_segmentation"), output_dir=str(tmp_path)), tmp_path / "u")
    where = "import scripts, hybridmim_components; print(hybridmim_components.__file__)"
    ours = run_command([sys.executable, "-c", where], cwd=root)
    assert ours.returncode == 0 and ours.stdout.startswith(os.path.join(REPO, "hybridmim_components")), ours.stdout + ours.stderr
    bare = run_command([bundle_env(), "-c", where], cwd=root)
    assert bare.returncode == 0 and bare.stdout.startswith(os.path.join(root, "scripts", "hybridmim_components")), bare.stderr
