"""HybridMIM networks: a stock MONAI backbone plus small pre-training heads.

The backbone is kept as the attribute ``backbone`` and is used unchanged, so ``net.backbone.state_dict()`` (what
the bundles save as ``models/model.pt``) loads with ``strict=True`` into the same stock MONAI network that
fine-tuning builds. Only the heads below are pre-training-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.networks.nets import BasicUNet
from monai.utils import ensure_tuple_rep

from hybridmim_components.transforms import region_grid

__all__ = ["RegionHeads", "HybridMIMUNet", "centred_roi", "pool_regions"]

NUM_PATCHES = 8  # level-2 patches per sub-volume (2 x 2 x 2)


def centred_roi(
    spatial_shape: Sequence[int], roi_size: Sequence[int], align: int, roi_start: Sequence[int] | None = None
) -> tuple[slice, ...]:
    """Slices of a box of ``roi_size`` inside ``spatial_shape``, centred unless ``roi_start`` is given.

    The start is snapped down to a multiple of ``align`` (the network's total down-sampling factor) so that the
    same box can be cut exactly from every feature scale.
    """
    if any(r > s for r, s in zip(roi_size, spatial_shape)):
        raise ValueError(f"reconstruction roi {tuple(roi_size)} is larger than the input {tuple(spatial_shape)}.")
    if roi_start is None:
        roi_start = [(s - r) // 2 // align * align for s, r in zip(spatial_shape, roi_size)]
    if any(st % align or st < 0 or st + r > s for st, r, s in zip(roi_start, roi_size, spatial_shape)):
        raise ValueError(
            f"reconstruction roi start {tuple(roi_start)} (size {tuple(roi_size)}) must be a non-negative multiple "
            f"of {align} that keeps the box inside the input {tuple(spatial_shape)}."
        )
    return tuple(slice(st, st + r) for st, r in zip(roi_start, roi_size))


def pool_regions(features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Average (B, C, d, h, w) features over each sub-volume of the region grid: (B, R, C), R in raster order.

    This is the order in which ``TwoLevelMaskd`` numbers its regions, so row r of the result and label r of
    ``mask_count``/``mask_location`` describe the same voxels.
    """
    if any(f % g for f, g in zip(features.shape[2:], grid)):
        raise ValueError(
            f"feature map {tuple(features.shape[2:])} cannot be pooled onto the region grid {tuple(grid)}: the "
            "sub-volume size must be a multiple of the network's down-sampling factor."
        )
    return F.adaptive_avg_pool3d(features, tuple(grid)).flatten(2).transpose(1, 2)


class RegionHeads(nn.Module):
    """Count, location and projection heads on a deep feature map.

    Args:
        in_channels: channels C of the feature map.
        projection_dim: size of the contrastive embedding.

    ``forward(features, grid)`` with ``features`` (B, C, d, h, w) and the region grid (gd, gh, gw) returns
    ``count_logits`` (B, R, 9), ``location_logits`` (B, R, 8) and ``embeddings`` (B, projection_dim), with
    R = gd * gh * gw regions in the raster order that ``TwoLevelMaskd`` uses.
    """

    def __init__(self, in_channels: int, projection_dim: int = 384) -> None:
        super().__init__()
        self.count = nn.Linear(in_channels, NUM_PATCHES + 1)
        self.location = nn.Linear(in_channels, NUM_PATCHES)
        self.projection = nn.Linear(in_channels, projection_dim)

    def forward(self, features: torch.Tensor, grid: Sequence[int]) -> dict[str, torch.Tensor]:
        regions = pool_regions(features, grid)
        return {
            "count_logits": self.count(regions),
            "location_logits": self.location(regions),
            "embeddings": self.projection(features.mean(dim=(2, 3, 4))),
        }


class HybridMIMUNet(nn.Module):
    """MONAI ``BasicUNet`` with HybridMIM heads and partial region decoding.

    Args:
        in_channels: image channels; the backbone reconstructs the same number of channels.
        features: ``BasicUNet`` features (five encoder widths and the last decoder width).
        dropout: dropout inside the backbone; it also makes the two views of the contrastive loss differ.
        sub_volume_size: side of a level-1 sub-volume (as in ``TwoLevelMaskd``); a multiple of 16.
        roi_size: side(s) of the box that the decoder reconstructs, multiples of 16; ``None`` decodes the whole
            input (the slower "full" mode, for comparison).
        roi_start: corner of the box; ``None`` centres it.
        projection_dim: size of the contrastive embedding.
        contrastive_views: 2 encodes the batch twice with independent dropout (as one pass over the duplicated
            batch) during training; 1 disables it.
        act, norm, upsample: passed to ``BasicUNet``.

    ``forward(x)`` with ``x`` (B, C, D, H, W), D, H, W multiples of ``sub_volume_size``, returns a dict:

    - ``reconstruction``: (B, C, *roi_size) logits of the voxels inside the box;
    - ``roi``: the box as a tuple of three slices into (D, H, W);
    - ``count_logits``: (B, R, 9); ``location_logits``: (B, R, 8);
    - ``embeddings``: (2, B, projection_dim) for the two dropout views, or ``None`` when there is only one.
    """

    downsampling = 16  # BasicUNet pools four times

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.1,
        sub_volume_size: Sequence[int] | int = 32,
        roi_size: Sequence[int] | int | None = 64,
        roi_start: Sequence[int] | None = None,
        projection_dim: int = 384,
        contrastive_views: int = 2,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        self.sub_volume_size = ensure_tuple_rep(sub_volume_size, 3)
        if any(s % self.downsampling for s in self.sub_volume_size):
            raise ValueError(f"sub_volume_size {self.sub_volume_size} must be a multiple of {self.downsampling}.")
        self.roi_size = None if roi_size is None else ensure_tuple_rep(roi_size, 3)
        if self.roi_size is not None and any(r % self.downsampling or r <= 0 for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be positive multiples of {self.downsampling}.")
        self.roi_start = roi_start
        if contrastive_views not in (1, 2):
            raise ValueError(f"contrastive_views must be 1 or 2, got {contrastive_views}.")
        self.contrastive_views = contrastive_views
        self.backbone = BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=in_channels,
            features=features,
            act=act,
            norm=norm,
            dropout=dropout,
            upsample=upsample,
        )
        self.heads = RegionHeads(in_channels=features[4], projection_dim=projection_dim)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder feature maps, at scales 1, 1/2, 1/4, 1/8 and 1/16."""
        b = self.backbone
        skips = [b.conv_0(x)]
        for down in (b.down_1, b.down_2, b.down_3, b.down_4):
            skips.append(down(skips[-1]))
        return skips

    def decode(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        b = self.backbone
        x0, x1, x2, x3, x4 = skips
        u = b.upcat_4(x4, x3)
        u = b.upcat_3(u, x2)
        u = b.upcat_2(u, x1)
        u = b.upcat_1(u, x0)
        return b.final_conv(u)

    def forward(self, x: torch.Tensor) -> dict:
        spatial = x.shape[2:]
        grid = region_grid(spatial, self.sub_volume_size)
        if any(s % self.downsampling for s in spatial):
            raise ValueError(f"input spatial size {tuple(spatial)} must be a multiple of {self.downsampling}.")
        roi = centred_roi(spatial, self.roi_size or spatial, self.downsampling, self.roi_start)
        views = self.contrastive_views if self.training else 1
        n = x.shape[0]
        # one encoder pass over the duplicated batch: dropout draws independent masks for the two copies
        skips = self.encode(torch.cat([x] * views) if views > 1 else x)
        heads = self.heads(skips[-1], grid)
        cropped = []
        for level, feature in enumerate(skips):
            scale = 2**level
            box = tuple(slice(s.start // scale, s.stop // scale) for s in roi)
            cropped.append(feature[(slice(0, n), slice(None)) + box])
        return {
            "reconstruction": self.decode(cropped),
            "roi": roi,
            "count_logits": heads["count_logits"][:n],
            "location_logits": heads["location_logits"][:n],
            "embeddings": heads["embeddings"].reshape(views, n, -1) if views > 1 else None,
        }
