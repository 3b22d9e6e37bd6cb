"""The pre-training methods' own transforms: HybridMIM's two-level masking (the network and the losses only read
its labels), Models Genesis' non-linear intensity curve (``RandBezierIntensityd``; the other Models Genesis
corruptions are MONAI's own transforms, configured in the bundle) and the views of the SwinUNETR pretext tasks
(``SwinSSLViews``).

Two-level masking geometry, for an input of spatial size (D, H, W), sub-volume side S and patch side P:

- level 1: the crop is cut into a grid of (D/S, H/S, W/S) sub-volumes ("regions"), numbered in raster order
  over (d, h, w), so region r sits at ``numpy.unravel_index(r, grid)``;
- level 2: each region is cut into n x n x n patches of side P = S / n (n = 2 by default: 2 x 2 x 2 patches
  numbered k = 4 * kd + 2 * kh + kw, in raster order over the region's patch grid);
- exactly ``round(mask_ratio * number_of_patches)`` patches are chosen uniformly at random over the whole crop.

The geometry itself (``region_grid``, ``patch_labels``) is in ``hybridmim_components.geometry``, shared with the
networks and the losses. The same raster order is what ``HybridMIMUNet`` produces when it pools bottleneck features onto the region
grid and flattens them, so labels and features describe the same voxels (the authors' code did not).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import TransformBackends, ensure_tuple_rep
from monai.utils.misc import get_seed
from monai.utils.type_conversion import convert_data_type, convert_to_dst_type, convert_to_tensor

from hybridmim_components.batch_keys import MaskKeys
from hybridmim_components.geometry import patch_labels, patches_per_axis, region_grid

__all__ = ["TwoLevelMaskd", "TwoLevelMask", "bezier_curve", "RandBezierIntensity", "RandBezierIntensityd", "SwinSSLViews"]

def _check_geometry(sub_volume_size, patch_size, mask_ratio) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    sub_volume_size, patch_size = ensure_tuple_rep(sub_volume_size, 3), ensure_tuple_rep(patch_size, 3)
    patches_per_axis(sub_volume_size, patch_size)  # raises where the patches do not tile a sub-volume
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
    return sub_volume_size, patch_size, float(mask_ratio)


class TwoLevelMaskd(Randomizable, MapTransform):
    """Mask random level-2 patches of a (C, D, H, W) image and write the region labels of HybridMIM.

    The image under ``keys`` is replaced by the masked image. The transform writes:

    - ``target_key``: the original image (same type and meta data as the input);
    - ``mask_key``: bool tensor (1, D, H, W), True where a voxel is masked;
    - ``count_key``: int64 tensor (R,), number of masked patches in each region (0..K);
    - ``location_key``: float32 tensor (R, K), 1 for each masked patch of each region;

    with R = (D/S) * (H/S) * (W/S) regions in raster order (see the module docstring).

    This is the per-sample form for a data pipeline; ``TwoLevelMask`` does the same to a whole batch on the
    device. Random draws come from ``self.R``: seed it with ``set_random_state``; an instance built after
    ``monai.utils.set_determinism(seed)`` starts from that seed, as ``Compose`` does.

    Args:
        keys: key of the image to mask (exactly one).
        sub_volume_size: side S of a level-1 sub-volume, an int or one per spatial axis.
        patch_size: side P of a level-2 patch, dividing S: a sub-volume holds K = (S / P)^3 patches (8 for the
            default 32-16; 64 for 64-16 or 32-8).
        mask_ratio: fraction of all level-2 patches to mask, in (0, 1).
        fill_value: value written into masked voxels.
        target_key, mask_key, count_key, location_key: names of the items written.
        allow_missing_keys: do not raise if the key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sub_volume_size: Sequence[int] | int = 32,
        patch_size: Sequence[int] | int = 16,
        mask_ratio: float = 0.4,
        fill_value: float = 0.0,
        target_key: str = MaskKeys.TARGET,
        mask_key: str = MaskKeys.MASK,
        count_key: str = MaskKeys.COUNT,
        location_key: str = MaskKeys.LOCATION,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"TwoLevelMaskd masks one image key, got keys={self.keys}; stack channels instead.")
        self.sub_volume_size, self.patch_size, self.mask_ratio = _check_geometry(sub_volume_size, patch_size, mask_ratio)
        self.fill_value = fill_value
        self.target_key = target_key
        self.mask_key = mask_key
        self.count_key = count_key
        self.location_key = location_key
        self._masked: np.ndarray | None = None
        self.set_random_state(seed=get_seed())

    def randomize(self, num_patches: int) -> None:  # type: ignore[override]
        num_masked = round(self.mask_ratio * num_patches)
        self._masked = np.zeros(num_patches, dtype=bool)
        self._masked[self.R.permutation(num_patches)[:num_masked]] = True

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            # keep the input's kind: a MetaTensor stays one, a plain tensor (or array) gives plain tensors
            image = convert_to_tensor(d[key], track_meta=isinstance(d[key], MetaTensor))
            if image.ndim != 4:
                raise ValueError(f"TwoLevelMaskd expects '{key}' of shape (C, D, H, W), got {tuple(image.shape)}.")
            grid = region_grid(image.shape[1:], self.sub_volume_size)
            per_axis = patches_per_axis(self.sub_volume_size, self.patch_size)
            self.randomize(int(np.prod(grid)) * int(np.prod(per_axis)))
            flags = torch.as_tensor(self._masked, device=image.device).reshape(1, *grid, *per_axis)
            labels = patch_labels(flags, self.patch_size)
            d[self.count_key] = labels["count"][0]
            d[self.location_key] = labels["location"][0]
            d[self.mask_key] = labels["mask"][0]
            d[self.target_key] = image.clone()
            d[key] = image.masked_fill(d[self.mask_key], self.fill_value)
        return d


class TwoLevelMask:
    """Two-level masking of a whole (B, C, D, H, W) batch where it lies (on the GPU after the move to the device).

    The geometry and the labels are those of ``TwoLevelMaskd`` (one call of ``patch_labels``); each sample gets
    its own random patches, drawn for the whole batch at once (no per-sample loop, no host-side tensor). Draws
    come from ``generator`` if given, else from torch's default generator of the batch's device, which
    ``monai.utils.set_determinism`` seeds.

    Args:
        sub_volume_size, patch_size, mask_ratio, fill_value: as in ``TwoLevelMaskd``.
        generator: optional ``torch.Generator`` on the batch's device.

    ``__call__(images)`` returns a dict with the ``MaskKeys`` items, batched: ``"image"`` the masked batch,
    ``target`` the original (the same tensor object: nothing is copied), ``mask`` bool (B, 1, D, H, W),
    ``mask_count`` int64 (B, R), ``mask_location`` float32 (B, R, K).
    """

    def __init__(
        self,
        sub_volume_size: Sequence[int] | int = 32,
        patch_size: Sequence[int] | int = 16,
        mask_ratio: float = 0.4,
        fill_value: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.sub_volume_size, self.patch_size, self.mask_ratio = _check_geometry(sub_volume_size, patch_size, mask_ratio)
        self.fill_value = fill_value
        self.generator = generator

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 5:
            raise ValueError(f"TwoLevelMask expects a batch of shape (B, C, D, H, W), got {tuple(images.shape)}.")
        b = images.shape[0]
        grid = region_grid(images.shape[2:], self.sub_volume_size)
        per_axis = patches_per_axis(self.sub_volume_size, self.patch_size)
        num_patches = int(np.prod(grid)) * int(np.prod(per_axis))
        scores = torch.rand(b, num_patches, device=images.device, generator=self.generator)
        chosen = scores.argsort(dim=1)[:, : round(self.mask_ratio * num_patches)]
        flags = torch.zeros(b, num_patches, dtype=torch.bool, device=images.device).scatter_(1, chosen, True)
        labels = patch_labels(flags.reshape(b, *grid, *per_axis), self.patch_size)
        return {
            "image": images.masked_fill(labels["mask"], self.fill_value),
            MaskKeys.TARGET: images,
            MaskKeys.MASK: labels["mask"],
            MaskKeys.COUNT: labels["count"],
            MaskKeys.LOCATION: labels["location"],
        }


def bezier_curve(control_points: np.ndarray, num_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The points (x(t), y(t)) of the Bezier curve of (K, 2) ``control_points`` at ``num_points`` values of t
    from 0 to 1, in curve order: the curve starts at the first control point and ends at the last."""
    control_points = np.asarray(control_points, dtype=np.float64)
    degree = len(control_points) - 1
    t = np.linspace(0.0, 1.0, num_points)[:, None]
    k = np.arange(degree + 1)[None]
    binomial = np.array([math.comb(degree, i) for i in range(degree + 1)])[None]
    bernstein = binomial * t**k * (1 - t) ** (degree - k)  # (num_points, K)
    curve = bernstein @ control_points
    return curve[:, 0], curve[:, 1]


class RandBezierIntensity(RandomizableTransform):
    """Models Genesis' non-linear transformation: intensities in [0, 1] mapped through a random monotone curve.

    The curve is the cubic Bezier curve from (0, 0) to (1, 1) with two control points drawn uniformly in the unit
    square. With control points in the unit square both x(t) and y(t) are monotone in t (the derivative of y(t),
    3 [y1 (1 - t)^2 + 2 (y2 - y1) t (1 - t) + (1 - y2) t^2], is never negative for y1, y2 in [0, 1]), so the curve
    is an increasing map and every intensity keeps its rank. With probability ``invert_prob`` the curve's y values
    are taken in reverse order: a decreasing map, which inverts the contrast (the authors' "flip", which pairs
    the sorted x values with the y values in reverse curve order). Values outside [0, 1] are clamped to the
    curve's ends.

    Args:
        prob: probability of transforming (Models Genesis: 0.9).
        invert_prob: probability that a transformed image is inverted (Models Genesis: 0.5).
        num_points: points on the curve between which intensities are interpolated.

    ``__call__(img)`` with ``img`` (C, D, H, W) returns an image of the same shape and type.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, prob: float = 0.9, invert_prob: float = 0.5, num_points: int = 10000) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= invert_prob <= 1.0:
            raise ValueError(f"invert_prob must be in [0, 1], got {invert_prob}.")
        if num_points < 2:
            raise ValueError(f"num_points must be at least 2, got {num_points}.")
        self.invert_prob, self.num_points = invert_prob, num_points
        self._control_points = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
        self._invert = False

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._control_points = np.concatenate([[[0.0, 0.0]], self.R.uniform(size=(2, 2)), [[1.0, 1.0]]])
            self._invert = bool(self.R.uniform() < self.invert_prob)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The current map: increasing x values and their y values."""
        x, y = bezier_curve(self._control_points, self.num_points)
        order = np.argsort(x, kind="stable")  # np.interp needs increasing x; x(t) is monotone up to rounding
        x, y = x[order], y[order]
        return x, (y[::-1] if self._invert else y)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        values, *_ = convert_data_type(img, np.ndarray)
        out = np.interp(values, *self.curve()).astype(values.dtype, copy=False)
        return convert_to_dst_type(out, dst=img)[0]


class RandBezierIntensityd(RandomizableTransform, MapTransform):
    """Dictionary form of ``RandBezierIntensity``: the same curve for every key of one item."""

    backend = RandBezierIntensity.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.9, invert_prob: float = 0.5, num_points: int = 10000,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.curve = RandBezierIntensity(prob=1.0, invert_prob=invert_prob, num_points=num_points)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandBezierIntensityd:
        super().set_random_state(seed, state)
        self.curve.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            for key in self.key_iterator(d):
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        self.curve.randomize()
        for key in self.key_iterator(d):
            d[key] = self.curve(d[key], randomize=False)
        return d


class SwinSSLViews:
    """The two views of the SwinUNETR pretext tasks (Tang et al., CVPR 2022) for a whole (B, C, D, H, W) batch of
    cubic crops, where the batch lies (on the GPU after the move to the device).

    Each crop gives two views. Each view is the crop rotated by k x 90 degrees in the plane of the last two
    spatial axes, k drawn uniformly from 0..3: k is the rotation label, and the rotated view is the reconstruction
    target. The network sees each rotated view after the reference's two augmentations (its ``aug_rand``):

    1. cut-out: boxes filled with Gaussian noise rescaled to [0, 1], drawn until they add up to a fraction of the
       voxels drawn uniformly from [0, ``max_drop``). A box starts anywhere but the last ``tolerance`` of each
       axis; its side is from ``tolerance`` to ``max_block`` of the axis, cut at the border;
    2. with probability (B - 1) / B, boxes drawn the same way are filled with the same voxels of another crop of
       the batch, already cut out. The reference draws a random crop of the batch, itself included, and pastes
       nothing when it draws itself.

    Box geometry and crop choices come from ``generator`` (a CPU ``torch.Generator``), or else from torch's default
    CPU generator; the noise from the default generator of the batch's device. ``monai.utils.set_determinism``
    seeds both, and a full checkpoint's run state holds both.

    Args:
        max_drop: upper bound of the fraction of each view that is cut out (and of what is pasted).
        max_block: largest box side, as a fraction of the axis.
        tolerance: smallest box side, and the margin at the end of each axis, as a fraction of the axis.
        generator: optional CPU ``torch.Generator`` (validation's fixed views).

    ``__call__(images)`` returns a dict: ``"image"`` and ``"view2"`` the augmented views (B, C, D, H, W) each;
    ``target`` (2B, C, D, H, W) the rotated views, first views first; ``rotation`` int64 (2B,) their k.
    """

    def __init__(self, max_drop: float = 0.3, max_block: float = 0.25, tolerance: float = 0.05,
                 generator: torch.Generator | None = None) -> None:
        if not 0.0 <= max_drop < 1.0:
            raise ValueError(f"max_drop must be in [0, 1), got {max_drop}.")
        if not 0.0 < tolerance < max_block <= 1.0:
            raise ValueError(f"need 0 < tolerance < max_block <= 1, got tolerance={tolerance}, max_block={max_block}.")
        self.max_drop, self.max_block, self.tolerance = max_drop, max_block, tolerance
        self.generator = generator

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _integer(self, low: int, high: int) -> int:
        """Uniform in [low, high), or low for an empty range (a tiny axis)."""
        return low if high <= low else int(torch.randint(low, high, (), generator=self.generator))

    def boxes(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        """Boxes drawn as the reference's ``patch_rand_drop`` draws them, until they cover the drawn fraction."""
        tolerance = [max(1, int(self.tolerance * s)) for s in spatial]
        largest = [max(t + 1, int(self.max_block * s)) for t, s in zip(tolerance, spatial)]
        goal, covered, found = self._uniform() * self.max_drop * math.prod(spatial), 0, []
        while covered < goal:
            box = []
            for s, t, big in zip(spatial, tolerance, largest):
                start = self._integer(0, s - t)
                box.append(slice(start, min(start + self._integer(t, big), s)))
            found.append(tuple(box))
            covered += math.prod(b.stop - b.start for b in box)
        return found

    def _augment(self, views: torch.Tensor) -> torch.Tensor:
        out = views.clone()
        b, spatial = len(views), views.shape[2:]
        for i in range(b):
            for box in self.boxes(spatial):
                region = (i, slice(None), *box)
                noise = torch.randn(out[region].shape, device=out.device, dtype=out.dtype)
                out[region] = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-8)
            other = self._integer(0, b)
            if other != i:
                for box in self.boxes(spatial):
                    out[(i, slice(None), *box)] = out[(other, slice(None), *box)]
        return out

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 5 or images.shape[3] != images.shape[4]:
            raise ValueError(
                f"SwinSSLViews expects a batch (B, C, D, H, W) with H == W, which a rotation in that plane keeps, "
                f"got {tuple(images.shape)}."
            )
        b = images.shape[0]
        rotation = torch.randint(0, 4, (2 * b,), generator=self.generator)
        plain = images.as_tensor() if isinstance(images, MetaTensor) else images
        both = torch.cat([plain, plain])
        target = torch.stack([torch.rot90(x, int(k), dims=(2, 3)) for x, k in zip(both, rotation.tolist())])
        augmented = self._augment(target)
        # the views keep the batch's metadata (file names, affines) for inference to write them like the input
        view1, view2 = (convert_to_dst_type(v, dst=images)[0] for v in (augmented[:b], augmented[b:]))
        return {"image": view1, "view2": view2, MaskKeys.TARGET: target, "rotation": rotation.to(images.device)}
