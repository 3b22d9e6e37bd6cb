"""Two-level masking for HybridMIM (masking lives here; the network and the losses only read its labels).

Geometry, for an input of spatial size (D, H, W), sub-volume side S and patch side P = S / 2:

- level 1: the crop is cut into a grid of (D/S, H/S, W/S) sub-volumes ("regions"), numbered in raster order
  over (d, h, w), so region r sits at ``numpy.unravel_index(r, grid)``;
- level 2: each region is cut into 2 x 2 x 2 patches, numbered k = 4 * kd + 2 * kh + kw (raster order over
  its halves);
- exactly ``round(mask_ratio * number_of_patches)`` patches are chosen uniformly at random over the whole crop.

The same raster order is what ``HybridMIMUNet`` produces when it pools bottleneck features onto the region
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

__all__ = ["MaskKeys", "TwoLevelMaskd", "BratsChannelsToLabelsd", "region_grid"]


class MaskKeys:
    """Names of the items that ``TwoLevelMaskd`` writes and ``HybridMIMLoss`` reads."""

    TARGET = "target"
    MASK = "mask"
    COUNT = "mask_count"
    LOCATION = "mask_location"


def region_grid(spatial_shape: Sequence[int], sub_volume_size: Sequence[int]) -> tuple[int, ...]:
    """Number of sub-volumes along each spatial axis; raises ValueError when they do not tile the shape."""
    if any(s % v for s, v in zip(spatial_shape, sub_volume_size)):
        raise ValueError(
            f"spatial size {tuple(spatial_shape)} is not a multiple of the sub-volume size "
            f"{tuple(sub_volume_size)}; crop or pad the image to a multiple of it (e.g. with SpatialPadd)."
        )
    return tuple(s // v for s, v in zip(spatial_shape, sub_volume_size))


class TwoLevelMaskd(Randomizable, MapTransform):
    """Mask random level-2 patches of a (C, D, H, W) image and write the region labels of HybridMIM.

    The image under ``keys`` is replaced by the masked image. The transform writes:

    - ``target_key``: the original image (same type and meta data as the input);
    - ``mask_key``: float32 tensor (1, D, H, W), 1 where a voxel is masked;
    - ``count_key``: int64 tensor (R,), number of masked patches in each region (0..8);
    - ``location_key``: float32 tensor (R, 8), 1 for each masked patch of each region;

    with R = (D/S) * (H/S) * (W/S) regions in raster order (see the module docstring).

    Everything is computed with torch on the image's device, so the transform also runs on a batch item that
    is already on the GPU. Random draws come from ``self.R``: seed it with ``set_random_state``; an instance
    built after ``monai.utils.set_determinism(seed)`` starts from that seed, as ``Compose`` does.

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
        self.sub_volume_size = ensure_tuple_rep(sub_volume_size, 3)
        self.patch_size = ensure_tuple_rep(patch_size, 3)
        if any(s != 2 * p or p < 1 for s, p in zip(self.sub_volume_size, self.patch_size)):
            raise ValueError(
                f"patch_size {self.patch_size} must split sub_volume_size {self.sub_volume_size} into 2 x 2 x 2 "
                "patches, i.e. patch_size = sub_volume_size / 2 on every axis."
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.mask_ratio = float(mask_ratio)
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
            num_regions = int(np.prod(grid))
            self.randomize(num_regions * 8)
            # patches in region-major order: (gd, gh, gw, 2, 2, 2)
            patches = torch.as_tensor(self._masked, device=image.device).reshape(*grid, 2, 2, 2)
            d[self.count_key] = patches.reshape(num_regions, 8).sum(dim=1, dtype=torch.int64)
            d[self.location_key] = patches.reshape(num_regions, 8).to(torch.float32)
            d[self.mask_key] = self._voxel_mask(patches)[None].to(torch.float32)
            d[self.target_key] = image.clone()
            d[key] = image.masked_fill(d[self.mask_key].bool(), self.fill_value)
        return d

    def _voxel_mask(self, patches: torch.Tensor) -> torch.Tensor:
        """(gd, gh, gw, 2, 2, 2) patch flags -> (D, H, W) voxel flags."""
        gd, gh, gw = patches.shape[:3]
        pd, ph, pw = self.patch_size
        patch_grid = patches.permute(0, 3, 1, 4, 2, 5).reshape(2 * gd, 2 * gh, 2 * gw)
        voxels = patch_grid[:, None, :, None, :, None].expand(2 * gd, pd, 2 * gh, ph, 2 * gw, pw)
        return voxels.reshape(2 * gd * pd, 2 * gh * ph, 2 * gw * pw)


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
