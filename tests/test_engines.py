import pytest
import torch

from monai.bundle import ConfigParser

from hybridmim_components.checkpoints import CompletedCheckpointSaver
from hybridmim_components.engines import PrepareMaskedBatch
from hybridmim_components.transforms import TwoLevelMask

from conftest import bundle_config


def test_masking_after_the_move_to_the_device():
    images = torch.rand(2, 1, 32, 32, 32)
    expected = TwoLevelMask(16, 8, generator=torch.Generator().manual_seed(5))(images)
    prepare = PrepareMaskedBatch(masking=TwoLevelMask(16, 8, generator=torch.Generator().manual_seed(5)))
    image, targets = prepare({"image": images}, "cpu")
    assert torch.equal(image, expected["image"]) and not torch.equal(image, images)
    assert targets.keys() == {"target", "mask", "mask_count", "mask_location"}
    assert all(torch.equal(targets[k], expected[k]) for k in targets)
    assert targets["mask_count"].shape == (2, 8) and targets["mask"].dtype == torch.bool


def test_channels_last_input():
    prepare = PrepareMaskedBatch(masking=TwoLevelMask(16, 8), memory_format=torch.channels_last_3d)
    image, _ = prepare({"image": torch.rand(2, 1, 32, 32, 32)}, "cpu")
    assert image.is_contiguous(memory_format=torch.channels_last_3d)


def test_unmasked_batch_says_what_is_missing():
    with pytest.raises(KeyError, match="add TwoLevelMaskd"):
        PrepareMaskedBatch()({"image": torch.rand(1, 1, 32, 32, 32)}, "cpu")


def test_paper_settings_overlay():
    parser = ConfigParser()
    parser.read_config([bundle_config("hybridmim_unet_pretrain"), bundle_config("hybridmim_unet_pretrain", "paper_settings.json")])
    net = parser.get_parsed_content("network_def")
    assert net.backbone.down_4.convs.conv_0.conv.out_channels == 512
    assert net.roi_size == (64, 64, 64) and net.sub_volume_size == (32, 32, 32)
    masking = parser.get_parsed_content("masking")
    assert masking.mask_ratio == 0.4 and masking.patch_size == (16, 16, 16)
    assert parser["train#dataset#_target_"] == "PersistentDataset"
    assert parser["max_epochs"] * parser["epoch_length"] == 100_000


@pytest.mark.slow
def test_benchmark_step_tool_times_every_configuration():
    from hybridmim_studies.step_benchmark import main, peak_rss_of_one_step

    tiny = {"roi": 32, "box": 16, "features": [4, 4, 8, 8, 16, 4], "batch": 2}
    result = main(**tiny, steps=1, warmup=0, rounds=1, memory=False)
    assert set(result) == {
        "UNet, duplicated pass (dropout everywhere)", "UNet, shared trunk", "UNet, shared trunk + stop-gradient",
        "UNet, one view (contrastive_views=1)", "UNet, shared trunk, full reconstruction",
    }
    assert all(r["seconds"] > 0 for r in result.values())
    assert 0.1 < peak_rss_of_one_step("UNet, shared trunk", {"device": "cpu", "swin_feature_size": 0, **tiny}) < 8


@pytest.mark.slow
def test_benchmark_methods_tool_times_every_pretraining_bundle():
    import glob
    import os

    from conftest import REPO, load_tool

    tool = load_tool("benchmark_methods")
    main, peak_rss_of_one_step = tool.main, tool.peak_rss_of_one_step

    result = main(steps=1, warmup=0, rounds=1, memory=False)
    bundles = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "bundles", "*_pretrain"))}
    assert set(result) == bundles and len(bundles) == 7
    assert all(r["seconds"] > 0 and r["transform_seconds_per_crop"] >= 0 for r in result.values())
    assert 0.1 < peak_rss_of_one_step("mae_vit_pretrain", "cpu", 2, {"roi_size": [32, 32, 32]}) < 8


@pytest.mark.parametrize("saver,final_written", [("monai", True), ("completed", False)])
def test_a_crash_writes_no_final_model(saver, final_written, tmp_path):
    """MONAI's CheckpointSaver writes ``final_filename`` when an exception ends the run (when no earlier handler
    re-raises first); ours only when the run completes."""
    import os

    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    def step(engine, batch):
        if engine.state.iteration == 3:
            raise RuntimeError("a bad volume")

    engine = Engine(step)
    cls = CheckpointSaver if saver == "monai" else CompletedCheckpointSaver
    cls(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_final=True, final_filename="model.pt").attach(engine)
    with pytest.raises(RuntimeError, match="a bad volume"):
        engine.run(range(5), max_epochs=1)
    assert os.path.isfile(tmp_path / "model.pt") == final_written
    engine = Engine(lambda e, b: None)
    cls(str(tmp_path / "ok"), {"model": torch.nn.Linear(1, 1)}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run(range(2), max_epochs=1)
    assert os.path.isfile(tmp_path / "ok" / "model.pt")
