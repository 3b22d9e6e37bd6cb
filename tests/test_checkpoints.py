"""Checkpoints that survive a kill during their write, a resume that skips a damaged file, and a run that stops
at a non-finite loss; each against MONAI's own saver or the run without the stop as the negative control."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Engine

from monai.handlers import CheckpointSaver

from hybridmim_components.checkpoints import AtomicCheckpointSaver, AtomicDiskSaver, intact, latest_checkpoint

from conftest import REPO, bundle_config, monai_bundle, run_command, tiny_pretrain_args

PRETRAIN = "hybridmim_unet_pretrain"


def truncate(path, fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def test_resume_skips_a_damaged_checkpoint_and_names_it(tmp_path, caplog):
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "weights": torch.rand(1000)}, tmp_path / f"checkpoint_epoch={epoch}.pt")
        time.sleep(0.01)  # distinct modification times
    assert latest_checkpoint(str(tmp_path)).endswith("epoch=2.pt")  # the control: both whole, the newest wins
    truncate(tmp_path / "checkpoint_epoch=2.pt")
    assert "damaged" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hybridmim_components.checkpoints"):
        assert latest_checkpoint(str(tmp_path)).endswith("epoch=1.pt")
    assert re.search(r"checkpoint_epoch=2\.pt: it is damaged", caplog.text)
    truncate(tmp_path / "checkpoint_epoch=1.pt", 0.9)
    with pytest.raises(FileNotFoundError, match=r"no intact .*damaged: .*epoch=2\.pt"):
        latest_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--resume_from"):
        latest_checkpoint(str(tmp_path / "empty"))


class FailingState(torch.nn.Module):
    """A module whose state cannot be pickled at epoch ``fail_at``: a write that dies half way."""

    def __init__(self, engine_state, fail_at):
        super().__init__()
        self.engine_state, self.fail_at, self.weight = engine_state, fail_at, torch.nn.Parameter(torch.rand(4096))

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.engine_state().epoch == self.fail_at:
            state["unpicklable"] = lambda: None
        return state


@pytest.mark.parametrize("saver,previous_kept", [(AtomicCheckpointSaver, True), (CheckpointSaver, False)])
def test_a_write_that_dies_leaves_the_previous_checkpoint(saver, previous_kept, tmp_path):
    """MONAI's saver removes epoch 1's file before it writes epoch 2's, in place; ours writes epoch 2's under a
    temporary name and removes epoch 1's only once epoch 2's is complete."""
    engine = Engine(lambda e, b: None)
    model = FailingState(lambda: engine.state, fail_at=2)
    saver(str(tmp_path), {"model": model, "other": torch.nn.Linear(1, 1)}, save_interval=1, n_saved=1).attach(engine)
    with pytest.raises(Exception):
        engine.run(range(2), max_epochs=3)
    listed = sorted(os.listdir(tmp_path))
    assert ("checkpoint_epoch=1.pt" in listed) == previous_kept, listed
    if previous_kept:
        assert intact(tmp_path / "checkpoint_epoch=1.pt") and listed == ["checkpoint_epoch=1.pt"]
        assert latest_checkpoint(str(tmp_path)).endswith("epoch=1.pt")
    else:
        assert not intact(tmp_path / "checkpoint_epoch=2.pt")  # half written, and nothing else left


def test_a_fixed_name_is_replaced_whole(tmp_path):
    """``model.pt`` of the best-model saver: ignite asks for its removal before each new save; it stays until the
    new one has replaced it in one rename."""
    saver = AtomicDiskSaver(str(tmp_path), filename="model.pt")
    saver({"model": {"w": torch.zeros(3)}}, "model_key_metric=0.1.pt")
    saver.remove("model_key_metric=0.1.pt")
    assert os.listdir(tmp_path) == ["model.pt"]  # asked to remove it, it has not
    saver({"model": {"w": torch.ones(3)}}, "model_key_metric=0.5.pt")
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.equal(torch.load(tmp_path / "model.pt")["model"]["w"], torch.ones(3))


def _run_until_write_and_kill(root, data, extra, marker):
    """The UNet pre-training bundle, SIGKILLed half way through writing epoch 2's full checkpoint."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SLOW_CHECKPOINT_MATCH="checkpoint_epoch=2",
               SLOW_CHECKPOINT_MARKER=marker)
    command = [sys.executable, os.path.join(REPO, "tests", "slow_checkpoint_write.py"), "run", "training",
               "--config_file", bundle_config(PRETRAIN), *tiny_pretrain_args(root, data), "--max_epochs", "3", *extra]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert os.path.exists(marker) and proc.returncode == -signal.SIGKILL, output[-3000:]
    return sorted(os.listdir(os.path.join(root, "models")))


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_loses_nothing(tiny_ct_phantoms, tmp_path):
    root = str(tmp_path / "atomic")
    models = _run_until_write_and_kill(root, tiny_ct_phantoms, [], str(tmp_path / "atomic.writing"))
    # epoch 2's checkpoint was half written under its temporary name; epoch 1's is whole and still there
    assert "checkpoint_epoch=1.pt" in models and "checkpoint_epoch=2.pt" not in models and "model.pt" not in models
    assert ".checkpoint_epoch=2.pt.partial" in models, models
    assert intact(os.path.join(root, "models", "checkpoint_epoch=1.pt"))
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(PRETRAIN))
                       + tiny_pretrain_args(root, tiny_ct_phantoms) + ["--max_epochs", "3", "--resume", "True"], cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Epoch: 2/3" in proc.stdout + proc.stderr and "Epoch: 1/3" not in proc.stdout + proc.stderr
    # the stray partial file is gone; epoch 1's file stays, as with MONAI's saver: the resumed run's saver keeps
    # count of the files it wrote itself
    assert sorted(os.listdir(os.path.join(root, "models"))) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=3.pt",
                                                               "model.pt", "plan.json"]

    # the negative control: MONAI's saver, killed at the same byte, has removed epoch 1's file and left half of
    # epoch 2's; there is nothing to resume from
    root = str(tmp_path / "monai")
    models = _run_until_write_and_kill(root, tiny_ct_phantoms, ["--train#checkpoint#_target_", "CheckpointSaver"],
                                       str(tmp_path / "monai.writing"))
    assert [m for m in models if m.startswith("checkpoint")] == ["checkpoint_epoch=2.pt"], models
    with pytest.raises(FileNotFoundError, match="no intact"):
        latest_checkpoint(os.path.join(root, "models"))


@pytest.mark.slow
def test_a_resume_that_skips_a_damaged_checkpoint_says_so_in_its_log(tiny_ct_phantoms, tmp_path):
    """Cluster job scripts often set PYTHONWARNINGS=ignore: the skip must still reach the run's log (the bundle's
    logger, on stdout), or the run resumes from an older epoch without a word."""
    root = str(tmp_path / "run")
    args = monai_bundle("run", "training", "--config_file", bundle_config(PRETRAIN)) + tiny_pretrain_args(
        root, tiny_ct_phantoms)
    models = os.path.join(root, "models")
    assert run_command(args + ["--max_epochs", "1"], cwd=REPO).returncode == 0
    shutil.copy(os.path.join(models, "checkpoint_epoch=1.pt"), tmp_path)
    assert run_command(args + ["--resume", "True"], cwd=REPO).returncode == 0  # epoch 2 replaces epoch 1's file
    shutil.copy(tmp_path / "checkpoint_epoch=1.pt", models)  # epoch 1's, as a saver keeping two would have left it
    os.utime(os.path.join(models, "checkpoint_epoch=1.pt"), (time.time() - 60, time.time() - 60))
    truncate(os.path.join(models, "checkpoint_epoch=2.pt"))
    proc = run_command(args + ["--max_epochs", "3", "--resume", "True"], cwd=REPO, PYTHONWARNINGS="ignore")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert re.search(r"WARNING - skipping the checkpoint \S*checkpoint_epoch=2\.pt: it is damaged", proc.stdout), log[-3000:]
    assert "Epoch: 2/3" in log  # resumed from epoch 1, the newest intact checkpoint
    # the negative control: in the same environment a warnings.warn, the old way of saying it, is silent
    silent = run_command([sys.executable, "-c", "import warnings; warnings.warn('skipping the checkpoint')"],
                         cwd=REPO, PYTHONWARNINGS="ignore")
    assert "skipping" not in silent.stdout + silent.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_ct_phantoms, tmp_path):
    """One epoch trains normally; resumed for a second one with an infinite loss weight, the run stops at that
    epoch's first iteration, names it and the term, and leaves epoch 1's checkpoint as the one to resume from."""
    root = str(tmp_path / "run")
    args = monai_bundle("run", "training", "--config_file", bundle_config(PRETRAIN)) + tiny_pretrain_args(
        root, tiny_ct_phantoms)
    assert run_command(args + ["--max_epochs", "1"], cwd=REPO).returncode == 0
    os.remove(os.path.join(root, "models", "model.pt"))
    infinite = ["--max_epochs", "2", "--resume", "True", "--loss#count_weight", "$float('inf')"]
    proc = run_command(args + infinite, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the loss is not finite at iteration 3 (epoch 2)" in log, log[-3000:]
    assert "): loss = inf." in log, log[-3000:]  # the weighted total; the count term itself is finite
    assert sorted(os.listdir(os.path.join(root, "models"))) == ["checkpoint_epoch=1.pt", "plan.json"]
    # the negative control: without the stop the same run trains on, and writes a model of non-finite weights
    proc = run_command(args + infinite + ["--train#handlers#0#_disabled_", "True"], cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    weights = torch.load(os.path.join(root, "models", "model.pt"), weights_only=True)
    assert not all(torch.isfinite(w).all() for w in weights.values())
