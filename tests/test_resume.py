"""Exact resume after a real `kill -9`, the schedule-extension rule, and the best-model record."""

import json
import os
import re
import signal
import subprocess

import pytest
import torch
from ignite.engine import Engine, Events

from monai.handlers import CheckpointSaver
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd

from hybridmim_components.probe import read_probe_log
from hybridmim_components.resume import ConfiguredHorizon, RunState, random_transforms

from conftest import REPO, TINY_UNET, bundle_config, monai_bundle, run_command

PRETRAIN = "hybridmim_unet_pretrain"
GENESIS = "modelsgenesis_unet_pretrain"
SWINSSL = "swinssl_swinunetr_pretrain"
FINETUNE = "msd_spleen_segmentation"
# 4 epochs; the kill comes after the first iteration of epoch 2, so after epoch 1's checkpoint
KILL_AT = re.compile(r"Epoch: 2/4, Iter: 1/")
ITERATION_LOG = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- (.*)$")


def pretrain_args(root, data):
    # two workers: without a fresh iterator per epoch, their random streams would cross the checkpoint
    return ["--bundle_root", root, "--dataset_dir", data, "--features", TINY_UNET, "--roi_size", "[32,32,32]",
            "--reconstruction_roi", "[16,16,16]", "--sub_volume_size", "16", "--patch_size", "8", "--max_epochs", "4",
            "--epoch_length", "3", "--val_interval", "1", "--log_every", "1", "--warmup_steps", "1",
            "--num_workers", "2", "--probe_interval", "1"]


def genesis_args(root, data):
    # two workers, as above; the corruptions draw from every transform's own random state (shuffle, curve, paint)
    return ["--bundle_root", root, "--dataset_dir", data, "--features", TINY_UNET, "--roi_size", "[32,32,32]",
            "--max_epochs", "4", "--epoch_length", "3", "--val_interval", "1", "--log_every", "1", "--warmup_steps", "1",
            "--num_workers", "2", "--probe_interval", "1"]


def swinssl_args(root, data):
    # the views draw on the device's and the CPU's default torch generators in the main process, which only the run
    # state holds (no loader workers: the crops are the only random draws there, and the UNet bundles test those)
    # crops of 32 x 64 x 64: the rotations keep the last two axes, and the deepest map keeps 4 voxels for the
    # reconstruction head's instance norm
    return ["--bundle_root", root, "--dataset_dir", data, "--feature_size", "12", "--roi_size", "[32,64,64]",
            "--max_epochs", "4", "--epoch_length", "3", "--val_interval", "1", "--log_every", "1", "--warmup_steps", "1",
            "--num_workers", "0"]


def finetune_args(root, data):
    return ["--bundle_root", root, "--dataset_dir", data, "--features", TINY_UNET, "--roi_size", "[32,32,32]",
            "--num_folds", "2", "--max_epochs", "4", "--val_interval", "1", "--num_workers", "0"]


def iteration_losses(log: str, from_epoch: int) -> dict[tuple[int, int], str]:
    found = {}
    for line in log.splitlines():
        match = ITERATION_LOG.search(line)
        if match and int(match.group(1)) >= from_epoch:
            found[(int(match.group(1)), int(match.group(2)))] = match.group(3).strip()
    return found


def train(bundle: str, args: list[str]) -> str:
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(bundle)) + args, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def train_and_kill(bundle: str, args: list[str]) -> None:
    """Start a run and SIGKILL it in the middle of epoch 2 (no handler, no flush: what a pre-emption does)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(monai_bundle("run", "training", "--config_file", bundle_config(bundle)) + args, cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if KILL_AT.search(line):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-4000:]


def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", [PRETRAIN, GENESIS, SWINSSL, FINETUNE])
def test_killed_run_resumes_bit_identically(bundle, tiny_ct_phantoms, tiny_task_phantoms, tmp_path):
    pretraining = bundle != FINETUNE
    data = tiny_ct_phantoms if pretraining else tiny_task_phantoms[bundle]
    args = {PRETRAIN: pretrain_args, GENESIS: genesis_args, SWINSSL: swinssl_args, FINETUNE: finetune_args}[bundle]
    uninterrupted = train(bundle, args(str(tmp_path / "uninterrupted"), data))

    killed = str(tmp_path / "killed")
    train_and_kill(bundle, args(killed, data))
    models = sorted(os.listdir(os.path.join(killed, "models")))
    assert "checkpoint_epoch=1.pt" in models and (not pretraining or "model.pt" not in models), models
    resumed = train(bundle, args(killed, data) + ["--resume", "True"])

    expected, got = iteration_losses(uninterrupted, 2), iteration_losses(resumed, 2)
    assert len(expected) >= 6 and got == expected, (expected, got)  # every iteration of epochs 2 to 4
    # the weights at the end: the last full checkpoint, which only the end of epoch 4 writes (a fine-tuning
    # run's model.pt is its best epoch, which may have been written before the kill)
    final = torch.load(tmp_path / "uninterrupted" / "models" / "checkpoint_epoch=4.pt", weights_only=False)["model"]
    again = torch.load(os.path.join(killed, "models", "checkpoint_epoch=4.pt"), weights_only=False)["model"]
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    if bundle in (PRETRAIN, GENESIS):  # the probe ran after every epoch; it changed no random stream, and it resumed too
        probed = [read_probe_log(os.path.join(root, "runs", "probe.jsonl")) for root in (tmp_path / "uninterrupted", killed)]
        assert [r["epoch"] for r in probed[0]] == [0, 1, 2, 3, 4]
        assert [r["dice"] for r in probed[1]] == [r["dice"] for r in probed[0]]
    # the test can tell: without the run state (random states, best-model record), the same resume goes elsewhere
    state_free = str(tmp_path / "state_free")
    train_and_kill(bundle, args(state_free, data))
    model = "@network_def" if pretraining else "@network"
    load_dict = {"model": model, "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "trainer": "@train#trainer"}
    log = train(bundle, args(state_free, data) + ["--resume", "True", "--train#resume#load_dict", json.dumps(load_dict)])
    assert iteration_losses(log, 2) != expected
    different = torch.load(os.path.join(state_free, "models", "checkpoint_epoch=4.pt"), weights_only=False)["model"]
    assert not all(torch.equal(final[k], different[k]) for k in final)


def schedule(kind: str, horizon: int):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "warmup_cosine":
        return WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=horizon)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=horizon)


def learning_rates(scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("kind", ["warmup_cosine", "cosine_annealing"])
def test_extending_max_epochs_extends_the_schedule(kind):
    """10 of 20 steps done, then resumed with a horizon of 40: the rate goes on from where it was down to 0."""
    first = schedule(kind, 20)
    learning_rates(first, 10)
    saved_rate, saved = first.optimizer.param_groups[0]["lr"], (first.optimizer.state_dict(), first.state_dict())

    extended = schedule(kind, 40)
    extended.optimizer.load_state_dict(saved[0])
    ConfiguredHorizon(extended).load_state_dict(saved[1])
    rates = learning_rates(extended, 30)
    assert abs(rates[0] - saved_rate) < 0.1 * saved_rate  # no jump
    assert all(b <= a + 1e-12 for a, b in zip([saved_rate] + rates, rates))  # never climbs
    assert rates[-1] < 1e-3 * saved_rate and rates[-5] > rates[-1]  # reaches the end at the new horizon only

    restored = schedule(kind, 40)  # what a plain load did: the old horizon comes back, the cosine climbs again
    restored.optimizer.load_state_dict(saved[0])
    restored.load_state_dict(saved[1])
    assert max(learning_rates(restored, 30)[10:]) > 0.5 * saved_rate

    same = schedule(kind, 20)  # an unchanged horizon changes nothing
    same.optimizer.load_state_dict(saved[0])
    ConfiguredHorizon(same).load_state_dict(saved[1])
    reference = schedule(kind, 20)
    learning_rates(reference, 10)
    assert learning_rates(same, 10) == learning_rates(reference, 10)


def test_resumed_best_model_saver_keeps_its_record(tmp_path):
    """After a resume, a validation worse than the best so far must not replace model.pt."""
    net = torch.nn.Linear(1, 1)
    trainer = Engine(lambda e, b: None)

    def evaluator_with(score: float) -> tuple[Engine, CheckpointSaver]:
        evaluator = Engine(lambda e, b: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=score))
        saver = CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_mean_dice",
                                key_metric_filename="model.pt")
        saver.attach(evaluator)
        return evaluator, saver

    evaluator, saver = evaluator_with(0.8)
    evaluator.run([0])
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 1
    state = RunState(trainer, evaluator=evaluator, best_model_saver=saver).state_dict()
    best = os.path.getmtime(tmp_path / "model.pt")

    with torch.no_grad():
        net.weight.fill_(123.0)  # what a worse epoch would save
    resumed_evaluator, resumed_saver = evaluator_with(0.5)
    RunState(trainer, evaluator=resumed_evaluator, best_model_saver=resumed_saver).load_state_dict(state)
    assert resumed_evaluator.state.best_metric == 0.8 and resumed_evaluator.state.best_metric_epoch == 1
    resumed_evaluator.run([0])
    assert os.path.getmtime(tmp_path / "model.pt") == best
    assert weights(tmp_path / "model.pt")["weight"].item() != 123.0

    fresh_evaluator, _ = evaluator_with(0.5)  # without the record, the worse model replaces the best
    fresh_evaluator.run([0])
    assert weights(tmp_path / "model.pt")["weight"].item() == 123.0


def test_run_state_finds_the_random_state_inside_dictionary_transforms(tmp_path):
    pipeline = Compose([
        RandCropByPosNegLabeld(["image", "label"], "label", (8, 8, 8)),
        Compose([RandFlipd("image", prob=0.5), RandScaleIntensityd("image", factors=0.1, prob=1.0)]),
    ])
    found = {type(t).__name__ for t in random_transforms([pipeline])}
    assert {"RandCropByPosNegLabeld", "RandCropByPosNegLabel", "RandFlipd", "RandScaleIntensityd",
            "RandScaleIntensity"} <= found

    state = RunState(Engine(lambda e, b: None), transforms=[pipeline]).state_dict()
    data = {"image": torch.rand(1, 16, 16, 16), "label": (torch.rand(1, 16, 16, 16) > 0.5).float()}
    first = pipeline(dict(data))
    RunState(Engine(lambda e, b: None), transforms=[pipeline]).load_state_dict(state)
    again = pipeline(dict(data))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    torch.save(state, tmp_path / "state.pt")  # plain values: MONAI's CheckpointLoader loads with weights_only=True
    RunState(Engine(lambda e, b: None), transforms=[pipeline]).load_state_dict(
        torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, pipeline(dict(data))))
    with pytest.raises(ValueError, match="configuration that wrote it"):
        RunState(Engine(lambda e, b: None), transforms=[]).load_state_dict(state)


@pytest.mark.slow
def test_a_volume_damaged_mid_run_stops_it_by_name_and_nothing_is_lost(tiny_ct_phantoms, tmp_path):
    """A run reading from disk (no cache) meets volumes truncated after its first checkpoint: it stops with a
    file's name and the fix, its last full checkpoint loads, no final-looking model.pt is left, and once the
    files are restored ``--resume True`` finishes the run."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(tiny_ct_phantoms, data)
    images = sorted(os.path.join(data, "imagesTr", n) for n in os.listdir(os.path.join(data, "imagesTr")))
    originals = {p: open(p, "rb").read() for p in images}
    root = str(tmp_path / "run")
    args = pretrain_args(root, data) + ["--cache_rate", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(monai_bundle("run", "training", "--config_file", bundle_config(PRETRAIN)) + args, cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if KILL_AT.search(line) and os.path.isfile(os.path.join(root, "models", "checkpoint_epoch=1.pt")):
            for path, content in originals.items():  # an interrupted copy over the dataset
                open(path, "wb").write(content[: len(content) // 2])
    log = "".join(seen)
    assert proc.wait(120) != 0, log[-3000:]
    assert "cannot read" in log and any(p in log for p in images) and "tools/check_dataset.py" in log, log[-3000:]

    models = os.listdir(os.path.join(root, "models"))
    assert "model.pt" not in models, models
    (newest,) = (m for m in models if m.startswith("checkpoint_epoch="))  # n_saved 1: the newest only
    checkpoint = torch.load(os.path.join(root, "models", newest), weights_only=True)
    epoch = int(newest[len("checkpoint_epoch="):-len(".pt")])
    assert epoch >= 1 and checkpoint["trainer"]["iteration"] == epoch * checkpoint["trainer"]["epoch_length"]
    assert checkpoint["model"] and checkpoint["run_state"]

    for path, content in originals.items():
        open(path, "wb").write(content)
    resumed = train(PRETRAIN, args + ["--resume", "True"])
    assert "Epoch: 4/4" in resumed and os.path.isfile(os.path.join(root, "models", "model.pt"))
