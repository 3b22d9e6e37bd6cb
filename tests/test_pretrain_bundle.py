"""The UNet pre-training bundle, run the way users run it: `python -m monai.bundle run training ...`."""

import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import BasicUNet

from hybridmim_components.probe import PROBE_METRIC, read_probe_log

from conftest import (
    TINY_UNET, REPO, bundle_config, hidden_fraction_of_written_reconstruction, load_tool, monai_bundle, run_command,
    run_in_terminal, tiny_pretrain_args, run_two_processes, verify_saved_weights,
)

# its module fixtures are built once: every test of the file in one pytest-xdist process
pytestmark = pytest.mark.xdist_group("test_pretrain_bundle")

BUNDLE = "hybridmim_unet_pretrain"
TERMS = ("reconstruction:", "count:", "location:", "consistency:", "contrastive:", "loss:")


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, tiny_ct_phantoms):
    root = str(tmp_path_factory.mktemp("unet_pretrain"))
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE))
        + tiny_pretrain_args(root, tiny_ct_phantoms, probe_interval=1),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_logs_every_term_and_validates(trained_root):
    _, log = trained_root
    assert all(term in log for term in TERMS), log[-3000:]
    assert "val_reconstruction_mse" in log
    assert "Epoch: 2/2, Iter: 2/2" in log


@pytest.mark.slow
def test_run_logs_the_probe_beside_the_losses(trained_root):
    """The probe after every epoch, and on the random encoder first: stdout, probe.jsonl, TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, log = trained_root
    records = read_probe_log(os.path.join(root, "runs", "probe.jsonl"))
    assert [r["epoch"] for r in records] == [0, 1, 2]  # the random encoder first
    assert all(0.0 <= r["dice"] <= 1.0 and r["seconds"] > 0 for r in records)
    assert "spleen" in records[0]["dice_per_class"]  # the phantoms' BTCV names
    assert f"{PROBE_METRIC}:" in log and "probe at epoch 0" in log
    scalars = set()
    for events in glob.glob(os.path.join(root, "runs", "events.out.tfevents.*")):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert PROBE_METRIC in scalars, scalars


@pytest.mark.slow
def test_saves_backbone_that_loads_into_stock_basic_unet(trained_root):
    root, _ = trained_root
    weights = torch.load(os.path.join(root, "models", "model.pt"), map_location="cpu", weights_only=True)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    net.load_state_dict(weights, strict=True)


@pytest.mark.slow
def test_full_checkpoint_and_tensorboard(trained_root):
    root, _ = trained_root
    (ckpt,) = glob.glob(os.path.join(root, "models", "checkpoint*.pt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "run_state", "plan"}
    assert state["trainer"]["iteration"] == 4 and state["trainer"]["epoch_length"] == 2
    assert glob.glob(os.path.join(root, "runs", "events.out.tfevents.*"))


@pytest.mark.slow
def test_progress_bar_in_a_terminal_only(trained_root, tiny_ct_phantoms, tmp_path):
    terminal = run_in_terminal(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE))
        + tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms), cwd=REPO)
    # "Epoch [2/2]: [1/2]  50%|████     [00:00<00:01]": elapsed<remaining (the bar clears itself at the epoch's end)
    assert re.search(r"Epoch \[2/2\]: \[\d/2\] +\d+%\|[^\[]*\[\d\d:\d\d<", terminal), terminal[-3000:]
    assert "Epoch [" not in trained_root[1]  # the same run, its output captured: no bar


@pytest.mark.slow
def test_validation_draws_masked_input_reconstruction_and_original(trained_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for events in glob.glob(os.path.join(trained_root[0], "runs", "events.out.tfevents.*")):
        accumulator = EventAccumulator(events, size_guidance={"images": 0})
        accumulator.Reload()
        images.update({tag: accumulator.Images(tag) for tag in accumulator.Tags()["images"]})
    assert set(images) == {"val/masked_HW_0", "val/reconstruction_HW_0", "val/original_HW_0"}
    for logged in images.values():  # the middle slice of the 16^3 box, at each validation (2 epochs)
        assert [(e.step, e.width, e.height) for e in logged] == [(1, 16, 16), (2, 16, 16)]


@pytest.mark.slow
def test_inference_writes_masked_input_reconstruction_and_original(trained_root, tiny_ct_phantoms):
    root = trained_root[0]
    proc = run_command(
        monai_bundle("run", "--config_file", bundle_config(BUNDLE, "inference.json"))
        + ["--bundle_root", root, "--dataset_dir", tiny_ct_phantoms, "--features", TINY_UNET,
           "--roi_size", "[32,32,32]", "--sub_volume_size", "16", "--patch_size", "8"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(glob.glob(os.path.join(root, "reconstructions", "*.nii.gz")))
    assert len(written) == 3 * 3  # three phantoms
    assert 0.2 < hidden_fraction_of_written_reconstruction(written[:3], 32, patch=8) < 0.6  # 40 % of patches masked


@pytest.mark.slow
def test_a_crashed_run_leaves_checkpoints_but_no_final_model(tiny_ct_phantoms, tmp_path):
    parser = ConfigParser()
    parser.read_config(bundle_config(BUNDLE))
    crash = "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=3), lambda e: 1 / 0)"
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE))
        + tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms)
        + ["--training", json.dumps([crash, *parser.get("run")])],
        cwd=REPO,
    )
    assert proc.returncode != 0 and "ZeroDivisionError" in proc.stderr
    models = sorted(os.listdir(tmp_path / "models"))
    assert models == ["checkpoint_epoch=1.pt", "plan.json"], models  # epoch 1 finished; the crash came in epoch 2


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(trained_root, tiny_ct_phantoms, tmp_path):
    root = str(tmp_path / "resumed")
    shutil.copytree(trained_root[0], root)
    args = tiny_pretrain_args(root, tiny_ct_phantoms)
    args[args.index("--max_epochs") + 1] = "3"
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE)) + args + ["--resume", "True"],
        cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Restored all variables" in log and "Epoch: 3/3" in log and "Epoch: 1/3" not in log
    state = torch.load(os.path.join(root, "models", "checkpoint_epoch=3.pt"), map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == 6


@pytest.mark.slow
def test_resume_without_checkpoint_says_so(tiny_ct_phantoms, tmp_path):
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE))
        + tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms)
        + ["--resume", "True"],
        cwd=REPO,
    )
    assert proc.returncode != 0 and "has no intact 'checkpoint*.pt'" in proc.stderr


@pytest.mark.slow
def test_missing_dataset_dir_says_so(tmp_path):
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(BUNDLE))
        + tiny_pretrain_args(str(tmp_path), str(tmp_path / "no_such_folder")),
        cwd=REPO,
    )
    assert proc.returncode != 0 and "no_such_folder: does not exist" in proc.stderr


@pytest.mark.slow
def test_multi_gpu_config_runs_two_processes_on_cpu(tiny_ct_phantoms, tmp_path):
    log = run_two_processes(BUNDLE, *tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms, probe_interval=1))
    # rank 0 alone probes, after every epoch and before the first
    assert [r["epoch"] for r in read_probe_log(os.path.join(str(tmp_path), "runs", "probe.jsonl"))] == [0, 1, 2]
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    assert log.count("Epoch: 2/2, Iter: 2/2") == 1  # only rank 0 logs


@pytest.mark.parametrize(
    "weights,terms",
    [
        # each term off in turn; its head, its second view or the decoder is then not built or idles
        ({"reconstruction_weight": 0}, ("count:", "location:", "consistency:", "contrastive:")),
        ({"count_weight": 0}, ("reconstruction:", "location:", "consistency:", "contrastive:")),
        ({"location_weight": 0}, ("reconstruction:", "count:", "consistency:", "contrastive:")),
        ({"consistency_weight": 0}, ("reconstruction:", "count:", "location:", "contrastive:")),
        # no contrastive term: one view, no projection head
        ({"contrastive_weight": 0}, ("reconstruction:", "count:", "location:", "consistency:")),
        # no count and no consistency term either: no count head
        ({"contrastive_weight": 0, "count_weight": 0, "consistency_weight": 0}, ("reconstruction:", "location:")),
    ],
    ids=["no-reconstruction", "no-count", "no-location", "no-consistency", "one-view", "reconstruction+location"],
)
@pytest.mark.slow
def test_ablations_skip_their_work_and_run_under_ddp(tiny_ct_phantoms, tmp_path, weights, terms):
    overrides = [arg for name, w in weights.items() for arg in (f"--loss#{name}", str(w))]
    log = run_two_processes(BUNDLE, *tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms), *overrides)
    assert "Epoch: 2/2, Iter: 2/2" in log and "val_reconstruction_mse" in log
    logged = {t for t in TERMS if t in log}
    if "contrastive:" in terms:  # negatives from the other rank: one crop per process is not a batch of one
        assert min(float(v) for v in re.findall(r"contrastive: ([0-9.]+)", log)) > 0.1, log[-3000:]
    assert logged == {*terms, "loss:"}, logged  # the skipped terms are not computed, so not logged
    BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4)).load_state_dict(
        torch.load(tmp_path / "models" / "model.pt", weights_only=True), strict=True
    )


@pytest.mark.slow
def test_a_two_process_run_past_its_timeout_fails_with_each_ranks_stacks(tiny_ct_phantoms, tmp_path):
    """The harness of the two-process tests: a run that outlives its timeout (1000 epochs, 20 s) fails with the ranks' Python stacks, printed when the timeout is reached, and leaves no rank running."""
    with pytest.raises(pytest.fail.Exception) as failed:
        run_two_processes(BUNDLE, *tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms), "--max_epochs", "1000",
                          timeout=20)
    message = str(failed.value)
    assert "still running after 20 s" in message
    assert message.count("most recent call first") >= 2, message[-3000:]  # faulthandler's dump, from both ranks
    assert message.count('"MainThread"') >= 2 and "libpython" in message, message[:3000]  # py-spy's, native frames
    survivors = subprocess.run(["pgrep", "-f", f"bundle_exit_probe.py run .*{tmp_path}"], capture_output=True, text=True)
    assert not survivors.stdout.strip(), survivors.stdout


@pytest.mark.slow
def test_a_failed_two_process_run_reports_the_first_ranks_error(tiny_ct_phantoms, tmp_path):
    """The harness of the two-process tests: when rank 0 fails, its own traceback leads the report, ahead of
    whatever the other rank printed when its peer went away (in CI the tail held only rank 1's gloo error)."""
    fail = "$dist.barrier() if dist.get_rank() else (_ for _ in ()).throw(ValueError('rank 0 fails on purpose'))"
    with pytest.raises(pytest.fail.Exception) as failed:
        run_two_processes(BUNDLE, *tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms), "--run_id", "fail_report",
                          "--fail_report", json.dumps(["$import torch.distributed as dist", fail]))
    tracebacks, tail = str(failed.value).split("last output:")
    cause, peer = (tracebacks.find(t) for t in ("ValueError: rank 0 fails on purpose", "Connection closed by peer"))
    assert 0 <= cause < peer, tracebacks[-3000:]  # rank 0's error first, then rank 1's at losing its peer
    # the control: rank 1's traceback and torchrun's summary push rank 0's error out of the tail, as the tail
    # alone showed it in CI
    assert "ValueError: rank 0 fails on purpose" not in tail and "Root Cause" in tail, tail


@pytest.mark.slow
def test_each_rank_caches_only_its_own_shard(tiny_ct_phantoms, tmp_path):
    """Under torchrun, rank r's CacheDataset holds a disjoint part of the training volumes; together, all of them."""
    report = "$print('SHARD', dist.get_rank(), json.dumps(sorted(d['image'] for d in @train#dataset.data)), flush=True)"
    # a run id of its own: torchrun's parser would take `--run` for its `--run-path`
    log = run_two_processes(BUNDLE, *tiny_pretrain_args(str(tmp_path), tiny_ct_phantoms), "--val_fraction", "0.34",
                            "--run_id", "shard_report", "--shard_report", json.dumps(["$import json", report]))
    # found anywhere in a line: the two processes share one stdout
    shards = {int(rank): json.loads(files) for rank, files in re.findall(r"SHARD (\d) (\[[^\]]*\])", log)}
    assert set(shards) == {0, 1}, log[-3000:]
    parser = ConfigParser()
    parser.read_config(bundle_config(BUNDLE))
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": tiny_ct_phantoms, "val_fraction": 0.34})
    train_files = sorted(d["image"] for d in parser.get_parsed_content("train#data"))
    assert len(train_files) == 2 and not set(shards[0]) & set(shards[1]), (shards, train_files)
    assert sorted(shards[0] + shards[1]) == train_files, (shards, train_files)


def test_train_workflow_properties_and_ids(tmp_path):
    workflow = ConfigWorkflow(config_file=bundle_config(BUNDLE), workflow_type="train", bundle_root=str(tmp_path))
    workflow.initialize()
    assert not workflow.check_properties()
    for id_ in ("run", "training", "network", "network_def", "train#dataset#data", "validate#dataset#data"):
        assert id_ in workflow.parser, id_


def test_every_bundle_passes_the_model_zoo_checks():
    verify = load_tool("verify_bundles").verify

    bundles = sorted(glob.glob(os.path.join(REPO, "bundles", "*")))
    assert len(bundles) == 11
    assert verify(*bundles) == bundles


@pytest.mark.slow
def test_zoo_checks_export_the_weights_the_bundle_saved(trained_root, tmp_path):
    """verify_net_in_out and ckpt_export (TorchScript) on the backbone the pre-training bundle wrote."""
    verify_saved_weights(BUNDLE, os.path.join(trained_root[0], "models", "model.pt"), tmp_path,
                         features=json.loads(TINY_UNET))
