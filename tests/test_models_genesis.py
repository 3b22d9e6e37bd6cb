"""Models Genesis: each corruption does what the paper says on a known input, as the bundle configures it; the
restoration loss against a recompute from its definition; the weights in a stock BasicUNet."""

import numpy as np
import pytest
import torch

from monai.bundle import ConfigParser
from monai.networks.nets import BasicUNet

from hybridmim_components.losses import RestorationLoss
from hybridmim_components.baseline_networks import ModelsGenesisUNet
from hybridmim_components.transforms import RandBezierIntensity, RandBezierIntensityd, bezier_curve

from conftest import bundle_config

BUNDLE = "modelsgenesis_unet_pretrain"


def corruption(**overrides) -> list:
    """The bundle's ``corruption`` transforms, as its train.json builds them."""
    parser = ConfigParser()
    parser.read_config(bundle_config(BUNDLE))
    parser.update(overrides)
    transforms = parser.get_parsed_content("corruption")
    for t in transforms:
        if hasattr(t, "set_random_state"):
            t.set_random_state(0)
    return transforms


def monotone(values: np.ndarray) -> bool:
    steps = np.diff(values)
    return bool((steps >= 0).all() or (steps <= 0).all())


def test_bezier_curve_is_monotone_and_keeps_or_inverts_the_ranks():
    ramp = torch.linspace(0, 1, 4096).reshape(1, 16, 16, 16)
    transform = RandBezierIntensityd("image", prob=1.0).set_random_state(1)
    directions = set()
    for _ in range(200):
        out = transform({"image": ramp})["image"].flatten().numpy()
        assert monotone(out) and 0.0 <= out.min() and out.max() <= 1.0
        assert {round(float(out[0]), 6), round(float(out[-1]), 6)} == {0.0, 1.0}  # the curve runs corner to corner
        directions.add(bool(out[-1] > out[0]))
    assert directions == {True, False}  # both the rank-keeping and the inverting curve occur
    # the check can fail: a control point outside the unit square gives a curve that is not a monotone map
    _, y = bezier_curve(np.array([[0.0, 0.0], [0.3, 1.8], [0.6, -0.8], [1.0, 1.0]]))
    assert not monotone(y)


def test_bezier_probabilities_and_dictionary_form():
    image = torch.rand(1, 8, 8, 8)
    assert torch.equal(RandBezierIntensity(prob=0.0)(image), image)
    # the published rates: 90 % of images transformed, half of those inverted
    transform = RandBezierIntensity(prob=0.9, invert_prob=0.5).set_random_state(0)
    transformed = inverted = 0
    for _ in range(2000):
        transform.randomize()
        transformed += transform._do_transform
        inverted += transform._do_transform and transform._invert
    assert abs(transformed / 2000 - 0.9) < 0.03 and abs(inverted / transformed - 0.5) < 0.05
    two = RandBezierIntensityd(["a", "b"], prob=1.0).set_random_state(0)({"a": image, "b": image})
    assert torch.equal(two["a"], two["b"])  # one curve for every key of an item
    with pytest.raises(ValueError, match="invert_prob"):
        RandBezierIntensity(invert_prob=2.0)


def test_local_pixel_shuffling_keeps_each_window_s_values():
    image = torch.arange(32**3, dtype=torch.float32).reshape(1, 32, 32, 32)  # every voxel its own value
    flip, copy, shuffle, *_ = corruption(**{"roi_size": [32, 32, 32], "corruption#2#holes": 1,
                                              "corruption#2#prob": 1.0})
    out = shuffle({"image": image.clone()})["image"]
    (window,) = shuffle.shuffle.hole_coords
    inside = torch.zeros_like(image, dtype=torch.bool)
    inside[window] = True
    assert torch.equal(out[~inside], image[~inside])  # nothing outside the window moves
    assert torch.equal(out[inside].sort().values, image[inside].sort().values)  # the window keeps its values
    sizes = inside.nonzero().amax(0)[1:] - inside.nonzero().amin(0)[1:] + 1
    assert all(1 <= s <= 32 // 10 for s in sizes)  # windows of 1 to a tenth of the crop per axis, as published
    # and the published form: 10,000 windows, which move most voxels and keep all values
    shuffle = corruption(**{"roi_size": [32, 32, 32], "corruption#2#prob": 1.0})[2]
    out = shuffle({"image": image.clone()})["image"]
    assert len(shuffle.shuffle.hole_coords) == 10000
    assert torch.equal(out.flatten().sort().values, image.flatten()) and (out != image).float().mean() > 0.5


@pytest.mark.parametrize("paint", ["in", "out"])
def test_painting_changes_only_the_stated_region(paint):
    image = torch.full((1, 64, 64, 64), 2.0)  # outside the noise's [0, 1]: every filled voxel shows
    one_of = corruption()[4]
    transform = one_of.transforms[1 if paint == "in" else 2]
    out = transform({"image": image.clone()})["image"]
    boxes = transform.dropper.hole_coords
    assert len(boxes) == 5
    inside = torch.zeros_like(image, dtype=torch.bool)
    for box in boxes:
        inside[box] = True
        sizes = [s.stop - s.start for s in box[1:]]
        low, high = ((64 // 6, 64 // 3) if paint == "in" else (64 - 4 * 64 // 7, 64 - 3 * 64 // 7))
        assert all(low <= s <= high for s in sizes), sizes
    changed = out != image
    painted = inside if paint == "in" else ~inside
    assert torch.equal(changed, painted)  # exactly the stated region is replaced...
    assert out[painted].min() >= 0 and out[painted].max() <= 1  # ...by uniform noise in [0, 1]
    # in-painting, out-painting and neither, with the published rates (paint 0.9, of which out-painting 0.8)
    assert np.allclose(one_of.weights, [0.1, 0.18, 0.72])


def test_flip_reaches_input_and_original_and_nothing_else_touches_the_original():
    image = torch.rand(1, 32, 32, 32)
    off = {"local_shuffle_prob": 0.0, "nonlinear_prob": 0.0, "paint_prob": 0.0, "flip_prob": 1.0}
    out = {"image": image.clone()}
    for t in corruption(**off):
        out = t(out)
    assert torch.equal(out["image"], out["target"]) and not torch.equal(out["target"], image)  # flipped, together
    out = {"image": image.clone()}
    for t in corruption(**{"flip_prob": 0.0}):
        out = t(out)
    assert torch.equal(out["target"], image) and not torch.equal(out["image"], image)  # the original stays intact


def test_restoration_loss_is_the_mean_squared_error_after_the_sigmoid():
    logits, original = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    terms = RestorationLoss()({"reconstruction": logits}, {"target": original})
    expected = np.mean((1 / (1 + np.exp(-logits.double().numpy())) - original.double().numpy()) ** 2)
    assert terms.keys() == {"loss", "restoration"} and abs(terms["loss"].item() - expected) < 1e-6
    raw = RestorationLoss(sigmoid=False)({"reconstruction": logits}, {"target": original})["loss"]
    assert abs(raw.item() - np.mean((logits.double().numpy() - original.double().numpy()) ** 2)) < 1e-5


def test_network_is_a_stock_basic_unet_with_its_encoder_for_the_probe():
    net = ModelsGenesisUNet(features=(4, 4, 8, 8, 16, 4))
    x = torch.rand(1, 1, 32, 32, 32)
    out = net(x)["reconstruction"]
    assert out.shape == x.shape
    stock = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    stock.load_state_dict(net.backbone.state_dict(), strict=True)
    assert torch.equal(stock.eval()(x), net.eval()(x)["reconstruction"])
    assert [tuple(f.shape[1:]) for f in net.encode(x)] == [(4, 32, 32, 32), (4, 16, 16, 16), (8, 8, 8, 8), (8, 4, 4, 4),
                                                          (16, 2, 2, 2)]
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 1, 24, 32, 32))
