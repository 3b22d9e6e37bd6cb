import pytest
import torch

from monai.networks.nets import BasicUNet

from hybridmim_components.networks import HybridMIMUNet, centred_roi

TINY = (4, 4, 8, 8, 16, 4)


def test_partial_decoding_returns_the_box():
    net = HybridMIMUNet(features=TINY, roi_size=(32, 32, 16), projection_dim=8)
    out = net(torch.rand(2, 1, 64, 64, 32))
    assert out["reconstruction"].shape == (2, 1, 32, 32, 16)
    assert out["roi"] == (slice(16, 48), slice(16, 48), slice(0, 16))
    assert out["count_logits"].shape == (2, 2 * 2 * 1, 9)
    assert out["location_logits"].shape == (2, 4, 8)
    assert out["embeddings"].shape == (2, 2, 8)  # two dropout views


def test_partial_decoding_matches_full_decoding_inside_the_box():
    """Cropping the skips equals cropping the full output, away from the box faces, for a decoder of local ops.

    (With instance norm the decoder's statistics come from the box instead of the whole crop: that is the
    method's approximation, so the check uses batch norm in eval mode.) The decoder's receptive radius is
    2 + 4 + 8 + 16 = 30 voxels, so a 96-voxel box keeps an exact core of 36 voxels.
    """
    torch.manual_seed(0)
    kwargs = {"features": TINY, "dropout": 0.0, "norm": "batch"}
    full = HybridMIMUNet(roi_size=None, **kwargs).eval()
    part = HybridMIMUNet(roi_size=96, **kwargs).eval()
    part.load_state_dict(full.state_dict())
    x = torch.rand(1, 1, 128, 128, 128)
    with torch.no_grad():
        whole, box = full(x), part(x)
    assert whole["reconstruction"].shape == (1, 1, 128, 128, 128) and whole["embeddings"] is None
    assert box["roi"] == (slice(16, 112),) * 3
    inner = whole["reconstruction"][(slice(None), slice(None)) + box["roi"]]
    core = (slice(None), slice(None)) + (slice(30, 66),) * 3
    assert torch.allclose(inner[core], box["reconstruction"][core], atol=1e-5)
    assert not torch.allclose(inner, box["reconstruction"], atol=1e-5)  # the faces do differ


def test_backbone_loads_strictly_into_basic_unet():
    net = HybridMIMUNet(in_channels=2, features=TINY)
    plain = BasicUNet(spatial_dims=3, in_channels=2, out_channels=2, features=TINY)
    plain.load_state_dict(net.backbone.state_dict(), strict=True)
    x = torch.rand(1, 2, 32, 32, 32)
    net.eval(), plain.eval()
    assert torch.allclose(plain(x), net.backbone(x))


def test_gradients_reach_heads_and_backbone():
    from hybridmim_components.losses import HybridMIMLoss
    from hybridmim_components.transforms import TwoLevelMaskd
    from monai.data import list_data_collate

    net = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8)
    mask = TwoLevelMaskd("image")
    batch = list_data_collate([mask({"image": torch.rand(1, 64, 64, 64)}) for _ in range(2)])
    HybridMIMLoss()(net(batch["image"]), batch)["loss"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_contrastive_views_share_one_encoder_pass():
    net = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8)
    seen = []
    net.backbone.conv_0.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    net(torch.rand(3, 1, 64, 64, 64))
    assert seen == [6]
    net.eval()
    seen.clear()
    assert net(torch.rand(3, 1, 64, 64, 64))["embeddings"] is None and seen == [3]


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({"roi_size": 24}, None, "multiples of 16"),
        ({"sub_volume_size": 24}, None, "multiple of 16"),
        ({"contrastive_views": 3}, None, "1 or 2"),
        ({}, (1, 1, 64, 64, 48), "sub-volume size"),
        ({"roi_size": 96}, (1, 1, 64, 64, 64), "larger than the input"),
    ],
)
def test_clear_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        net = HybridMIMUNet(features=TINY, **kwargs)
        net(torch.rand(*shape))


def test_centred_roi_snaps_to_the_grid():
    assert centred_roi((96, 96, 96), (64, 64, 64), 16) == (slice(16, 80),) * 3
    assert centred_roi((128, 128, 128), (96, 96, 96), 16) == (slice(16, 112),) * 3
    with pytest.raises(ValueError, match="multiple of 16"):
        centred_roi((96, 96, 96), (64, 64, 64), 16, roi_start=(8, 16, 16))
