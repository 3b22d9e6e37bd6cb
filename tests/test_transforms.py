import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai.data import MetaTensor
from monai.utils import set_determinism

from hybridmim_components.networks import pool_regions
from hybridmim_components.transforms import TwoLevelMask, TwoLevelMaskd


def mask_sample(shape=(1, 64, 96, 32), seed=0, **kwargs):
    t = TwoLevelMaskd("image", **kwargs)
    t.set_random_state(seed)
    image = torch.rand(*shape) + 0.5  # no voxel is 0 before masking
    return image, t({"image": image})


def check_labels(image, d):
    """Labels of one masked sample (C, D, H, W) against its voxel mask, recomputed by hand (32-voxel regions)."""
    mask = d["mask"][0]
    _, depth, height, width = image.shape
    gd, gh, gw = depth // 32, height // 32, width // 32
    assert d["mask_count"].shape == (gd * gh * gw,) and d["mask_count"].dtype == torch.int64
    assert d["mask_location"].shape == (gd * gh * gw, 8) and d["mask_location"].dtype == torch.float32
    for r in range(gd * gh * gw):
        i, j, k = np.unravel_index(r, (gd, gh, gw))  # regions in raster order
        for p in range(8):
            a, b, c = np.unravel_index(p, (2, 2, 2))  # patches in raster order of the halves
            block = mask[
                i * 32 + a * 16 : i * 32 + (a + 1) * 16,
                j * 32 + b * 16 : j * 32 + (b + 1) * 16,
                k * 32 + c * 16 : k * 32 + (c + 1) * 16,
            ]
            assert block.min() == block.max(), "a patch is masked whole or not at all"
            assert block[0, 0, 0] == d["mask_location"][r, p]
        assert d["mask_count"][r] == d["mask_location"][r].sum()
    # masked voxels hold the fill value, the others the original; the target is the original
    assert mask.dtype == torch.bool
    assert torch.equal(d["image"][0][mask], torch.zeros(int(mask.sum())))
    assert torch.equal(d["image"][0][~mask], image[0][~mask])
    assert torch.equal(d["target"], image)


def test_labels_recomputed_from_voxel_mask():
    image, d = mask_sample()
    check_labels(image, d)


def test_batch_masking_gives_each_sample_its_own_consistent_mask():
    images = torch.rand(3, 1, 64, 96, 32) + 0.5
    out = TwoLevelMask()(images)
    assert out["mask"].shape == (3, 1, 64, 96, 32) and out["mask_count"].shape == (3, 6)
    for i in range(3):
        check_labels(images[i], {k: v[i] for k, v in out.items()})
        assert int(out["mask_location"][i].sum()) == round(0.4 * 48)  # the exact ratio in every sample
    assert not torch.equal(out["mask"][0], out["mask"][1])


def test_batch_masking_is_seeded_by_its_generator():
    images = torch.rand(2, 2, 32, 32, 32)
    masks = [TwoLevelMask(16, 8, generator=torch.Generator().manual_seed(s))(images)["mask"] for s in (1, 1, 2)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    torch.manual_seed(5)
    first = TwoLevelMask(16, 8)(images)["mask"]
    torch.manual_seed(5)
    assert torch.equal(first, TwoLevelMask(16, 8)(images)["mask"])  # the default generator, as set_determinism seeds


def test_batch_masking_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        TwoLevelMask()(torch.rand(1, 64, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the sub-volume size"):
        TwoLevelMask()(torch.rand(1, 1, 48, 64, 64))
    with pytest.raises(ValueError, match="must divide sub_volume_size"):
        TwoLevelMask(patch_size=12)


def test_region_features_align_with_labels():
    """Pooling a feature map at the network's 1/16 scale onto the region grid gives each region's own count."""
    _, d = mask_sample(shape=(1, 96, 64, 64))
    features = F.avg_pool3d(d["mask"][None].float(), 16)  # fraction of masked voxels per bottleneck voxel
    regions = pool_regions(features, (3, 2, 2))[0, :, 0]
    assert torch.allclose(regions * 8, d["mask_count"].float())


@pytest.mark.parametrize("ratio,shape", [(0.4, (1, 96, 96, 96)), (0.75, (2, 64, 64, 32)), (0.1, (1, 32, 32, 32))])
def test_exact_masked_fraction(ratio, shape):
    _, d = mask_sample(shape=shape, mask_ratio=ratio)
    num_patches = np.prod(shape[1:]) // 16**3
    assert int(d["mask_location"].sum()) == round(ratio * num_patches)
    assert float(d["mask"].float().mean()) == pytest.approx(round(ratio * num_patches) / num_patches)


def test_smaller_patches_and_multichannel():
    _, d = mask_sample(shape=(4, 32, 32, 32), sub_volume_size=16, patch_size=8)
    assert d["mask_count"].shape == (8,) and d["image"].shape == (4, 32, 32, 32)
    # all channels share the mask
    assert torch.equal((d["image"] == 0).any(0), d["mask"][0])


def test_seeded_determinism():
    _, a = mask_sample(seed=3)
    _, b = mask_sample(seed=3)
    _, c = mask_sample(seed=4)
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], c["mask"])
    image = torch.rand(1, 64, 64, 64)
    set_determinism(seed=7)
    first = TwoLevelMaskd("image")({"image": image})["mask"]
    set_determinism(seed=7)
    second = TwoLevelMaskd("image")({"image": image})["mask"]
    set_determinism(seed=None)
    assert torch.equal(first, second)


def test_input_kind_kept():
    image = MetaTensor(torch.rand(1, 32, 32, 32), affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0])))
    d = TwoLevelMaskd("image", sub_volume_size=16, patch_size=8)({"image": image})
    assert isinstance(d["image"], MetaTensor) and isinstance(d["target"], MetaTensor)
    assert torch.equal(d["image"].affine, image.affine)
    plain = TwoLevelMaskd("image", sub_volume_size=16, patch_size=8)({"image": torch.rand(1, 32, 32, 32)})
    assert not any(isinstance(v, MetaTensor) for v in plain.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    d = TwoLevelMaskd("image")({"image": torch.rand(1, 64, 64, 64, device="cuda")})
    assert all(d[k].is_cuda for k in ("image", "target", "mask", "mask_count", "mask_location"))
    batch = TwoLevelMask()(torch.rand(2, 1, 64, 64, 64, device="cuda"))
    assert all(v.is_cuda for v in batch.values()) and batch["mask"].dtype == torch.bool


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({}, (1, 48, 64, 64), "not a multiple of the sub-volume size"),
        ({"patch_size": 12}, None, "must divide sub_volume_size"),
        ({"patch_size": 32}, None, "one patch per sub-volume"),
        ({"mask_ratio": 1.0}, None, r"mask_ratio must be in \(0, 1\)"),
        ({"mask_ratio": 0.0}, None, r"mask_ratio must be in \(0, 1\)"),
        ({}, (64, 64, 64), r"shape \(C, D, H, W\)"),
    ],
)
def test_clear_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        TwoLevelMaskd("image", **kwargs)({"image": torch.rand(*shape)})


@pytest.mark.parametrize("sub_volume,patch", [(64, 32), (64, 16), (32, 16), (32, 8)])
def test_any_number_of_patches_per_sub_volume(sub_volume, patch):
    """The paper's Figure 6 geometries: a sub-volume of (S/P)^3 patches, each masked whole, labels per region."""
    per_region = (sub_volume // patch) ** 3
    image, d = mask_sample(shape=(1, 64, 128, 64), sub_volume_size=sub_volume, patch_size=patch, mask_ratio=0.5)
    regions = (64 // sub_volume) * (128 // sub_volume) * (64 // sub_volume)
    assert d["mask_location"].shape == (regions, per_region) and d["mask_count"].shape == (regions,)
    assert torch.equal(d["mask_count"], d["mask_location"].sum(-1).long())
    assert d["mask_count"].sum() == round(0.5 * regions * per_region)
    # each patch is masked whole, and the location labels name the patches the voxel mask covers, in raster order
    n = sub_volume // patch
    patches = d["mask"][0].reshape(64 // sub_volume, n, patch, 128 // sub_volume, n, patch, 64 // sub_volume, n, patch)
    patches = patches.permute(0, 3, 6, 1, 4, 7, 2, 5, 8).reshape(regions, per_region, patch**3)
    assert torch.equal(patches.all(-1), patches.any(-1))
    assert torch.equal(patches.all(-1).float(), d["mask_location"])
    batch = TwoLevelMask(sub_volume, patch, 0.5)(torch.rand(2, 1, 64, 128, 64))
    assert batch["mask_location"].shape == (2, regions, per_region)
