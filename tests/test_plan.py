"""Checkpoints carry their plan: pre-training writes it, fine-tuning follows it and checks it, inference and
evaluation read the fine-tuned model's own."""

import json
import os

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import BasicUNet, SwinUNETR

from hybridmim_components.plan import check_plan, read_plan

from conftest import REPO, bundle_config, monai_bundle, run_command, tiny_finetune_args, tiny_pretrain_args

# its module fixtures are built once: every test of the file in one pytest-xdist process
pytestmark = pytest.mark.xdist_group("test_plan")

SPACING, WINDOW = [2.0, 2.0, 2.5], [-300, 300]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_ct_phantoms):
    """A tiny pre-training with a non-default spacing and window: its model.pt."""
    root = str(tmp_path_factory.mktemp("pretrain"))
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config("hybridmim_unet_pretrain"))
                       + tiny_pretrain_args(root, tiny_ct_phantoms)
                       + ["--pixdim", json.dumps(SPACING), "--intensity_range", json.dumps(WINDOW), "--max_epochs", "1"],
                       cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(root, "models", "model.pt")


@pytest.mark.slow
def test_pretraining_writes_its_plan_beside_the_model_and_in_the_checkpoint(pretrained):
    plan = read_plan(pretrained)
    assert plan["spacing"] == SPACING and plan["intensity"]["window"] == WINDOW and plan["orientation"] == "RAS"
    assert plan["network"] == {"class": "BasicUNet", "spatial_dims": 3, "in_channels": 1, "features": [4, 4, 8, 8, 16, 4]}
    assert plan["method"]["name"] == "hybridmim" and plan["method"]["weights"]["reconstruction"] == 1.0
    assert plan["data"]["volumes"] == 3 and plan["crop"] == [32, 32, 32]
    (checkpoint,) = [f for f in os.listdir(os.path.dirname(pretrained)) if f.startswith("checkpoint")]
    assert torch.load(os.path.join(os.path.dirname(pretrained), checkpoint), weights_only=True)["plan"] == plan


@pytest.mark.slow
def test_fine_tuning_follows_the_plan_and_inference_follows_fine_tuning(pretrained, tiny_task_phantoms, tmp_path, caplog):
    root = str(tmp_path / "finetune")
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config("msd_spleen_segmentation"))
                       + tiny_finetune_args(root, tiny_task_phantoms["msd_spleen_segmentation"])
                       + ["--pretrained", pretrained], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pre-training plan vs fine-tuning settings" in proc.stdout and "[2.0, 2.0, 2.5]" in proc.stdout
    own = read_plan(os.path.join(root, "models", "model.pt"))
    assert own["spacing"] == SPACING and own["intensity"]["window"] == WINDOW  # applied, not only read
    for name in ("inference.json", "evaluate.json"):
        parser = ConfigParser()
        parser.read_config([bundle_config("msd_spleen_segmentation")] * (name == "evaluate.json")
                           + [bundle_config("msd_spleen_segmentation", name)])
        parser["bundle_root"] = root
        assert parser.get_parsed_content("pixdim") == SPACING and parser.get_parsed_content("intensity_range") == WINDOW
    # an override still wins over the plan, with a warning
    parser = ConfigParser()
    parser.read_config(bundle_config("msd_spleen_segmentation"))
    parser.update({"bundle_root": str(tmp_path / "other"), "pretrained": pretrained, "features": [4, 4, 8, 8, 16, 4],
                   "pixdim": [1.5, 1.5, 2.0]})
    with caplog.at_level("WARNING", logger="hybridmim_components.plan"):
        parser.get_parsed_content("network")
    assert "spacing [1.5, 1.5, 2.0] differs from the pre-training's [2.0, 2.0, 2.5]" in caplog.text


@pytest.mark.slow
def test_a_plan_that_cannot_work_stops_with_a_clear_error(pretrained):
    parser = ConfigParser()
    parser.read_config(bundle_config("brats_tumor_segmentation"))
    parser.update({"pretrained": pretrained, "features": [4, 4, 8, 8, 16, 4]})
    with pytest.raises(RuntimeError) as raised:  # MONAI's config parser wraps the error; the command shows both
        parser.get_parsed_content("network")
    assert isinstance(raised.value.__cause__, ValueError)
    assert "in_channels: pre-trained 1, fine-tuning 4" in str(raised.value.__cause__)
    plan = read_plan(pretrained)
    with pytest.raises(ValueError, match=r"network: pre-trained BasicUNet, fine-tuning SwinUNETR"):
        check_plan(plan, SwinUNETR(in_channels=1, out_channels=2, feature_size=12), 1, {})
    with pytest.raises(ValueError, match=r"features: pre-trained \[4, 4, 8, 8, 16, 4\], fine-tuning \[32, 32, 64, 128, 256, 32\]"):
        check_plan(plan, BasicUNet(spatial_dims=3, in_channels=1, out_channels=2), 1, {})


def test_a_vit_plan_serves_unetr():
    from monai.networks.nets import UNETR

    plan = {"network": {"class": "ViT", "in_channels": 1}, "spacing": [1.5, 1.5, 2.0]}
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    assert check_plan(plan, unetr, 1, {"spacing": [1.5, 1.5, 2.0]}) is unetr


def test_vit_weights_of_another_patch_size_than_unetrs_are_refused_before_monai_fails(tmp_path):
    from monai.networks.nets import UNETR

    from hybridmim_studies.comparison import finetune_network

    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    plan = {"network": {"class": "ViT", "in_channels": 1, "patch_size": 16}, "spacing": [1.5, 1.5, 2.0]}
    assert check_plan(plan, unetr, 1, {}) is unetr  # the control: 16^3 patches, UNETR's own
    plan["network"]["patch_size"] = 8
    with pytest.raises(ValueError, match=r"pre-trained with 8\^3 patches, and MONAI's UNETR fixes its ViT's patches at 16"):
        check_plan(plan, unetr, 1, {})
    # the comparison tool refuses such a row when it picks the network, before any fine-tuning starts
    (tmp_path / "plan.json").write_text(__import__("json").dumps(plan))
    with pytest.raises(ValueError, match="cannot be fine-tuned as UNETR"):
        finetune_network(str(tmp_path / "model.pt"))


def test_a_plan_without_unet_widths_warns_on_another_spacing_and_does_not_refuse(caplog):
    """A ViT or SwinUNETR plan has no ``features`` row: its spacing is a setting that only hurts, as for a UNet's
    (it used to fall among the rows that cannot work, and stopped the run)."""
    from monai.networks.nets import UNETR

    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    plan = {"network": {"class": "ViT", "in_channels": 1, "patch_size": 16}, "spacing": [1.5, 1.5, 2.0]}
    with caplog.at_level("WARNING", logger="hybridmim_components.plan"):
        assert check_plan(plan, unetr, 1, {"spacing": [2.0, 2.0, 2.0]}) is unetr
    assert "fine-tuning spacing [2.0, 2.0, 2.0] differs from the pre-training's [1.5, 1.5, 2.0]" in caplog.text
    with pytest.raises(ValueError, match="in_channels: pre-trained 1, fine-tuning 4"):  # what cannot work still stops
        check_plan(plan, unetr, 4, {"spacing": [2.0, 2.0, 2.0]})
