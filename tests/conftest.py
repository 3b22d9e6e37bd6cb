import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import venv

import numpy as np
import pytest

from bundle_exit_probe import MARK as EXIT_MARK, STACKS_SIGNAL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share two cores with the bundles they start (one thread each): one thread here too, or the
    # threads of both workers spin against each other
    import torch

    torch.set_num_threads(1)
TINY_UNET = "[4,4,8,8,16,4]"


def bundle_config(bundle: str, name: str = "train.json") -> str:
    return os.path.join(REPO, "bundles", bundle, "configs", name)


HIDE_EDITABLE_ENV = "HYBRIDMIM_HIDE_EDITABLE"


def child_venv(path: str, parent_pth_files: bool = True) -> str:
    """A virtual environment at ``path`` that also sees this environment's packages; the path of its python.

    The parent's site-packages comes after the child's: what is installed into the child wins. With
    ``parent_pth_files`` it is a site dir, whose ``.pth`` files run (an editable install of this project is then
    importable, and its finder takes precedence), unless the process has ``HIDE_EDITABLE_ENV`` set; without, it is
    a plain path entry.
    """
    python = os.path.join(path, "bin", "python")
    if not os.path.isfile(python):
        venv.create(path, with_pip=True)
    child = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    text=True).strip()
    with open(os.path.join(child, "_hybridmim_parent_env.pth"), "w") as f:
        parent = sysconfig.get_paths()["purelib"]
        # HIDE_EDITABLE_ENV set: the parent as a plain path entry for that process, its editable install unseen
        f.write(f"import os, site, sys; sys.path.append({parent!r}) if os.environ.get({HIDE_EDITABLE_ENV!r}) "
                f"else site.addsitedir({parent!r})\n" if parent_pth_files else parent + "\n")
    return python


def run_in_terminal(args: list[str], cwd: str, timeout: float = 600) -> str:
    """Run a command on a pseudo-terminal of 120 columns (as a user's shell would); its output, stdout and
    stderr together."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing at 0 columns
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while select.select([master], [], [], timeout)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    proc.wait(timeout)
    return out.decode(errors="replace")


def run_command(args: list[str], cwd: str, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
    """Run a command (``env_vars`` added to its environment); on failure, show its output in the assertion."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env_vars)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


@pytest.fixture(scope="session")
def tiny_ct_phantoms(tmp_path_factory):
    from hybridmim_components.phantoms import write_ct_phantoms

    return write_ct_phantoms(str(tmp_path_factory.mktemp("phantoms")), num_subjects=3, shape=(48, 48, 40))


def hidden_fraction_of_written_reconstruction(paths: list[str], size: int, patch: int = 16) -> float:
    """One case's ``<name>_masked``, ``_original`` and ``_reconstruction.nii.gz`` (sorted by suffix), as
    pre-training inference writes them: assert one shape (``size``³) and one affine, and return the fraction of
    the ``patch``³ patches holding some of the original's non-zero voxels that the masked input hides entirely.
    Counted by patch, not by voxel: a masked patch of air hides nothing, and the tiny phantoms leave most of
    a crop as padding."""
    import nibabel as nib

    masked, original, reconstruction = (nib.load(p) for p in paths)
    assert masked.shape == original.shape == reconstruction.shape == (size,) * 3
    assert (masked.affine == original.affine).all() and (reconstruction.affine == original.affine).all()
    n = size // patch
    by_patch = lambda v: np.abs(v.get_fdata()).reshape(n, patch, n, patch, n, patch).max(axis=(1, 3, 5))  # noqa: E731
    hidden, content = by_patch(masked) == 0, by_patch(original) > 0
    return (hidden & content).sum() / content.sum()


def load_tool(name: str):
    """The module of ``tools/<name>.py``, loaded from its file: the tools are scripts, not a package, and are
    imported by no other code."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verify_saved_weights(bundle: str, weights: str, workdir, **overrides) -> None:
    """The model zoo's checks (``tools/verify_bundles.py``) on a copy of ``bundle`` holding ``weights`` as its
    ``models/model.pt``; the copy keeps the bundle's folder name, by which the checks know it."""
    verify = load_tool("verify_bundles").verify
    checked = os.path.join(str(workdir), bundle)
    shutil.copytree(os.path.join(REPO, "bundles", bundle), checked)
    os.makedirs(os.path.join(checked, "models"))
    shutil.copy(weights, os.path.join(checked, "models", "model.pt"))
    assert verify(checked, **overrides) == [checked]


def tiny_pretrain_args(bundle_root: str, dataset_dir: str, probe_interval: int = 0) -> list[str]:
    """Overrides that make the UNet pre-training bundle run in seconds on a CPU; the segmentation probe (on in
    the demo) only where a test asks for it."""
    return [
        "--probe_interval", str(probe_interval),
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


def run_two_processes(bundle: str, *args: str, timeout: int = 600) -> str:
    """Run a bundle's train.json + multi_gpu_train.json on two processes (gloo on a CPU) via torchrun, assert
    that it succeeded and return the log. Both ranks' stdout and stderr come in the order written, and a rank
    killed by a signal prints every thread's Python stack (faulthandler), so a failure shows where it stopped.
    Each rank runs through ``bundle_exit_probe``, which checks that nothing distributed is left for interpreter
    shutdown to free."""
    config = f"['{bundle_config(bundle)}','{bundle_config(bundle, 'multi_gpu_train.json')}']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "tests", "bundle_exit_probe.py"), "run", "--config_file", config, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # each rank prints its threads' stacks (bundle_exit_probe), so a rare hang shows where each rank waited;
        # torchrun starts each rank in a session of its own: killing torchrun alone leaves the ranks running (and
        # holding the pipe), so each rank's process group goes first, loader workers included
        ranks = [int(pid) for pid in
                 subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
        native = "\n".join(_native_stacks(pid) for pid in ranks)
        _signal_each(ranks, lambda pid: os.kill(pid, STACKS_SIGNAL))
        time.sleep(3)
        _signal_each(ranks, lambda pid: os.killpg(pid, signal.SIGKILL))
        proc.kill()
        stdout, _ = proc.communicate()
        pytest.fail(f"two-process run still running after {timeout} s; the ranks' stacks:\n{_stacks(stdout)}\n"
                    f"their native stacks (py-spy):\n{native}\nits last output:\n{stdout[-4000:]}")
    # the first rank to fail is the cause; the other's error ("Connection closed by peer") fills the tail, so
    # every traceback comes first, then the tail
    if proc.returncode != 0:
        pytest.fail(f"two-process run exited {proc.returncode}; tracebacks:\n{_tracebacks(stdout)}\n"
                    f"last output:\n{stdout[-4000:]}")
    # every rank freed its DDP module (and with it the gloo process group) before interpreter shutdown
    assert stdout.count(f"{EXIT_MARK} 0") == 2, stdout[-6000:]
    return stdout


def _native_stacks(pid: int) -> str:
    """Every thread's stack of the process ``pid``, C and C++ frames too: a rank seen hanging in CI sat in the
    interpreter's final garbage collection, below any Python frame, so faulthandler showed nothing of where."""
    try:
        dump = subprocess.run([os.path.join(sysconfig.get_path("scripts"), "py-spy"), "dump", "--native", "--pid",
                               str(pid)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"no py-spy dump of {pid}: {error}"
    return dump.stdout or dump.stderr


def _signal_each(pids: list[int], send) -> None:
    for pid in pids:
        try:
            send(pid)
        except ProcessLookupError:  # it ended meanwhile
            pass


def _tracebacks(output: str, limit: int = 8) -> str:
    """The first ``limit`` Python tracebacks in ``output``, each from its header to its exception line (the
    first line after it that is not indented), in the order they were written. torchrun may prefix a rank's
    lines with ``[rank0]: ``; the indentation is read after it."""
    blocks, block = [], None
    for line in output.splitlines():
        text = re.sub(r"^\[\w+\]: ?", "", line)
        if "Traceback (most recent call last)" in line:
            block = [line]
        elif block is not None:
            block.append(line)
            if text and not text[0].isspace():
                blocks.append("\n".join(block))
                block = None
    if block is not None:
        blocks.append("\n".join(block))
    return "\n\n".join(blocks[:limit]) or "(none)"


def _stacks(output: str) -> str:
    """The Python stacks that faulthandler printed into ``output`` (a header line, then its ``File`` lines)."""
    lines, keep = [], False
    for line in output.splitlines():
        if "most recent call first" in line:
            keep = True
        elif keep and not line.startswith("  File"):
            keep = False
        if keep:
            lines.append(line)
    return "\n".join(lines)


FINETUNE_BUNDLES = {
    # bundle: (phantom kind, task)
    "msd_spleen_segmentation": ("ct", "spleen"),
    "msd_liver_segmentation": ("ct", "liver"),
    "btcv_multiorgan_segmentation": ("ct", "btcv"),
    "brats_tumor_segmentation": ("brain", None),
}


@pytest.fixture(scope="session")
def tiny_task_phantoms(tmp_path_factory):
    """Four tiny subjects for each fine-tuning bundle, in that bundle's own label convention, at a spacing
    other than the bundle's ``pixdim``, so that evaluation in the original space has a resampling to invert."""
    from hybridmim_components.phantoms import write_brain_phantoms, write_ct_phantoms

    root = tmp_path_factory.mktemp("task_phantoms")
    paths = {}
    for bundle, (kind, task) in FINETUNE_BUNDLES.items():
        if kind == "ct":
            paths[bundle] = write_ct_phantoms(str(root / bundle), num_subjects=4, shape=(48, 48, 40), task=task,
                                              spacing=(1.2, 1.2, 2.5))
        else:
            paths[bundle] = write_brain_phantoms(str(root / bundle), num_subjects=4, shape=(48, 48, 40), spacing=(1.2, 1.2, 1.5))
    return paths


def tiny_finetune_args(bundle_root: str, dataset_dir: str) -> list[str]:
    """Overrides that make a fine-tuning bundle run in seconds on a CPU."""
    return [
        "--bundle_root", bundle_root,
        "--dataset_dir", dataset_dir,
        "--features", TINY_UNET,
        "--roi_size", "[32,32,32]",
        "--num_folds", "2",
        "--max_epochs", "2",
        "--val_interval", "1",
        "--num_workers", "0",
    ]
