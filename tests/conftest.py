import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = "[4,4,8,8,16,4]"


def bundle_config(bundle: str, name: str = "train.json") -> str:
    return os.path.join(REPO, "bundles", bundle, "configs", name)


def run_command(args: list[str], cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command; on failure, show its output in the assertion."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


@pytest.fixture(scope="session")
def tiny_ct_phantoms(tmp_path_factory):
    from hybridmim_components.phantoms import write_ct_phantoms

    return write_ct_phantoms(str(tmp_path_factory.mktemp("phantoms")), num_subjects=3, shape=(48, 48, 40))


def tiny_pretrain_args(bundle_root: str, dataset_dir: str) -> list[str]:
    """Overrides that make the UNet pre-training bundle run in seconds on a CPU."""
    return [
        "--bundle_root", bundle_root,
        "--dataset_dir", dataset_dir,
        "--features", TINY_UNET,
        "--roi_size", "[32,32,32]",
        "--reconstruction_roi", "[16,16,16]",
        "--sub_volume_size", "16",
        "--patch_size", "8",
        "--max_epochs", "2",
        "--epoch_length", "2",
        "--val_interval", "1",
        "--log_every", "1",
        "--warmup_steps", "1",
        "--num_workers", "0",
    ]


def monai_bundle(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]
