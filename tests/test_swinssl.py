"""The SwinUNETR pretext tasks: the views (rotation labels, cut-out, pasting), the loss against a recompute from
the reference's definitions, and the weights in a stock SwinUNETR."""

import numpy as np
import pytest
import torch

from monai.networks.nets import SwinUNETR

from hybridmim_components.checkpoints import PretextWeights
from hybridmim_components.losses import SwinSSLLoss
from hybridmim_components.baseline_networks import SwinSSLSwinUNETR
from hybridmim_components.networks import HybridMIMSwinUNETR
from hybridmim_components.transforms import SwinSSLViews


def views(seed: int = 0, **kwargs) -> SwinSSLViews:
    return SwinSSLViews(generator=torch.Generator().manual_seed(seed), **kwargs)


def test_each_view_is_the_crop_rotated_by_its_label():
    crops = torch.rand(3, 1, 16, 16, 16)
    out = views()(crops)
    assert out["target"].shape == (6, 1, 16, 16, 16) and out["rotation"].shape == (6,)
    assert set(out["rotation"].tolist()) <= {0, 1, 2, 3}
    for i, k in enumerate(out["rotation"].tolist()):
        assert torch.equal(out["target"][i], torch.rot90(crops[i % 3], k, dims=(2, 3)))
        # the check can fail: any other quarter turn gives another volume
        assert not torch.equal(out["target"][i], torch.rot90(crops[i % 3], k + 1, dims=(2, 3)))
    draws = torch.cat([views(seed)(crops)["rotation"] for seed in range(200)])
    assert np.allclose(np.bincount(draws.numpy(), minlength=4) / len(draws), 0.25, atol=0.04)  # k uniform


def test_cut_out_covers_at_most_the_stated_fraction_with_noise_in_0_1():
    crop = torch.full((1, 1, 32, 32, 32), 2.0)  # outside the noise's [0, 1]: every cut-out voxel shows
    fractions = []
    for seed in range(40):
        out = views(seed, max_drop=0.3)(crop)  # one crop: nothing to paste from
        for view in (out["image"], out["view2"]):
            cut = view != 2.0
            assert ((view[cut] >= 0) & (view[cut] <= 1)).all()
            fractions.append(cut.float().mean().item())
    largest_box = (0.25 * 32) ** 3 / 32**3
    assert max(fractions) <= 0.3 + largest_box  # the last box may overshoot the drawn fraction by one box
    assert 0.08 < np.mean(fractions) < 0.22  # the fraction is uniform in [0, 0.3): mean 0.15
    for box in views(1).boxes((32, 32, 32)):
        sides = [s.stop - s.start for s in box]
        assert all(1 <= side <= 8 for side in sides) and all(s.start <= 32 - 1 for s in box)  # 5 % to 25 % of 32
    with pytest.raises(ValueError, match="H == W"):
        views()(torch.rand(1, 1, 16, 16, 32))


def test_boxes_of_another_crop_are_pasted_in_half_of_the_views_of_a_batch_of_two():
    crops = torch.stack([torch.full((1, 16, 16, 16), 2.0), torch.full((1, 16, 16, 16), 3.0)])
    pasted = 0
    for seed in range(100):
        out = views(seed)(crops)
        for b, view in enumerate(torch.cat([out["image"], out["view2"]])):
            own, other = (2.0, 3.0) if b % 2 == 0 else (3.0, 2.0)
            noise = (view >= 0) & (view <= 1)
            assert ((view == own) | (view == other) | noise).all()
            pasted += bool((view == other).any())
    assert 0.4 < pasted / 400 < 0.6  # the reference's draw: another crop with probability (B - 1) / B


def test_loss_equals_a_recompute_from_the_reference_definitions():
    torch.manual_seed(0)
    b, dim = 3, 8
    pred = {"rotation_logits": torch.randn(2 * b, 4), "embeddings": torch.randn(2, b, dim),
            "reconstruction": torch.randn(2 * b, 1, 4, 4, 4)}
    target = {"rotation": torch.randint(0, 4, (2 * b,)), "target": torch.rand(2 * b, 1, 4, 4, 4)}
    terms = SwinSSLLoss()(pred, target)

    logits = pred["rotation_logits"].double().numpy()
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    rotation = -log_softmax[np.arange(2 * b), target["rotation"].numpy()].mean()
    # the reference's Contrast: cosine similarities of all 2B embeddings, the positive at +-B, self left out
    z = pred["embeddings"].double().numpy().reshape(2 * b, dim)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    positives = np.concatenate([np.diag(sim, b), np.diag(sim, -b)])
    denominator = (np.exp(sim / 0.5) * (1 - np.eye(2 * b))).sum(1)
    contrastive = np.sum(-np.log(np.exp(positives / 0.5) / denominator)) / (2 * b)
    reconstruction = np.abs(pred["reconstruction"].double().numpy() - target["target"].double().numpy()).mean()

    expected = {"rotation": rotation, "contrastive": contrastive, "reconstruction": reconstruction}
    for name, value in expected.items():
        assert abs(terms[name].item() - value) < 1e-5, name
    assert abs(terms["loss"].item() - sum(expected.values())) < 1e-5  # the reference's weights: 1, 1, 1
    weighted = SwinSSLLoss(rotation_weight=0.5, contrastive_weight=0.0)(pred, target)["loss"]
    assert abs(weighted.item() - (0.5 * rotation + reconstruction)) < 1e-5
    with pytest.raises(ValueError, match="non-negative"):
        SwinSSLLoss(rotation_weight=-1.0)


def test_weights_load_into_stock_swinunetr_and_the_heads_are_the_pretext_weights():
    net = SwinSSLSwinUNETR(feature_size=12)
    # 64^3: the reconstruction head's instance norm needs more than one deepest voxel (1/32) in training
    x, view2 = torch.rand(2, 1, 64, 64, 64), torch.rand(2, 1, 64, 64, 64)
    out = net(x, view2)
    assert out["rotation_logits"].shape == (4, 4) and out["embeddings"].shape == (2, 2, 512)
    assert out["reconstruction"].shape == (4, 1, 64, 64, 64)
    SwinUNETR(in_channels=1, out_channels=1, feature_size=12).load_state_dict(net.backbone.state_dict(), strict=True)
    heads = {k.split(".")[0] for k in PretextWeights(net, net.backbone).keys()}
    assert heads == {"rotation_head", "contrastive_head", "reconstruction_head"}
    # one pass encodes both views: the first view's outputs do not depend on the second's position in the batch
    net.eval()
    out, swapped = net(x, view2), net(view2, x)
    assert torch.allclose(swapped["rotation_logits"][:2], out["rotation_logits"][2:], atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.rand(1, 1, 48, 32, 32), torch.rand(1, 1, 48, 32, 32))


def test_the_probe_sees_the_maps_it_sees_in_hybridmim_s_swin_bundle():
    """``encode`` gives the probe the Swin encoder's five maps, as ``HybridMIMSwinUNETR.encode`` does for the same
    weights, so the probe values of the two Swin methods compare."""
    ssl, hybrid = SwinSSLSwinUNETR(feature_size=12).eval(), HybridMIMSwinUNETR(feature_size=12).eval()
    hybrid.backbone.load_state_dict(ssl.backbone.state_dict())
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        ours, theirs = ssl.encode(x), hybrid.encode(x)
    assert [tuple(m.shape[1:]) for m in ours] == [(12 * 2**i, *(64 // 2 ** (i + 1),) * 3) for i in range(5)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
