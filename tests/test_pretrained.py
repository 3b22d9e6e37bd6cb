import pytest
import torch

from monai.networks.nets import UNETR, BasicUNet, ViT

from hybridmim_components.networks import HybridMIMUNet
from hybridmim_components.pretrained import load_pretrained

TINY = (4, 4, 8, 8, 16, 4)


@pytest.fixture
def pretrained_unet(tmp_path):
    net = HybridMIMUNet(features=TINY)
    backbone = tmp_path / "model.pt"
    torch.save(net.backbone.state_dict(), backbone)
    full = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optimizer": {}}, full)
    return net, str(backbone), str(full)


def test_backbone_into_a_segmentation_unet(pretrained_unet, capsys):
    source, backbone, _ = pretrained_unet
    net = load_pretrained(BasicUNet(out_channels=14, features=TINY), backbone)
    assert torch.equal(net.conv_0.conv_0.conv.weight, source.backbone.conv_0.conv_0.conv.weight)
    assert net.final_conv.weight.shape == (14, 4, 1, 1, 1)  # the new head keeps its own initialisation
    report = capsys.readouterr().out
    assert "loaded     80 of 82 tensors" in report and "final_conv.weight (1, 4, 1, 1, 1) -> (14, 4, 1, 1, 1)" in report
    assert "missing    0" in report


def test_wrapped_and_prefixed_checkpoint(pretrained_unet, capsys):
    source, _, full = pretrained_unet
    net = load_pretrained(BasicUNet(out_channels=3, features=TINY), full)
    assert torch.equal(net.down_4.convs.conv_1.conv.weight, source.backbone.down_4.convs.conv_1.conv.weight)
    report = capsys.readouterr().out
    assert "'backbone.*' -> '*'" in report and "heads.count.weight" in report  # pre-training heads: unexpected


def test_vit_weights_into_unetr(tmp_path):
    kwargs = dict(hidden_size=48, mlp_dim=96, num_heads=4)
    vit = ViT(in_channels=1, img_size=32, patch_size=16, num_layers=12, **kwargs)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    net = load_pretrained(UNETR(1, 3, img_size=32, feature_size=8, **kwargs), str(tmp_path / "vit.pt"), 0.1)
    assert torch.equal(net.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)


def test_too_little_matched_is_an_error(pretrained_unet):
    _, backbone, _ = pretrained_unet
    with pytest.raises(ValueError, match=r"(?s)only 0% of the weights matched.*features"):
        load_pretrained(BasicUNet(out_channels=14, features=(8, 8, 16, 32, 64, 8)), backbone)


def test_empty_path_is_scratch_and_missing_file_is_an_error(tmp_path):
    net = BasicUNet(features=TINY)
    before = net.conv_0.conv_0.conv.weight.clone()
    assert torch.equal(load_pretrained(net, "").conv_0.conv_0.conv.weight, before)
    with pytest.raises(FileNotFoundError, match="--pretrained"):
        load_pretrained(net, str(tmp_path / "none.pt"))
