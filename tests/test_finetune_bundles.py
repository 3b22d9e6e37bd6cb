"""The fine-tuning bundles, run the way users and MONAI Label run them."""

import glob
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import monai.bundle
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from conftest import (
    FINETUNE_BUNDLES,
    REPO,
    TINY_UNET,
    bundle_config,
    monai_bundle,
    run_command,
    run_two_processes,
    tiny_finetune_args,
    tiny_pretrain_args,
)
from hybridmim_components.data import load_datalist

# its module fixtures are built once: every test of the file in one pytest-xdist process
pytestmark = pytest.mark.xdist_group("test_finetune_bundles")

TINY = {"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_task_phantoms):
    """Each bundle trained for 2 epochs on its tiny phantoms: {bundle: (bundle_root, log)}."""
    results = {}
    for bundle in FINETUNE_BUNDLES:
        root = str(tmp_path_factory.mktemp(bundle))
        proc = run_command(
            monai_bundle("run", "training", "--config_file", bundle_config(bundle))
            + tiny_finetune_args(root, tiny_task_phantoms[bundle]),
            cwd=REPO,
        )
        assert proc.returncode == 0, bundle + proc.stdout[-3000:] + proc.stderr[-3000:]
        results[bundle] = (root, proc.stdout + proc.stderr)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_train_reports_dice_and_hd95_and_saves(trained, bundle):
    root, log = trained[bundle]
    assert "val_mean_dice" in log and "val_hd95" in log and "train_loss" in log
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    (ckpt,) = glob.glob(os.path.join(root, "models", "checkpoint_epoch=*.pt"))
    assert set(torch.load(ckpt, weights_only=False)) == {"model", "optimizer", "lr_scheduler", "trainer", "run_state"}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_validation_draws_image_label_and_prediction(trained, bundle):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(os.path.join(trained[bundle][0], "runs", "events.out.tfevents.*")):
        accumulator = EventAccumulator(events, size_guidance={"images": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
    # MONAI's TensorBoardImageHandler: input_0 the image, input_1 the label, output the prediction (animated slices)
    assert {t.split("/")[0] for t in tags} == {"input_0_HWD", "input_1_HWD", "output_HWD"}, tags


@pytest.fixture(scope="module")
def evaluated(trained, tiny_task_phantoms):
    """Each trained bundle's ``evaluate.json`` run: {bundle: bundle_root}."""
    for bundle in FINETUNE_BUNDLES:
        root, _ = trained[bundle]
        configs = f"['{bundle_config(bundle)}','{bundle_config(bundle, 'evaluate.json')}']"
        proc = run_command(
            monai_bundle("run", "--config_file", configs) + tiny_finetune_args(root, tiny_task_phantoms[bundle]),
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {bundle: trained[bundle][0] for bundle in FINETUNE_BUNDLES}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_evaluate_writes_per_case_and_aggregated_metrics(evaluated, bundle):
    root = evaluated[bundle]
    class_names = json.load(open(bundle_config(bundle)))["class_names"]
    foreground = class_names if bundle.startswith("brats") else class_names[1:]
    report = json.load(open(os.path.join(root, "eval", "metrics.json")))
    for metric in ("val_mean_dice", "val_hd95"):
        assert len(report[metric]["cases"]) == 2  # the validation fold
        assert set(report[metric]["cases"][0]) == {"filename", "mean", *foreground}
        assert set(report[metric]["summary"]) == {"mean", *foreground}
        assert os.path.isfile(os.path.join(root, "eval", f"{metric}_raw.csv"))
    dice = [c["mean"] for c in report["val_mean_dice"]["cases"]]
    assert all(0.0 <= d <= 1.0 for d in dice if not np.isnan(d))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_evaluate_scores_in_the_original_space_in_millimetres(evaluated, tiny_task_phantoms, bundle):
    """Recompute each case's Dice and HD95 from the prediction that ``evaluate.json`` wrote and the label file
    as it is on disk (its own grid, spacing from its header): they must be what the report says. The tiny
    phantoms' spacing is not the bundle's ``pixdim``, so a score on the resampled grid would differ."""
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses
    from monai.networks.utils import one_hot

    root, data, brats = evaluated[bundle], tiny_task_phantoms[bundle], bundle.startswith("brats")
    num_classes = len(json.load(open(bundle_config(bundle)))["class_names"])
    label_of = {}
    for item in json.load(open(os.path.join(data, "dataset.json")))["training"]:
        image = item["image"][0] if brats else item["image"]
        label_of[os.path.normpath(os.path.join(data, image))] = os.path.join(data, item["label"])
    report = json.load(open(os.path.join(root, "eval", "metrics.json")))
    for dice_case, hd_case in zip(report["val_mean_dice"]["cases"], report["val_hd95"]["cases"]):
        label_file = nib.load(label_of[os.path.normpath(dice_case["filename"])])
        name = os.path.basename(dice_case["filename"])[: -len(".nii.gz")]
        pred_file = nib.load(os.path.join(root, "eval", "predictions", f"{name}_seg.nii.gz"))
        assert pred_file.shape[:3] == label_file.shape and np.allclose(pred_file.affine, label_file.affine)
        label, pred = np.asarray(label_file.dataobj), torch.as_tensor(np.asarray(pred_file.dataobj))
        if brats:
            label = torch.as_tensor(ConvertToMultiChannelBasedOnBratsClasses()(label))[None].float()
            pred = pred.permute(3, 0, 1, 2)[None].float()
        else:
            label = one_hot(torch.as_tensor(label)[None, None], num_classes).float()
            pred = one_hot(pred[None, None], num_classes).float()
        spacing = [float(z) for z in label_file.header.get_zooms()[:3]]
        parser = ConfigParser()
        parser.read_config(bundle_config(bundle))
        assert tuple(spacing) != tuple(parser.get_parsed_content("pixdim"))
        dice = compute_dice(pred, label, include_background=brats)[0]
        hd95 = compute_hausdorff_distance(pred, label, include_background=brats, percentile=95, spacing=spacing)[0]
        reported_dice = [dice_case[k] for k in dice_case if k not in ("filename", "mean")]
        reported_hd95 = [hd_case[k] for k in hd_case if k not in ("filename", "mean")]
        np.testing.assert_allclose(reported_dice, dice.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(reported_hd95, hd95.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_inference_writes_nifti_with_the_input_geometry(trained, tiny_task_phantoms, bundle):
    root, _ = trained[bundle]
    data = tiny_task_phantoms[bundle]
    proc = run_command(
        monai_bundle("run", "--config_file", bundle_config(bundle, "inference.json"), "--bundle_root", root,
                     "--dataset_dir", data if bundle.startswith("brats") else os.path.join(data, "imagesTr"),
                     "--features", TINY_UNET, "--roi_size", "[32,32,32]"),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = sorted(glob.glob(os.path.join(root, "predictions", "*.nii.gz")))
    assert len(predictions) == 4
    reference = nib.load(sorted(glob.glob(os.path.join(data, "**", "*.nii.gz"), recursive=True))[0])
    pred = nib.load(predictions[0])
    assert pred.shape == reference.shape[:3] and np.allclose(pred.affine, reference.affine)
    allowed = {0, 1, 2, 4} if bundle.startswith("brats") else set(range(len(json.load(open(bundle_config(bundle)))["class_names"])))
    assert set(np.unique(pred.get_fdata()).astype(int)) <= allowed


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_net_in_out_and_torchscript_export(trained, bundle, tmp_path):
    root, _ = trained[bundle]
    meta, inference = bundle_config(bundle, "metadata.json"), bundle_config(bundle, "inference.json")
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference)  # demo settings
    monai.bundle.ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=os.path.join(root, "models", "model.pt"),
        meta_file=meta, config_file=inference, features=TINY["features"],
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    channels = json.load(open(meta))["network_data_format"]["inputs"]["image"]["num_channels"]
    out = exported(torch.rand(1, channels, 32, 32, 32))
    assert out.shape[1] == json.load(open(meta))["network_data_format"]["outputs"]["pred"]["num_channels"]


@pytest.mark.slow
def test_fewer_epochs_than_the_validation_interval_still_write_the_model(tiny_task_phantoms, tmp_path):
    """MONAI Label trains for fewer epochs than ``val_interval``: validation runs once at the end, so a model exists."""
    bundle = "msd_spleen_segmentation"
    args = tiny_finetune_args(str(tmp_path), tiny_task_phantoms[bundle])
    args[args.index("--val_interval") + 1] = "5"
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(bundle)) + args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    assert (proc.stdout + proc.stderr).count("val_mean_dice") >= 1


@pytest.mark.parametrize("bundle", [*FINETUNE_BUNDLES, "hybridmim_unet_pretrain"])
def test_schedule_follows_the_trainers_epochs(bundle):
    """MONAI Label overrides ``train#trainer#max_epochs``, not ``max_epochs``: the schedule must end with the trainer."""
    parser = ConfigParser()
    parser.read_config(bundle_config(bundle))
    parser["train#trainer#max_epochs"] = 7
    scheduler = parser.get_parsed_content("lr_scheduler")
    steps_per_epoch = parser.get_parsed_content("epoch_length") if bundle.endswith("_pretrain") else 1
    horizon = scheduler.t_total // steps_per_epoch
    assert horizon == 7


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["hybridmim_unet_pretrain", "msd_spleen_segmentation"])
def test_tracking_mlflow_logs_the_loss_and_the_validation(bundle, tiny_ct_phantoms, tiny_task_phantoms, tmp_path):
    """MONAI's ``--tracking mlflow`` (its default settings: a local SQLite store under ``output_dir``); pre-training
    records the segmentation probe there too."""
    import mlflow

    # a folder named for the bundle: MLflow caches a store per URI in this process, and pytest reuses a passed
    # test's tmp_path name once it has removed it, so the second bundle's store would read the first one's runs
    root = tmp_path / bundle
    args = (tiny_pretrain_args(str(root), tiny_ct_phantoms, probe_interval=1) if bundle.endswith("_pretrain")
            else tiny_finetune_args(str(root), tiny_task_phantoms[bundle]))
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(bundle)) + args
                       + ["--tracking", "mlflow"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (store,) = glob.glob(str(root / "**" / "mlruns.db"), recursive=True)
    # a client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for later subprocesses
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    logged = set(run.data.metrics)
    validation = {"val_reconstruction_mse", "probe_dice"} if bundle.endswith("_pretrain") else {"val_mean_dice"}
    assert {"train_loss", *validation} <= logged, logged
    # the values MLflow recorded are the ones the run printed, epoch by epoch (the log rounds to 4 decimals)
    printed = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if "Metrics -- " in line:
            for name, value in re.findall(r"(\w+): (-?[0-9.]+(?:e-?[0-9]+)?)", line.split("Metrics -- ", 1)[1]):
                printed.setdefault(name, []).append(float(value))
    for name in validation:
        recorded = [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
        assert len(recorded) == len(printed[name]) >= 2, (name, recorded, printed.get(name))
        assert recorded == pytest.approx(printed[name], abs=5e-5), (name, recorded, printed[name])


@pytest.mark.slow
def test_pretrained_unet_checkpoint_loads(tiny_ct_phantoms, tiny_task_phantoms, tmp_path):
    """models/model.pt of the pre-training bundle is the starting point of a fine-tuning run."""
    pre_root, fine_root = str(tmp_path / "pre"), str(tmp_path / "fine")
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config("hybridmim_unet_pretrain"))
        + tiny_pretrain_args(pre_root, tiny_ct_phantoms), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pretrained = os.path.join(pre_root, "models", "model.pt")
    args = tiny_finetune_args(fine_root, tiny_task_phantoms["msd_spleen_segmentation"])
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config("msd_spleen_segmentation"))
        + args + ["--pretrained", pretrained, "--max_epochs", "1"], cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "loaded     80 of 82 tensors" in log and "final_conv.weight (1, 4, 1, 1, 1) -> (2, 4, 1, 1, 1)" in log
    # a network of other settings is refused: by the plan, before training; without a plan, by the loader's report
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config("msd_spleen_segmentation"))
        + args + ["--pretrained", pretrained, "--features", "[8,8,16,32,64,8]"], cwd=REPO)
    assert proc.returncode != 0 and "features: pre-trained [4, 4, 8, 8, 16, 4], fine-tuning [8, 8, 16, 32, 64, 8]" in proc.stderr
    os.remove(os.path.join(pre_root, "models", "plan.json"))
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config("msd_spleen_segmentation"))
        + args + ["--pretrained", pretrained, "--features", "[8,8,16,32,64,8]"], cwd=REPO)
    assert proc.returncode != 0 and "only 0% of the weights matched" in proc.stderr


@pytest.mark.parametrize("network,extra", [("swinunetr", ["--swin_feature_size", "12"]), ("unetr", ["--unetr_hidden_size", "48"]),
                                           ("segresnet", ["--segresnet_init_filters", "8"])])
def test_network_override(network, extra):
    parser = ConfigParser()
    parser.read_config(bundle_config("btcv_multiorgan_segmentation"))
    parser.update({"network_def": f"@{network}_def", "roi_size": [64, 64, 64], "unetr_hidden_size": 48, "swin_feature_size": 12,
                   "segresnet_init_filters": 8})
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == {"swinunetr": "SwinUNETR", "unetr": "UNETR", "segresnet": "SegResNet"}[network]
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 1, 64, 64, 64)).shape == (1, 14, 64, 64, 64)


@pytest.mark.slow
def test_segresnet_from_scratch_trains_evaluates_and_infers(tiny_task_phantoms, tmp_path):
    """The paper's supervised SegResNet row: ``--network_def "@segresnet_def"`` through train, evaluate, inference."""
    bundle, root = "msd_spleen_segmentation", str(tmp_path)
    net = ["--network_def", "@segresnet_def", "--segresnet_init_filters", "8", "--roi_size", "[32,32,32]"]
    args = ["--bundle_root", root, "--dataset_dir", tiny_task_phantoms[bundle], "--num_folds", "2", "--num_workers", "0", *net]
    for configs in ([bundle_config(bundle)], [bundle_config(bundle), bundle_config(bundle, "evaluate.json")]):
        proc = run_command(monai_bundle("run", "--config_file", json.dumps(configs), *args, "--max_epochs", "1"), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(os.path.join(root, "models", "model.pt"), weights_only=True)["conv_final.2.conv.weight"].shape[0] == 2
    assert json.load(open(os.path.join(root, "eval", "metrics.json")))["val_mean_dice"]["cases"]
    images = os.path.join(tiny_task_phantoms[bundle], "imagesTr")
    proc = run_command(monai_bundle("run", "--config_file", bundle_config(bundle, "inference.json"), "--bundle_root", root,
                                    "--dataset_dir", images, *net), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(glob.glob(os.path.join(root, "predictions", "*_seg.nii.gz"))) == len(os.listdir(images))


def epoch_losses(log: str) -> dict[int, float]:
    """The mean training loss of each epoch, from a bundle run's log."""
    found: dict[int, list[float]] = {}
    for epoch, loss in re.findall(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- train_loss: ([\d.]+)", log):
        found.setdefault(int(epoch), []).append(float(loss))
    return {e: float(np.mean(v)) for e, v in found.items()}


@pytest.mark.slow
def test_the_btcv_demo_recipe_learns_several_organs(tiny_task_phantoms, tmp_path):
    """The BTCV bundle's own recipe (widths, learning rate, augmentation: only the crop, the spacing and the epochs
    made small): the training loss falls below 70 % of the first epoch's, and the evaluation finds more than one
    organ (Dice above 0.1). The negative control: the same run at learning rate 0 passes neither check."""
    bundle, data = "btcv_multiorgan_segmentation", tiny_task_phantoms["btcv_multiorgan_segmentation"]
    evaluate = json.dumps([bundle_config(bundle), bundle_config(bundle, "evaluate.json")])

    def run(root: str, *extra: str) -> tuple[float, int]:
        args = ["--bundle_root", root, "--dataset_dir", data, "--roi_size", "[32,32,32]", "--num_folds", "2",
                "--max_epochs", "40", "--val_interval", "40", "--num_workers", "0", "--target_spacing",
                "[1.5,1.5,2.5]", *extra]
        proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(bundle), *args), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = epoch_losses(proc.stdout + proc.stderr)
        proc = run_command(monai_bundle("run", "--config_file", evaluate, *args), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.load(open(os.path.join(root, "eval", "metrics.json")))["val_mean_dice"]["summary"]
        organs = sum(1 for name, s in summary.items() if name != "mean" and s["mean"] > 0.1)
        return losses[max(losses)] / losses[1], organs

    ratio, organs = run(str(tmp_path / "demo"))
    assert ratio < 0.7 and organs >= 2, (ratio, organs)
    ratio, organs = run(str(tmp_path / "control"), "--learning_rate", "0", "--pretrained_learning_rate", "0")
    assert ratio > 0.7 and organs < 2, (ratio, organs)


@pytest.mark.slow
def test_multi_gpu_config_on_cpu(tiny_task_phantoms, tmp_path):
    bundle = "msd_spleen_segmentation"
    run_two_processes(bundle, *tiny_finetune_args(str(tmp_path), tiny_task_phantoms[bundle]))
    assert os.path.isfile(tmp_path / "models" / "model.pt")


@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_train_workflow_properties(bundle, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=bundle_config(bundle), workflow_type="train", bundle_root=str(tmp_path))
    workflow.initialize()
    assert not workflow.check_properties()
    infer = ConfigWorkflow(config_file=bundle_config(bundle, "inference.json"), workflow_type="infer", bundle_root=str(tmp_path))
    infer.initialize()
    assert not infer.check_properties()


TINY_PROTOCOL = {
    "methods": ["reconstruction_only", "modelsgenesis"],
    "data": {"corpus": 3, "pool": 3, "development": 1, "test": 2, "phantom_shape": [48, 48, 40]},
    # a plateau after two probes: min_gain 1 can never be passed
    "pretraining": {"probe_interval": 1, "max_epochs": 4, "epoch_length": 2, "patience": 1, "min_gain": 1.0,
                    "overrides": {"features": TINY["features"], "roi_size": [32, 32, 32], "reconstruction_roi": [16, 16, 16],
                                  "sub_volume_size": 16, "patch_size": 8, "warmup_steps": 1, "val_interval": 1}},
    "steps": 2, "budgets": [1, 2], "seeds": [0], "development": {"budget": 1, "seeds": [100]},
    "gate": {"budget": 2, "seed": 100, "recipe": {"learning_rate": 1e-3, "steps": 2}, "min_dice": 0.0,
             "min_classes_above_half": 0},
    # scratch's one candidate names its own step budget (4): the protocol's (2) is the others'
    "recipes": {"scratch": {"lr 1e-3, 4 steps": {"learning_rate": 1e-3, "steps": 4}},
                "pretrained": {"all": {"transfer": "all"},
                               "encoder, frozen": {"transfer": "encoder", "warmup_fraction": 0.5, "frozen_fraction": 0.5}}},
    "finetune_overrides": {**TINY, "num_workers": 0},
}


@pytest.mark.slow
def test_label_efficiency_protocol_runs_and_resumes(tmp_path, capsys):
    """The protocol on tiny settings: four disjoint phantom sets, a pre-training on the preprocessed corpus that
    stops at its probe plateau, the recipe chosen on the development set, final runs scored once on the test set
    by evaluate.json, the paired report; a rerun runs nothing, and the protocol cannot change."""
    from hybridmim_studies import label_efficiency as lbl

    out = str(tmp_path / "study")
    report = lbl.main(output_dir=out, protocol=TINY_PROTOCOL)
    study = lbl.LabelEfficiencyStudy(out, TINY_PROTOCOL)
    with open(os.path.join(out, "corpus", "manifest", "part-000-of-001.jsonl")) as f:  # the corpus, preprocessed
        assert len([json.loads(line) for line in f]) == 3
    for method, bundle_method in (("reconstruction_only", "hybridmim"), ("modelsgenesis", "modelsgenesis")):
        pre = report["pretrainings"][method]
        assert pre["steps"] == 4 and [e for e, _ in pre["probe"]] == [0, 1, 2]  # stopped by the plateau, not the cap of 8
        with open(os.path.join(out, "pretrain", method, "models", "plan.json")) as f:
            assert json.load(f)["method"]["name"] == bundle_method  # each method ran its own bundle
        assert set(report["finals"][method]) == {"1", "2"}  # and its weights fine-tuned the one scratch network
    # the development choice is the best mean development Dice (ties to the first listed); no test set was read
    for init, c in report["choice"].items():
        best = max(s["dice"] for s in c["scores"].values())
        assert c["chosen"] == next(n for n, s in c["scores"].items() if s["dice"] >= best - 0.005)
    assert not [p for p, _, files in os.walk(os.path.join(out, "development")) if "metrics.json" in files]
    with open(os.path.join(study.development_root("scratch", "lr 1e-3, 4 steps", 100), "result.json")) as f:
        assert json.load(f)["steps"] == 4  # a candidate's own step budget is what the development set scores
    finals = report["finals"]
    for init, steps in (("scratch", 4), ("reconstruction_only", 2)):
        for budget in ("1", "2"):
            run = finals[init][budget]["0"]
            assert len(run["test"]) == 2 and run["steps"] == steps  # the recipe's step budget, whatever the volumes
            assert os.path.isfile(os.path.join(out, "final", init, f"budget_{budget}", "seed_0", "eval", "metrics.json"))
    # paired: one seed, the same volumes and crops for every initialisation; nested budgets
    for budget in ("1", "2"):
        assert finals["scratch"][budget]["0"]["crops"][:2] == finals["reconstruction_only"][budget]["0"]["crops"]
    assert set(finals["scratch"]["1"]["0"]["train"]) < set(finals["scratch"]["2"]["0"]["train"])
    # the difference to scratch, recomputed from the per-case test Dice
    for budget in ("1", "2"):
        a, b = ({os.path.basename(c["filename"]): c["mean"] for c in finals[i][budget]["0"]["test"]} for i in ("reconstruction_only", "scratch"))
        paired = report["summary"]["vs_scratch"][budget]["reconstruction_only"]
        assert paired["mean"] == pytest.approx(np.mean([a[k] - b[k] for k in a])) and paired["low"] <= paired["high"]
    # the linear head on each frozen encoder, fitted on the pool, scored on the test set; the weights are loaded
    heads = report["linear_heads"]
    assert set(heads) == {lbl.RANDOM, "reconstruction_only", "modelsgenesis"}
    assert all(h["fitted_on"] == 3 and h["scored_on"] == 2 and len(h["dice_per_class"]) == 13 for h in heads.values())
    assert all(heads[m]["dice"] != heads[lbl.RANDOM]["dice"] for m in ("reconstruction_only", "modelsgenesis"))
    # negative control: the random encoder's weights in the place of a pre-training's give the random score exactly
    control = str(tmp_path / "control")
    control_study = lbl.LabelEfficiencyStudy(control, report["protocol"])
    config_file, overrides = control_study.pretraining_bundle("reconstruction_only")
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides)
    set_determinism(seed=0)
    os.makedirs(os.path.join(control, "pretrain", "reconstruction_only", "models"))
    torch.save(parser.get_parsed_content("backbone").state_dict(),
               os.path.join(control, "pretrain", "reconstruction_only", "models", "model.pt"))
    sets = {name: load_datalist(os.path.join(out, "data", name)) for name in ("pool", "test")}
    assert control_study.linear_head("reconstruction_only", sets)["dice"] == heads[lbl.RANDOM]["dice"]
    # the gate ran first, scored per class on the development set; every final run has its learning curve, by
    # steps, its last point at the run's end; the convergence column is computed from them
    gate = report["summary"]["gate"]
    assert gate["passed"] and len(gate["classes"]) == 13
    for init, steps in (("scratch", 4), ("reconstruction_only", 2)):
        curve = finals[init]["1"]["0"]["curve"]
        assert curve and curve[-1][0] == steps and all(0 <= d <= 1 for _, d in curve)
    for budget in ("1", "2"):
        c = report["summary"]["convergence"][budget]
        scratch_final = np.mean([finals["scratch"][budget]["0"]["curve"][-1][1]])
        assert c["target"] == pytest.approx(0.9 * scratch_final)
        assert set(c["steps"]) == {"scratch", "reconstruction_only", "modelsgenesis"}
        for init, curve in c["curves"].items():
            expected = next((s for s, d in curve if d >= c["target"]), None)
            assert c["steps"][init] == expected
    md = (tmp_path / "study" / "results.md").read_text()
    for heading in ("## The gate: does scratch learn?", "## Convergence", "## Test Dice", "paired by seed and test case", "## Dice per organ", "ranking against fine-tuning",
                    "linear head, on the test set", "chosen on the development set", "CPU-hours"):
        assert heading in md
    assert os.path.getsize(os.path.join(out, "results.png")) > 0

    # the negative control of the gate: a scratch that must reach Dice 1.1 stops the study before any pre-training
    failing = str(tmp_path / "failing")
    with pytest.raises(RuntimeError, match="the gate failed: scratch at 2 labelled volumes"):
        lbl.main(output_dir=failing, protocol={**TINY_PROTOCOL, "gate": {**TINY_PROTOCOL["gate"], "min_dice": 1.1}})
    assert os.path.isfile(os.path.join(failing, "gate", "result.json")) and not os.path.exists(os.path.join(failing, "pretrain"))

    capsys.readouterr()
    # a resume in a fresh checkout, which has no corpus (it is not committed): finished pre-trainings need none
    shutil.rmtree(os.path.join(out, "corpus"))
    shutil.rmtree(os.path.join(out, "data", "corpus"))
    again = lbl.main(output_dir=out, protocol=TINY_PROTOCOL)
    assert "===" not in capsys.readouterr().out and again["finals"] == report["finals"]  # nothing ran again
    assert not os.path.exists(os.path.join(out, "corpus")) and not os.path.exists(os.path.join(out, "data", "corpus"))
    with pytest.raises(ValueError, match=r"differs in \['steps'\]"):
        lbl.main(output_dir=out, protocol={**TINY_PROTOCOL, "steps": 3})
    os.remove(os.path.join(out, "final", "scratch", "budget_2", "seed_0", "result.json"))
    partial = lbl.main(output_dir=out, protocol=TINY_PROTOCOL, report_only=True)
    assert "1 final runs not done yet:\n  scratch, 2 labelled, seed 0" in capsys.readouterr().out
    assert "2" not in partial["finals"]["scratch"] and "scratch" not in partial["summary"]["dice"]["2"]
    # an unfinished development stage: the finished candidates are reported, and nothing is chosen where one
    # is missing, since the missing one could win; the finished initialisations keep their choice
    os.remove(os.path.join(out, "choice.json"))
    os.remove(os.path.join(study.development_root("reconstruction_only", "encoder, frozen", 100), "result.json"))
    pending = lbl.main(output_dir=out, protocol=TINY_PROTOCOL, report_only=True)["choice"]
    assert pending["reconstruction_only"]["chosen"] is None and list(pending["reconstruction_only"]["scores"]) == ["all"]
    for init in ("scratch", "modelsgenesis"):
        assert pending[init]["chosen"] == report["choice"][init]["chosen"]
        assert pending[init]["scores"] == report["choice"][init]["scores"]
    assert "| reconstruction_only | (2 candidates; 1 finished) | | pending |" in (tmp_path / "study" / "results.md").read_text()
    assert not os.path.isfile(os.path.join(out, "choice.json"))  # a report chooses nothing


@pytest.mark.slow
def test_mri_pretraining_recipe_of_the_docs(tiny_task_phantoms, tmp_path):
    """The 4-channel pre-training command of hybridmim_unet_pretrain's docs, whose weights fit the BraTS bundle."""
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config("hybridmim_unet_pretrain"))
        + tiny_pretrain_args(str(tmp_path), tiny_task_phantoms["brats_tumor_segmentation"])
        + ["--in_channels", "4", "--pixdim", "[1.0,1.0,1.0]", "--probe_interval", "0",
           "--load_and_scale#4", "{'_target_': 'ScaleIntensityRangePercentilesd', 'keys': 'image', 'lower': 0.5, "
           "'upper': 99.5, 'b_min': 0.0, 'b_max': 1.0, 'clip': True, 'channel_wise': True}",
           "--load_and_scale#5#select_fn", "$lambda x: x > 0"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    parser = ConfigParser()
    parser.read_config(bundle_config("brats_tumor_segmentation"))
    parser.update({"features": TINY["features"]})
    net = parser.get_parsed_content("network_def")
    mismatched = {k for k, v in net.state_dict().items() if v.shape != weights[k].shape}
    assert mismatched == {"final_conv.weight", "final_conv.bias"}  # only the new segmentation head


@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_paper_settings_overlay(bundle):
    """The paper's fine-tuning recipe: 96³ crops (BraTS 128³), the paper's UNet widths, AdamW at 1e-4, a 50-epoch
    linear warm-up then cosine decay, and the epochs of the paper's section 4 (BraTS 300, BTCV 2000, MSD 600)."""
    parser = ConfigParser()
    parser.read_config([bundle_config(bundle), bundle_config(bundle, "paper_settings.json")])
    side = 128 if bundle.startswith("brats") else 96
    assert parser.get_parsed_content("roi_size") == [side] * 3
    assert list(parser.get_parsed_content("validate#inferer").roi_size) == [side] * 3
    network = parser.get_parsed_content("network_def")
    assert network.conv_0.conv_0.conv.out_channels == 64 and network.down_4.convs.conv_0.conv.out_channels == 512
    epochs = {"brats": 300, "btcv": 2000, "msd": 600}[bundle.split("_")[0]]
    assert parser.get_parsed_content("max_epochs") == epochs
    # the paper's CT crops are positive/negative balanced, whatever the demo samples (the liver demo's by class)
    crop = "RandSpatialCropSamplesd" if bundle.startswith("brats") else "RandCropByPosNegLabeld"
    assert parser.config["train"]["augmentation"][1]["_target_"] == crop
    scheduler = parser.get_parsed_content("lr_scheduler")
    optimizer = scheduler.optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-5
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[25] == pytest.approx(0.5e-4) and max(lrs) == pytest.approx(1e-4)
    assert int(np.argmax(lrs)) == 50 and lrs[-1] < 1e-7


@pytest.mark.slow
def test_training_starts_with_the_dataset_check(tiny_task_phantoms, tmp_path):
    """A dataset with two problems stops training before anything is built, with both files named."""
    data = str(tmp_path / "data")
    shutil.copytree(tiny_task_phantoms["msd_spleen_segmentation"], data)
    labels = sorted(glob.glob(os.path.join(data, "labelsTr", "*.nii.gz")))
    images = sorted(glob.glob(os.path.join(data, "imagesTr", "*.nii.gz")))
    label = nib.load(labels[1])
    nib.save(nib.Nifti1Image(np.full(label.shape, 2, np.uint8), label.affine, label.header), labels[1])
    image = nib.load(images[2])
    values = image.get_fdata(dtype=np.float32)
    values[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(values, image.affine), images[2])
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config("msd_spleen_segmentation"))
                       + tiny_finetune_args(str(tmp_path / "run"), data), cwd=REPO)
    assert proc.returncode != 0
    assert "2 problem(s)" in proc.stderr and labels[1] in proc.stderr and images[2] in proc.stderr, proc.stderr[-3000:]
    assert "outside the task's labels [0, 1]" in proc.stderr and "NaN" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "models")


def _doc_commands(bundle: str) -> list[dict]:
    """The ``python -m monai.bundle run`` commands of a bundle's "Reproducing the paper" section, in order:
    ``{"configs": [...], "args": {key: value}}`` with values as the command line gives them (JSON where it is)."""
    import shlex

    text = open(os.path.join(REPO, "bundles", bundle, "docs", "README.md")).read()
    section = text.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.replace("\\\n", " ").splitlines():
        if not line.startswith("python -m monai.bundle run"):
            continue
        words = shlex.split(line)[4:]
        words = words[1:] if words[0] == "training" else words
        args = {}
        for key, value in zip(words[::2], words[1::2]):
            try:
                args[key.lstrip("-")] = json.loads(value)
            except json.JSONDecodeError:
                args[key.lstrip("-")] = value
        configs = [os.path.join(REPO, p) for p in json.loads(args.pop("config_file").replace("'", '"'))]
        commands.append({"configs": configs, "args": args})
    return commands


@pytest.mark.slow
@pytest.mark.parametrize("bundle", FINETUNE_BUNDLES)
def test_reproduction_recipes_of_the_docs(bundle, tmp_path):
    """Each recipe of the docs (pre-train, fine-tune, evaluate) at the paper's sizes: its config files exist, and
    the backbone the pre-training command saves loads into the network the fine-tuning command builds, every
    tensor but the output layer's."""
    commands = _doc_commands(bundle)
    assert commands and len(commands) % 3 == 0
    for pretrain, finetune, evaluate in zip(commands[::3], commands[1::3], commands[2::3]):
        assert all(os.path.isfile(c) for cmd in (pretrain, finetune, evaluate) for c in cmd["configs"])
        assert finetune["args"]["pretrained"] == pretrain["args"]["bundle_root"] + "/models/model.pt"
        assert evaluate["args"].get("network_def") == finetune["args"].get("network_def")
        source = ConfigParser()
        source.read_config(pretrain["configs"])
        backbone = source.get_parsed_content("network_def").backbone
        path = str(tmp_path / "model.pt")
        torch.save(backbone.state_dict(), path)
        target = ConfigParser()
        target.read_config(finetune["configs"])
        target.update({k: v for k, v in finetune["args"].items() if k not in ("bundle_root", "dataset_dir")})
        target["pretrained"] = path
        network = target.get_parsed_content("network")  # load_pretrained: fails below half of the tensors
        saved, loaded = backbone.state_dict(), network.state_dict()
        head = ("final_conv.", "out.")
        assert all(k in saved and torch.equal(saved[k], v) for k, v in loaded.items() if not k.startswith(head))
        assert target.get_parsed_content("in_channels") == source.get_parsed_content("in_channels")
        side = 128 if bundle.startswith("brats") else 96
        assert target.get_parsed_content("roi_size") == [side] * 3 == source.get_parsed_content("roi_size")
