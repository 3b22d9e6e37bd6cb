"""Two-level masking for HybridMIM (masking lives here; the network and the losses only read its labels).

Geometry, for an input of spatial size (D, H, W), sub-volume side S and patch side P = S / 2:

- level 1: the crop is cut into a grid of (D/S, H/S, W/S) sub-volumes ("regions"), numbered in raster order
  over (d, h, w), so region r sits at ``numpy.unravel_index(r, grid)``;
- level 2: each region is cut into 2 x 2 x 2 patches, numbered k = 4 * kd + 2 * kh + kw (raster order over
  its halves);
- exactly ``round(mask_ratio * number_of_patches)`` patches are chosen uniformly at random over the whole crop.

The geometry itself (``region_grid``, ``patch_labels``) is in ``hybridmim_components.geometry``, shared with the
networks and the losses. The same raster order is what ``HybridMIMUNet`` produces when it pools bottleneck features onto the region
grid and flattens them, so labels and features describe the same voxels (the authors' code did not).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep
from monai.utils.misc import get_seed
from monai.utils.type_conversion import convert_to_tensor

from hybridmim_components.geometry import NUM_PATCHES, patch_labels, region_grid

__all__ = ["MaskKeys", "TwoLevelMaskd", "TwoLevelMask", "BratsChannelsToLabelsd"]

class MaskKeys:
    """Names of the items that ``TwoLevelMaskd`` writes and ``HybridMIMLoss`` reads."""

    TARGET = "target"
    MASK = "mask"
    COUNT = "mask_count"
    LOCATION = "mask_location"


def _check_geometry(sub_volume_size, patch_size, mask_ratio) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    sub_volume_size, patch_size = ensure_tuple_rep(sub_volume_size, 3), ensure_tuple_rep(patch_size, 3)
    if any(s != 2 * p or p < 1 for s, p in zip(sub_volume_size, patch_size)):
        raise ValueError(
            f"patch_size {patch_size} must split sub_volume_size {sub_volume_size} into 2 x 2 x 2 "
            "patches, i.e. patch_size = sub_volume_size / 2 on every axis."
        )
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
    return sub_volume_size, patch_size, float(mask_ratio)


class TwoLevelMaskd(Randomizable, MapTransform):
    """Mask random level-2 patches of a (C, D, H, W) image and write the region labels of HybridMIM.

    The image under ``keys`` is replaced by the masked image. The transform writes:

    - ``target_key``: the original image (same type and meta data as the input);
    - ``mask_key``: bool tensor (1, D, H, W), True where a voxel is masked;
    - ``count_key``: int64 tensor (R,), number of masked patches in each region (0..8);
    - ``location_key``: float32 tensor (R, 8), 1 for each masked patch of each region;

    with R = (D/S) * (H/S) * (W/S) regions in raster order (see the module docstring).

    This is the per-sample form for a data pipeline; ``TwoLevelMask`` does the same to a whole batch on the
    device. Random draws come from ``self.R``: seed it with ``set_random_state``; an instance built after
    ``monai.utils.set_determinism(seed)`` starts from that seed, as ``Compose`` does.

    Args:
        keys: key of the image to mask (exactly one).
        sub_volume_size: side S of a level-1 sub-volume, an int or one per spatial axis.
        patch_size: side of a level-2 patch; must be S / 2 so that a sub-volume splits into 2 x 2 x 2 patches.
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
            self.randomize(int(np.prod(grid)) * NUM_PATCHES)
            flags = torch.as_tensor(self._masked, device=image.device).reshape(1, *grid, 2, 2, 2)
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
    ``mask_count`` int64 (B, R), ``mask_location`` float32 (B, R, 8).
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
        num_patches = int(np.prod(grid)) * NUM_PATCHES
        scores = torch.rand(b, num_patches, device=images.device, generator=self.generator)
        chosen = scores.argsort(dim=1)[:, : round(self.mask_ratio * num_patches)]
        flags = torch.zeros(b, num_patches, dtype=torch.bool, device=images.device).scatter_(1, chosen, True)
        labels = patch_labels(flags.reshape(b, *grid, 2, 2, 2), self.patch_size)
        return {
            "image": images.masked_fill(labels["mask"], self.fill_value),
            MaskKeys.TARGET: images,
            MaskKeys.MASK: labels["mask"],
            MaskKeys.COUNT: labels["count"],
            MaskKeys.LOCATION: labels["location"],
        }


class BratsChannelsToLabelsd(MapTransform):
    """Turn binary (TC, WT, ET) channels, the order of MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd``,
    into one BraTS label map: 4 enhancing tumour, 1 the rest of the tumour core, 2 the rest of the whole tumour.

    Input (3, D, H, W) with values in {0, 1}; output (1, D, H, W) uint8.
    """

    def __init__(self, keys: KeysCollection, et_label: int = 4, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.et_label = et_label

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            channels = convert_to_tensor(d[key], track_meta=isinstance(d[key], MetaTensor))
            if channels.shape[0] != 3:
                raise ValueError(f"BratsChannelsToLabelsd expects '{key}' with 3 channels (TC, WT, ET), got {tuple(channels.shape)}.")
            tc, wt, et = (channels[i : i + 1] > 0.5 for i in range(3))
            label = torch.zeros_like(channels[:1], dtype=torch.uint8)
            label[wt] = 2
            label[tc] = 1
            label[et] = self.et_label
            d[key] = label
        return d
