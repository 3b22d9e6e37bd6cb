"""hybridmim_studies.comparison (tools/compare_methods.py): the paper's comparison, methods × tasks, run as real bundle runs."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from monai.bundle import ConfigParser

from conftest import REPO

from hybridmim_studies import comparison as cm
from hybridmim_studies.runs import bundle_configs, folder_name, resumable

from hybridmim_components.data import load_datalist

RECIPES = os.path.join(REPO, "docs", "comparison")
TINY_NET = {"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32]}
TINY_PRE = {**TINY_NET, "reconstruction_roi": [16, 16, 16], "sub_volume_size": 16, "patch_size": 8}
TINY_RECIPE = {
    "title": "tiny",
    "tasks": {"Spleen": {"bundle": "msd_spleen_segmentation", "folds": [0, 1],
                         "overrides": {**TINY_NET, "max_epochs": 2, "val_interval": 1, "num_workers": 0, "num_folds": 2,
                                       "segresnet_init_filters": 8}}},
    "pretraining_overrides": {"max_epochs": 1, "epoch_length": 2, "probe_interval": 0, "num_workers": 0,
                              "val_interval": 1, "roi_size": [32, 32, 32]},
    "rows": {
        "UNet from scratch": {},
        "SegResNet from scratch": {"overrides": {"network_def": "@segresnet_def"}},
        "HybridMIM (UNet)": {"pretrain": {"bundle": "hybridmim_unet_pretrain", "overrides": TINY_PRE},
                             "paper": {"Spleen": {"dice": 96.05, "hd95": 0.2}}},
        "HybridMIM* (UNet)": {"pretrain": {"bundle": "hybridmim_unet_pretrain", "overrides": TINY_PRE, "corpus": "task"}},
        "MAE (UNETR)": {"pretrain": {"bundle": "mae_vit_pretrain", "overrides": {"hidden_size": 48, "mlp_dim": 96}}},
    },
}


@pytest.mark.slow
def test_comparison_runs_every_cell_and_resumes(tiny_task_phantoms, tmp_path, capsys):
    """Scratch rows on the network they name, pre-trained rows on the network their weights were saved for, generic
    and task-specific corpora, every fold scored by evaluate.json; a rerun runs nothing."""
    from hybridmim_components.phantoms import write_ct_phantoms

    corpus = write_ct_phantoms(str(tmp_path / "corpus"), num_subjects=2, seed=10000, shape=(48, 48, 40), task="organs")
    out = str(tmp_path / "compare")
    spleen = tiny_task_phantoms["msd_spleen_segmentation"]
    report = cm.main(recipe=TINY_RECIPE, output_dir=out, corpus=corpus, data={"Spleen": spleen})
    assert len(report["runs"]) == 5 * 2  # rows × folds

    def plan(*parts):
        with open(os.path.join(out, *parts, "models", "plan.json")) as f:
            return json.load(f)

    # the corpora: generic pre-training read the 2 corpus volumes; the task-specific one, per fold, the fold's 2
    # training images and none that the fold scores (the leakage check reads what the pre-training read)
    assert plan("pretrain", "HybridMIM__UNet_")["data"]["volumes"] == 2
    task_images = {os.path.basename(item["image"]) for item in load_datalist(spleen)}
    for fold in (0, 1):
        pre_root = os.path.join(out, "pretrain", "HybridMIM___UNet_", "Spleen", f"fold_{fold}")
        read = pretraining_images(pre_root)
        scored = scored_images(os.path.join(out, "finetune", "Spleen", "HybridMIM___UNet_", f"fold_{fold}"))
        assert len(read) == 2 and len(scored) == 2 and not read & scored
        assert read | scored == task_images
        assert scored & task_images  # the negative control: pre-training on the task's images, as before, leaks
    # one preprocessing per table: every pre-training and every fine-tuning of the task at the task's
    for root in [os.path.join("pretrain", "HybridMIM__UNet_"), os.path.join("pretrain", "HybridMIM___UNet_", "Spleen", "fold_0"),
                 os.path.join("pretrain", "MAE__UNETR_")] + [os.path.join("finetune", "Spleen", folder_name(r), "fold_0")
                                                             for r in TINY_RECIPE["rows"]]:
        assert plan(root)["spacing"] == [3.0, 3.0, 4.0], root  # the bundle's, which the recipe does not override
        assert plan(root)["intensity"]["window"] == [-175.0, 250.0], root
    # the learning curves: every run's validation Dice at each of its 2 epochs, and the convergence columns
    for run in report["runs"].values():
        assert [e for e, _ in run["curve"]] == [1, 2] and all(0 <= d <= 1 for _, d in run["curve"])
    conv = report["convergence"]["Spleen"]
    assert conv["scratch"] == "UNet from scratch" and conv["contrastive"] is None
    scratch_curve = report["summary"]["Spleen"]["UNet from scratch"]["curve"]
    assert conv["target"] == pytest.approx(0.9 * scratch_curve[-1][1])
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    # the fine-tuning networks: the row's own, or the one the pre-trained weights were saved for, at their widths
    finetuned = {row: plan("finetune", "Spleen", folder_name(row), "fold_0")["network"]["class"] for row in TINY_RECIPE["rows"]}
    assert finetuned == {"UNet from scratch": "BasicUNet", "SegResNet from scratch": "SegResNet", "HybridMIM (UNet)": "BasicUNet",
                         "HybridMIM* (UNet)": "BasicUNet", "MAE (UNETR)": "UNETR"}
    mae = torch.load(os.path.join(out, "finetune", "Spleen", "MAE__UNETR_", "fold_0", "models", "model.pt"), weights_only=True)
    assert mae["vit.norm.weight"].shape == (48,)  # the MAE weights' width, not the bundle's default 768
    # each cell's numbers recomputed from its fold's metrics.json (mean over cases of the case means)
    for row in TINY_RECIPE["rows"]:
        folds = []
        for fold in (0, 1):
            with open(os.path.join(out, "finetune", "Spleen", folder_name(row), f"fold_{fold}", "eval", "metrics.json")) as f:
                metrics = json.load(f)
            assert len(metrics["val_mean_dice"]["cases"]) == 2  # the fold's 2 validation volumes
            folds.append([np.mean([c["mean"] for c in metrics[m]["cases"] if not math.isnan(c["mean"])])
                          for m in ("val_mean_dice", "val_hd95")])
        cell = report["summary"]["Spleen"][row]
        assert cell["folds"] == 2
        assert cell["dice"] == pytest.approx(np.mean([d for d, _ in folds]))
        assert cell["hd95"] == pytest.approx(np.mean([h for _, h in folds]))
    # two different initialisations on the same crops do not give the same model (the table is not one run copied)
    assert report["summary"]["Spleen"]["UNet from scratch"]["dice"] != report["summary"]["Spleen"]["HybridMIM (UNet)"]["dice"]
    md = open(os.path.join(out, "results.md")).read()
    assert "[paper 96.05 / 0.2]" in md and "## Spleen: Dice per class" in md and "CPU-hours" in md
    assert "## Spleen: learning curves" in md and "speed-up vs scratch" in md

    capsys.readouterr()
    again = cm.main(recipe=TINY_RECIPE, output_dir=out, corpus=corpus, data={"Spleen": spleen})
    assert "===" not in capsys.readouterr().out and again["summary"] == report["summary"]
    os.remove(os.path.join(out, "finetune", "Spleen", "SegResNet_from_scratch", "fold_1", "result.json"))
    partial = cm.main(recipe=TINY_RECIPE, output_dir=out, report_only=True)
    assert "1 runs not done yet:\n  SegResNet from scratch, Spleen, fold 1" in capsys.readouterr().out
    assert partial["summary"]["Spleen"]["SegResNet from scratch"]["folds"] == 1
    # a checkout that holds a pre-training's result.json but not its weights (too big to commit) pre-trains again
    # for a fold still to fine-tune, instead of fine-tuning from a missing file
    weights = os.path.join(out, "pretrain", "HybridMIM__UNet_", "models", "model.pt")
    os.remove(weights)
    os.remove(os.path.join(out, "finetune", "Spleen", "HybridMIM__UNet_", "fold_1", "result.json"))
    capsys.readouterr()
    cm.main(recipe=TINY_RECIPE, output_dir=out, corpus=corpus, data={"Spleen": spleen})
    log = capsys.readouterr().out
    assert "=== pre-training" in log and "HybridMIM__UNet_/fold_1" in log and os.path.isfile(weights), log[-2000:]


def scored_images(finetune_root: str) -> set[str]:
    """The images that evaluate.json scored for a fold (its metrics.json), by file name."""
    with open(os.path.join(finetune_root, "eval", "metrics.json")) as f:
        return {os.path.basename(case["filename"]) for case in json.load(f)["val_mean_dice"]["cases"]}


def pretraining_images(pretrain_root: str) -> set[str]:
    """The images a pre-training read, by file name: its datalist, checked against the hash of the volumes that its
    plan.json recorded (so the datalist is what the bundle read, not what the tool meant it to)."""
    import hashlib

    items = load_datalist(os.path.join(pretrain_root, "datalist.json"))
    with open(os.path.join(pretrain_root, "models", "plan.json")) as f:
        data = json.load(f)["data"]
    images = sorted(json.dumps(item["image"]) for item in items)
    assert data == {"volumes": len(images), "sha1": hashlib.sha1("\n".join(images).encode()).hexdigest()}
    return {os.path.basename(item["image"]) for item in items}


@pytest.mark.parametrize("change,message", [
    (lambda r: r["rows"]["MAE (UNETR)"]["pretrain"]["overrides"].update(intensity_range=[-1000, 1000]),
     r"rows.MAE \(UNETR\).pretrain.overrides sets intensity_range \[-1000, 1000\], but every row of task Spleen runs "
     r"at window \[-175.0, 250.0\]"),
    (lambda r: r["rows"]["SegResNet from scratch"]["overrides"].update(pixdim=[1.0, 1.0, 1.0]),
     r"rows.SegResNet from scratch.overrides sets pixdim \[1.0, 1.0, 1.0\], but every row of task Spleen runs at "
     r"spacing \[3.0, 3.0, 4.0\]"),
    (lambda r: r.update(pretraining_overrides={**r["pretraining_overrides"], "pixdim": [2, 2, 2]}),
     r"pretraining_overrides sets pixdim"),
    (lambda r: r["tasks"]["Spleen"].update(window=[-1000, 1000]),  # the task's stated window, against a row's
     r"rows.HybridMIM \(UNet\).pretrain.overrides sets intensity_range \[-175, 250\], but every row of task Spleen "
     r"runs at window \[-1000.0, 1000.0\]"),
])
def test_a_table_whose_rows_would_be_preprocessed_differently_is_refused(change, message):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["rows"]["HybridMIM (UNet)"]["pretrain"]["overrides"] = {**TINY_PRE, "intensity_range": [-175, 250]}
    cm.read_recipe(recipe)  # the control: an override that agrees with the task's window is no difference
    change(recipe)
    with pytest.raises(ValueError, match=message):
        cm.read_recipe(recipe)


def test_each_paper_recipe_states_one_preprocessing_per_task_and_the_old_ones_are_refused():
    for name in ("paper_table1_btcv", "paper_table2_liver_spleen", "paper_table3_brats", "paper_table4_ablation_brats"):
        recipe = cm.read_recipe(os.path.join(RECIPES, f"{name}.json"))
        for task in recipe["tasks"].values():
            assert "spacing" in task and ("window" in task) != task["bundle"].startswith("brats")
    # the negative control: table 1 as it was (SimMIM's pre-training at -1000..1000 HU, the scratch rows at -175..250)
    recipe = cm.read_recipe(os.path.join(RECIPES, "paper_table1_btcv.json"))
    recipe["rows"]["UNetFormer (here SimMIM on SwinUNETR)"]["pretrain"]["overrides"]["intensity_range"] = [-1000, 1000]
    with pytest.raises(ValueError, match=r"UNetFormer \(here SimMIM on SwinUNETR\).pretrain.overrides sets intensity_range"):
        cm.read_recipe(recipe)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda r: r["tasks"]["Spleen"].update(bundle="msd_heart"), r"tasks.Spleen.bundle 'msd_heart' is not a bundle"),
    (lambda r: r["tasks"]["Spleen"].update(config_files=["nope.json"]), r"tasks.Spleen.config_files \['nope.json'\]"),
    (lambda r: r["rows"]["MAE (UNETR)"]["pretrain"].update(corpus="all"), r"rows.MAE \(UNETR\).pretrain needs"),
    (lambda r: r["rows"].update({"HybridMIM  (UNet)": {}}), r"would share the folder"),
    (lambda r: r["rows"]["UNet from scratch"].update(paper={"Liver": {"dice": 1}}), r"names tasks \['Liver'\]"),
])
def test_a_bad_recipe_is_refused_naming_its_key(change, message):
    recipe = copy.deepcopy(TINY_RECIPE)
    change(recipe)
    with pytest.raises(ValueError, match=message):
        cm.read_recipe(recipe)
    cm.read_recipe(TINY_RECIPE)  # the unchanged recipe passes: the check is the change's


def test_data_for_a_task_the_recipe_lacks_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--data names tasks \['Liver'\]"):
        cm.main(recipe=TINY_RECIPE, output_dir=str(tmp_path), data={"Liver": "/data/liver"}, report_only=True)


@pytest.mark.parametrize("bundles,channels", [(["brats_tumor_segmentation"], 4),
                                             (["brats_tumor_segmentation", "msd_spleen_segmentation"], 1)],
                         ids=["BraTS only: brain MRI", "the control, BraTS and a CT task: CT"])
def test_without_a_corpus_a_brats_recipe_pre_trains_on_brain_phantoms(bundles, channels, tmp_path):
    """A BraTS table's generic pre-training reads four-channel brain phantoms (its fine-tuning's input), not CT."""
    recipe = {"tasks": {f"task{i}": {"bundle": b} for i, b in enumerate(bundles)}, "corpus_phantoms": 1}
    source = cm.corpus_source(str(tmp_path), recipe, None)
    items = load_datalist(os.path.join(source["dataset_dir"], "dataset.json"))
    image = items[0]["image"]
    assert (len(image) if isinstance(image, list) else 1) == channels


def _pretrainings(recipe: dict):
    """Each distinct (task, pre-training) of a recipe, without the loss weights (which do not change the network)."""
    seen = set()
    for task_name, task in recipe["tasks"].items():
        for row_name, row in recipe["rows"].items():
            pre = row.get("pretrain")
            if not pre:
                continue
            network_overrides = {k: v for k, v in pre.get("overrides", {}).items() if not k.startswith("loss#")}
            key = json.dumps([task_name, pre["bundle"], pre.get("config_files"), network_overrides], sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield row_name, task, pre


@pytest.mark.parametrize("name", ["demo", "paper_table1_btcv", "paper_table2_liver_spleen", "paper_table3_brats",
                                  "paper_table4_ablation_brats", "paper_figure6_masking_geometry",
                                  "demo_figure6_masking_geometry", "demo_wacv_masking_ratio_mae",
                                  "demo_wacv_masking_sweep_simmim"])
def test_each_recipe_file_fine_tunes_the_weights_its_pretrainings_save(name, tmp_path):
    """Every pre-trained row of every recipe file, at its own sizes: the backbone its pre-training saves, with the
    plan's network, loads into the network the tool builds for fine-tuning (every tensor but the output layer's),
    with the same input channels; its loss overrides name real ids of the loss."""
    recipe = cm.read_recipe(os.path.join(RECIPES, f"{name}.json"))
    checked = 0
    for row_name, row in recipe["rows"].items():
        pre = row.get("pretrain")
        if pre and any(k.startswith("loss#") for k in pre.get("overrides", {})):
            source = ConfigParser()
            source.read_config(cm.configs_of(pre))
            source.update({**recipe.get("pretraining_overrides", {}), **pre["overrides"]})
            source.get_parsed_content("loss")  # an override of an id the loss lacks fails here
    for row_name, task, pre in _pretrainings(recipe):
        source = ConfigParser()
        source.read_config(cm.configs_of(pre))
        source.update({**recipe.get("pretraining_overrides", {}), **pre.get("overrides", {})})
        weights = str(tmp_path / "models" / "model.pt")
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        backbone = source.get_parsed_content("backbone")
        torch.save(backbone.state_dict(), weights)
        source["plan#datalist"], source["plan#ckpt_dir"] = [], str(tmp_path / "models")  # the plan, without data
        source.get_parsed_content("plan").write()
        target = ConfigParser()
        target.read_config(cm.configs_of(task))
        target.update({**recipe.get("finetune_overrides", {}), **task.get("overrides", {}), **cm.finetune_network(weights),
                       **row.get("overrides", {}), "pretrained": weights})
        network = target.get_parsed_content("network")
        saved, built = backbone.state_dict(), network.state_dict()
        # every saved tensor is in the network (UNETR holds the ViT under "vit."), but the output layer's
        loaded = [k for k, v in saved.items() if any(torch.equal(v, built[t]) for t in (k, "vit." + k) if t in built)]
        assert len(loaded) >= len(saved) - 2, (name, row_name, sorted(set(saved) - set(loaded))[:8])
        assert target.get_parsed_content("in_channels") == source.get_parsed_content("in_channels"), (name, row_name)
        checked += 1
    assert checked  # every recipe has pre-trained rows



def test_without_the_plans_widths_the_swin_demo_weights_do_not_load(tmp_path):
    """The negative control of the test above: the fine-tuning bundle's own SwinUNETR (feature size 48) refuses
    the Swin demo's weights (feature size 12) that ``finetune_network`` fits it to."""
    recipe = cm.read_recipe(os.path.join(RECIPES, "demo.json"))
    source = ConfigParser()
    source.read_config(bundle_configs("hybridmim_swinunetr_pretrain"))
    weights = str(tmp_path / "models" / "model.pt")
    os.makedirs(os.path.dirname(weights))
    torch.save(source.get_parsed_content("backbone").state_dict(), weights)
    source["plan#datalist"], source["plan#ckpt_dir"] = [], str(tmp_path / "models")
    source.get_parsed_content("plan").write()
    assert cm.finetune_network(weights) == {"network_def": "@swinunetr_def", "swin_feature_size": 12}
    target = ConfigParser()
    target.read_config(bundle_configs(recipe["tasks"]["BTCV"]["bundle"]))
    target.update({"network_def": "@swinunetr_def", "pretrained": weights})
    with pytest.raises(RuntimeError) as refused:
        target.get_parsed_content("network")
    assert "of the weights matched" in str(refused.value.__cause__)


def test_a_run_resumes_only_from_an_intact_checkpoint(tmp_path, caplog):
    """Both tools pass ``resume=True`` to a bundle only where a whole checkpoint is there: a file cut short by a
    ``kill -9`` mid-write would make the bundle's resume fail instead of starting the run afresh."""
    models = tmp_path / "models"
    assert not resumable(str(tmp_path))  # no models folder
    models.mkdir()
    torch.save({"trainer": {"epoch": 1}}, models / "checkpoint_epoch=1.pt")
    whole = (models / "checkpoint_epoch=1.pt").read_bytes()
    (models / "checkpoint_epoch=1.pt").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        assert not resumable(str(tmp_path))
    assert "cut short" in caplog.text  # named in the log
    (models / "checkpoint_epoch=1.pt").write_bytes(whole)
    assert resumable(str(tmp_path))


# the recipes added for the papers' ablations and sweeps, each run end to end at tiny size
NEW_RECIPES = ["paper_figure6_masking_geometry", "paper_figure4_brats_fractions", "wacv_methods", "wacv_masking_sweep",
               "wacv_decoder_depth", "wacv_resolution", "wacv_label_ratio"]
GEOMETRY = ("sub_volume_size", "patch_size", "reconstruction_roi")
# the GPU sizes of the paper recipes' pre-trainings, which the tiny ones replace
GPU_SIZES = ("roi_size", "feature_size", "batch_size", "learning_rate", "warmup_steps")
TINY_VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 12, "decoder_hidden_size": 24,
            "decoder_mlp_dim": 48, "decoder_num_heads": 4}
TINY_SWIN_FEATURE_SIZE = 12
# the scratch rows' UNETR and SwinUNETR as small as the pre-trained ones: at the bundles' sizes (768 wide, feature
# size 48) each run writes a 1.1 GB or a 0.75 GB checkpoint
TINY_FINETUNE_NETS = {"unetr_hidden_size": TINY_VIT["hidden_size"], "unetr_mlp_dim": TINY_VIT["mlp_dim"],
                      "unetr_num_heads": TINY_VIT["num_heads"], "swin_feature_size": TINY_SWIN_FEATURE_SIZE}


def tiny_version(recipe: dict) -> dict:
    """The recipe at tiny size: one fold of two epochs on 32^3 crops, tiny networks, two pre-training steps on 64^3
    crops, each row's masking geometry halved (so that 64-32-128 becomes 32-16-64, which a 64^3 crop holds)."""
    recipe = copy.deepcopy(recipe)
    for task in recipe["tasks"].values():
        task.update(folds=[0])
        task["overrides"] = {**task.get("overrides", {}), **TINY_NET, **TINY_FINETUNE_NETS, "max_epochs": 2,
                             "val_interval": 2, "num_workers": 0, "num_folds": 2, "batch_size": 1,
                             "crops_per_volume": 1}
    recipe["pretraining_overrides"] = {"max_epochs": 1, "epoch_length": 2, "probe_interval": 0, "num_workers": 0,
                                       "val_interval": 1, "roi_size": [64, 64, 64], "batch_size": 1,
                                       "features": TINY_NET["features"], "warmup_steps": 1,
                                       "feature_size": TINY_SWIN_FEATURE_SIZE,
                                       "reconstruction_roi": [32, 32, 32],
                                       **TINY_VIT}
    for row in recipe["rows"].values():
        pre = row.get("pretrain")
        if pre:
            pre["overrides"] = {k: (v // 2 if isinstance(v, int) else [x // 2 for x in v]) if k in GEOMETRY else v
                                for k, v in pre.get("overrides", {}).items() if k not in GPU_SIZES}
        swin = (row.get("overrides", {}).get("network_def") == "@swinunetr_def"
                or (pre and "swinunetr" in pre["bundle"] and "vit.json" not in pre.get("config_files", [])))
        if swin:  # a SwinUNETR's deepest stage is 1/32 of the crop, and instance norm needs more than one voxel
            row["overrides"] = {**row.get("overrides", {}), "roi_size": [64, 64, 64]}
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_RECIPES)
def test_each_new_recipe_runs_at_tiny_size(name, tiny_task_phantoms, tmp_path):
    from hybridmim_components.phantoms import write_brain_phantoms, write_ct_phantoms

    recipe = tiny_version(cm.read_recipe(os.path.join(RECIPES, f"{name}.json")))
    data = {t: tiny_task_phantoms[task["bundle"]] for t, task in recipe["tasks"].items()}
    brain = all(task["bundle"].startswith("brats") for task in recipe["tasks"].values())
    corpus = (write_brain_phantoms(str(tmp_path / "corpus"), num_subjects=2, seed=10000, shape=(64, 64, 64)) if brain
              else write_ct_phantoms(str(tmp_path / "corpus"), num_subjects=2, seed=10000, shape=(64, 64, 64)))
    report = cm.main(recipe=recipe, output_dir=str(tmp_path / "out"), corpus=corpus, data=data)
    assert len(report["runs"]) == len(recipe["rows"]) * len(recipe["tasks"])  # every row finished
    # tiny networks write small checkpoints: CI's disk holds every test's runs (a stock UNETR's were 1.1 GB each)
    sizes = {str(p.relative_to(tmp_path)): p.stat().st_size for p in (tmp_path / "out").rglob("*.pt")}
    assert sizes and max(sizes.values()) < 200 * 2**20, max(sizes.items(), key=lambda kv: kv[1])
    # rows of the same pre-training (a sweep of label fractions) share one, once per preprocessing of the table
    specs = {json.dumps(r["pretrain"], sort_keys=True) for r in recipe["rows"].values() if r.get("pretrain")}
    preprocessings = {json.dumps(s, sort_keys=True) for s in cm.table_preprocessing(recipe).values()}
    ran = [p for p, _, files in os.walk(tmp_path / "out" / "pretrain") if "result.json" in files]
    assert len(ran) == len(specs) * len(preprocessings), ran
    for run in report["runs"].values():
        assert [e for e, _ in run["curve"]] == [1, 2]
    for task_name, conv in report["convergence"].items():
        assert set(conv["rows"]) == set(recipe["rows"])  # the convergence column has every row
    md = report["markdown"]
    assert all(f"| {row} |" in md for row in recipe["rows"]) and "speed-up vs scratch" in md
