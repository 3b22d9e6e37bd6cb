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
    kwargs = {"features": TINY, "dropout": 0.0, "norm": "batch", "contrastive_views": 1}
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


def level_batch_sizes(net, x):
    """Batch size each encoder level of a HybridMIMUNet sees in one training forward pass."""
    seen = {}
    for level, module in enumerate(net.level_modules(lv)[0] for lv in range(5)):
        module.register_forward_hook(lambda m, i, o, level=level: seen.setdefault(level, []).append(i[0].shape[0]))
    net(x)
    return [seen[level] for level in range(5)]


def test_shared_trunk_runs_levels_before_the_first_dropout_once():
    x = torch.rand(3, 1, 64, 64, 64)
    shared = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8)  # dropout at 1/8 and 1/16
    assert level_batch_sizes(shared, x) == [[3], [3], [3], [6], [6]]
    everywhere = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8, dropout_levels=None)
    assert level_batch_sizes(everywhere, x) == [[6], [6], [6], [6], [6]]
    stop = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8, stop_gradient=True)
    assert level_batch_sizes(stop, x) == [[3], [3], [3], [3, 3], [3, 3]]
    one_view = HybridMIMUNet(features=TINY, roi_size=32, contrastive_views=1)
    assert level_batch_sizes(one_view, x) == [[3]] * 5 and one_view.heads.projection is None
    shared.eval()
    assert level_batch_sizes(shared, x) == [[3]] * 5


def test_dropout_stays_only_in_the_configured_levels():
    net = HybridMIMUNet(features=TINY, dropout=0.2, dropout_levels=(2, 4))
    rates = [{m.p for m in net.level_modules(level)[0].modules() if isinstance(m, torch.nn.Dropout)} for level in range(5)]
    assert rates == [{0.0}, {0.0}, {0.2}, {0.0}, {0.2}]
    assert net.trunk_levels == 2
    decoder = {m.p for m in net.backbone.upcat_1.modules() if isinstance(m, torch.nn.Dropout)}
    assert decoder == {0.2}  # the decoder keeps the backbone's dropout


def outputs_and_grads(net, out_fn):
    net.zero_grad()
    out = out_fn()
    scalar = sum((t * torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype).reshape(t.shape)).sum() for t in out)
    scalar.backward()
    return [t.detach() for t in out], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same(a, b):
    """Equal outputs and gradients, in float64, up to summation order (a batch of 2n against two of n).

    Gradients are compared against the largest one: the biases of convolutions followed by instance norm have a
    true gradient of 0, so theirs are pure rounding noise on either side.
    """
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    assert len(outs_a) == len(outs_b) and all(torch.allclose(u, v, rtol=1e-10, atol=1e-12) for u, v in zip(outs_a, outs_b))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    scale = max(g.abs().max() for g in grads_a.values())
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-8, atol=1e-10 * scale), name


def flat(out):
    return [out["reconstruction"], out["count_logits"], out["location_logits"], out["embeddings"]]


def test_shared_trunk_equals_the_duplicated_pass():
    """Same random state: the shared trunk gives today's duplicated pass's outputs and gradients exactly."""
    net = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8, dropout=0.3).double()
    x = torch.rand(2, 1, 64, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)
    shared = outputs_and_grads(net, lambda: flat(net(x)))
    net.trunk_levels = 0  # every level on the duplicated batch, dropout where it is now
    torch.manual_seed(1)
    duplicated = outputs_and_grads(net, lambda: flat(net(x)))
    assert_same(shared, duplicated)
    torch.manual_seed(2)
    other = outputs_and_grads(net, lambda: flat(net(x)))
    assert not torch.allclose(other[0][3], shared[0][3])  # the check can fail: dropout does draw


class ReplayedDropout:
    """Patch every active nn.Dropout of a network: record its keep masks, or replay the recorded ones."""

    def __init__(self, net):
        self.modules = [m for m in net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        self.masks = {m: [] for m in self.modules}
        self.replay = None  # None: record; else a function (recorded mask) -> mask to use
        for m in self.modules:
            m.forward = lambda x, m=m: self.apply(m, x)

    def apply(self, m, x):
        if self.replay is None:
            keep = torch.rand_like(x) >= m.p
            self.masks[m].append(keep)
        else:
            keep = self.replay(self.masks[m][self.calls[m]])
            self.calls[m] += 1
        return x * keep / (1 - m.p)

    def replaying(self, choose):
        self.replay, self.calls = choose, dict.fromkeys(self.modules, 0)


def test_shared_trunk_views_equal_two_separate_passes():
    """Each view of the shared pass is what a separate pass of the same network gives with the same dropout masks."""
    net = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8, dropout=0.3).double()
    x = torch.rand(2, 1, 64, 64, 64, dtype=torch.float64)
    dropout = ReplayedDropout(net)
    shared = outputs_and_grads(net, lambda: flat(net(x)))
    assert all(len(calls) == 1 for calls in dropout.masks.values())
    assert {calls[0].shape[0] for calls in dropout.masks.values()} == {2, 4}  # decoder: first view; levels 3-4: both

    def separate():
        dropout.replaying(lambda keep: keep[:2])  # first view: the first half of each mask
        first = net.encode(x)
        reconstruction = net.decode(x, first, (slice(16, 48),) * 3)
        regions = net.heads.regions(first[-1], (2, 2, 2))
        dropout.replaying(lambda keep: keep[2:])  # second view: the other half
        second = net.encode(x)
        projected = net.heads.project(torch.cat([first[-1], second[-1]]))  # one batch-norm batch, as the network does
        embeddings = torch.stack([projected[:2], projected[2:]])
        return [reconstruction, regions["count_logits"], regions["location_logits"], embeddings]

    assert_same(shared, outputs_and_grads(net, separate))


def test_stop_gradient_keeps_the_second_view_out_of_the_gradient():
    net = HybridMIMUNet(features=TINY, roi_size=32, projection_dim=8, stop_gradient=True)
    embeddings = net(torch.rand(2, 1, 64, 64, 64))["embeddings"]
    assert embeddings.shape == (2, 2, 8) and embeddings.requires_grad
    params = list(net.parameters())
    second = torch.autograd.grad(embeddings[1].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in second)
    first = torch.autograd.grad(embeddings[0].sum(), params, allow_unused=True)
    assert sum(g is not None and bool(g.any()) for g in first) > 10


def test_backbone_with_dropout_levels_loads_strictly_into_basic_unet():
    net = HybridMIMUNet(features=TINY, dropout=0.2, dropout_levels=(4,), stop_gradient=True)
    plain = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=TINY)
    plain.load_state_dict(net.backbone.state_dict(), strict=True)
    assert net.backbone.state_dict().keys() == plain.state_dict().keys()


def test_only_the_heads_asked_for_are_built():
    net = HybridMIMUNet(features=TINY, roi_size=32, contrastive_views=1, count_head=False, reconstruct=False)
    assert net.heads.count is None and net.heads.projection is None and net.heads.location is not None
    out = net(torch.rand(2, 1, 64, 64, 64))
    assert out["count_logits"] is None and out["embeddings"] is None and out["reconstruction"] is None
    assert out["location_logits"].shape == (2, 8, 8)
    net.eval()
    assert net(torch.rand(1, 1, 64, 64, 64))["reconstruction"].shape == (1, 1, 32, 32, 32)  # validation decodes


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({"roi_size": 24}, None, "multiples of 16"),
        ({"sub_volume_size": 24}, None, "multiple of 16"),
        ({"contrastive_views": 3}, None, "1 or 2"),
        ({"dropout_levels": (5,)}, None, "levels 0..4"),
        ({"dropout": 0.0}, None, "two views are identical"),
        ({"dropout_levels": ()}, None, "two views are identical"),
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


def test_sync_batchnorm_conversion_keeps_the_saved_weights():
    """multi_gpu_train.json converts the projection head's BatchNorm to SyncBatchNorm on GPUs (SimCLR's global
    batch normalisation, for negatives gathered from every rank): the state dict, the backbone that
    ``model.pt`` saves, and the parameters the optimizer holds stay the same."""
    net = HybridMIMUNet(features=(4, 4, 8, 8, 16, 4), sub_volume_size=16, roi_size=16)
    keys, backbone, params = list(net.state_dict()), net.backbone, list(net.parameters())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert converted is net and converted.backbone is backbone and list(converted.state_dict()) == keys
    assert all(a is b for a, b in zip(converted.parameters(), params))


@pytest.mark.parametrize("sub_volume,patch", [(64, 16), (32, 8), (32, None)])
def test_heads_follow_the_patches_per_sub_volume_and_the_backbone_still_loads_strictly(sub_volume, patch):
    from hybridmim_components.losses import HybridMIMLoss
    from hybridmim_components.transforms import TwoLevelMask

    per_region = (sub_volume // (patch or sub_volume // 2)) ** 3
    net = HybridMIMUNet(features=TINY, sub_volume_size=sub_volume, patch_size=patch, roi_size=(32, 32, 32),
                        projection_dim=8)
    batch = TwoLevelMask(sub_volume, patch or sub_volume // 2, 0.4)(torch.rand(2, 1, 64, 64, 64))
    out = net(batch["image"])
    regions = (64 // sub_volume) ** 3
    assert out["count_logits"].shape == (2, regions, per_region + 1)
    assert out["location_logits"].shape == (2, regions, per_region)
    terms = HybridMIMLoss()(out, batch)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["consistency"] > 0
    BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=TINY).load_state_dict(
        net.backbone.state_dict(), strict=True)


def test_swin_heads_follow_the_patches_per_sub_volume_and_the_backbone_still_loads_strictly():
    from monai.networks.nets import SwinUNETR

    from hybridmim_components.networks import HybridMIMSwinUNETR

    net = HybridMIMSwinUNETR(feature_size=12, sub_volume_size=32, patch_size=8, roi_size=(32, 32, 32),
                             projection_dim=8, contrastive_views=1)
    out = net(torch.rand(1, 1, 64, 64, 64))
    assert out["count_logits"].shape == (1, 8, 65) and out["location_logits"].shape == (1, 8, 64)
    SwinUNETR(in_channels=1, out_channels=1, feature_size=12).load_state_dict(net.backbone.state_dict(), strict=True)
