"""The patch and region geometry that masking, the networks and the losses share.

A crop of spatial size (D, H, W) is cut into a grid of sub-volumes ("regions") of side S, numbered in raster
order over (d, h, w); each region is cut into n x n x n patches of side P = S / n (the paper's default n = 2:
32-16; its Figure 6 also 64-32, 64-16 and 32-8), numbered in raster order over the region's patch grid
(k = 4 * kd + 2 * kh + kw for n = 2).
``region_grid`` and ``patch_labels`` spell that out once (``transforms`` masks by it, ``networks`` pools features
onto it, ``losses`` reads its labels); ``patchify`` and ``unpatchify`` are the raster order of a ViT's patch
embedding (MAE's targets and the pictures of its reconstructions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NUM_PATCHES", "patches_per_axis", "region_grid", "patch_labels", "patchify", "unpatchify"]

NUM_PATCHES = 8  # level-2 patches per sub-volume at the default geometry (2 x 2 x 2)


def patches_per_axis(sub_volume_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """How many level-2 patches a sub-volume holds along each axis; raises ValueError where a patch does not tile
    its sub-volume, or where a sub-volume would hold one patch only (nothing for the count head to count)."""
    if any(p < 1 or s % p for s, p in zip(sub_volume_size, patch_size)):
        raise ValueError(f"patch_size {tuple(patch_size)} must divide sub_volume_size {tuple(sub_volume_size)} on every "
                         "axis (e.g. 32-16, 64-16, 32-8).")
    per_axis = tuple(s // p for s, p in zip(sub_volume_size, patch_size))
    if int(torch.tensor(per_axis).prod()) < 2:
        raise ValueError(f"sub_volume_size {tuple(sub_volume_size)} and patch_size {tuple(patch_size)} make one patch "
                         "per sub-volume; a sub-volume needs at least two (patch_size <= sub_volume_size / 2).")
    return per_axis


def region_grid(spatial_shape: Sequence[int], sub_volume_size: Sequence[int]) -> tuple[int, ...]:
    """Number of sub-volumes along each spatial axis; raises ValueError when they do not tile the shape."""
    if any(s % v for s, v in zip(spatial_shape, sub_volume_size)):
        raise ValueError(
            f"spatial size {tuple(spatial_shape)} is not a multiple of the sub-volume size "
            f"{tuple(sub_volume_size)}; crop or pad the image to a multiple of it (e.g. with SpatialPadd)."
        )
    return tuple(s // v for s, v in zip(spatial_shape, sub_volume_size))


def patch_labels(flags: torch.Tensor, patch_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """Region labels and voxel mask from per-patch flags, the one place where the geometry is spelled out.

    Args:
        flags: bool (B, gd, gh, gw, nd, nh, nw): True for a masked patch, regions in raster order, patches in raster
            order over each region's nd x nh x nw patch grid.
        patch_size: side of a level-2 patch along (D, H, W).

    Returns:
        ``count`` int64 (B, R), ``location`` float32 (B, R, K) and ``mask`` bool (B, 1, D, H, W), with
        R = gd * gh * gw, K = nd * nh * nw and D = nd * gd * patch_size[0] (likewise H, W).
    """
    b, gd, gh, gw, nd, nh, nw = flags.shape
    pd, ph, pw = patch_size
    per_region = flags.reshape(b, gd * gh * gw, nd * nh * nw)
    patch_grid = flags.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nd * gd, nh * gh, nw * gw)
    voxels = patch_grid[:, :, None, :, None, :, None].expand(b, nd * gd, pd, nh * gh, ph, nw * gw, pw)
    return {
        "count": per_region.sum(dim=-1, dtype=torch.int64),
        "location": per_region.to(torch.float32),
        "mask": voxels.reshape(b, 1, nd * gd * pd, nh * gh * ph, nw * gw * pw),
    }


def patchify(images: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, p1 * p2 * p3 * C): patches in the raster order of a ViT's patch embedding."""
    b, c = images.shape[:2]
    (d, h, w), (p1, p2, p3) = [s // p for s, p in zip(images.shape[2:], patch_size)], patch_size
    patches = images.reshape(b, c, d, p1, h, p2, w, p3).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return patches.reshape(b, d * h * w, p1 * p2 * p3 * c)


def unpatchify(patches: torch.Tensor, patch_size: Sequence[int], spatial_size: Sequence[int]) -> torch.Tensor:
    """(B, N, p1 * p2 * p3 * C) -> (B, C, D, H, W): the inverse of ``patchify`` for an image of ``spatial_size``."""
    (d, h, w), (p1, p2, p3) = [s // p for s, p in zip(spatial_size, patch_size)], patch_size
    b, n, length = patches.shape
    c = length // (p1 * p2 * p3)
    if n != d * h * w or c * p1 * p2 * p3 != length:
        raise ValueError(
            f"{n} patches of {length} values do not tile {tuple(spatial_size)} with patches of {tuple(patch_size)}."
        )
    volume = patches.reshape(b, d, h, w, p1, p2, p3, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return volume.reshape(b, c, d * p1, h * p2, w * p3)
