"""HybridMIM's networks: a stock MONAI backbone (UNet or SwinUNETR) plus the region heads and partial region
decoding. The baselines' networks are in ``baseline_networks``.

The backbone is kept as the attribute ``backbone`` (``vit`` for MAE) and is used unchanged, so its
``state_dict()`` (what the bundles save as ``models/model.pt``) loads with ``strict=True`` into the same stock
MONAI network that fine-tuning builds. Only the heads defined here are pre-training-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.networks.nets import BasicUNet, SwinUNETR
from monai.utils import ensure_tuple_rep

from hybridmim_components.encoders import basic_unet_levels
from hybridmim_components.geometry import NUM_PATCHES, patches_per_axis, region_grid

__all__ = [
    "RegionHeads",
    "HybridMIMNetwork",
    "HybridMIMUNet",
    "HybridMIMSwinUNETR",
    "centred_roi",
    "pool_regions",
    "swin_level",
]

def centred_roi(
    spatial_shape: Sequence[int], roi_size: Sequence[int], align: int, roi_start: Sequence[int] | None = None
) -> tuple[slice, ...]:
    """Slices of a box of ``roi_size`` inside ``spatial_shape``, centred unless ``roi_start`` is given.

    The start is snapped down to a multiple of ``align`` (the down-sampling of the coarsest feature map that is
    cropped) so that the same box can be cut exactly from every cropped scale.
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


PROJECTION_GRID = 2  # the projection head's input: the deepest features pooled onto this grid per axis


class RegionHeads(nn.Module):
    """Count, location and projection heads on a deep feature map; each one is built only when asked for, so
    that an ablation leaves no parameter without a gradient (which ``DistributedDataParallel`` rejects).

    Args:
        in_channels: channels C of the feature map.
        projection_dim: size of the contrastive embedding.
        count, location, projection: which heads to build.
        num_patches: K, the level-2 patches of a region (8 for 2 x 2 x 2).

    ``regions(features, grid)`` with ``features`` (B, C, d, h, w) and the region grid (gd, gh, gw) returns
    ``count_logits`` (B, R, K + 1) and ``location_logits`` (B, R, K), ``None`` for a head not built, with
    R = gd * gh * gw regions in the raster order that ``TwoLevelMaskd`` uses. ``project(features)`` returns the
    (N, projection_dim) embeddings of (N, C, d, h, w) features.

    The projection sees the features average-pooled onto a fixed 2 x 2 x 2 grid and flattened, not pooled to
    one vector: the UNet's deepest level ends in instance normalisation, which makes each channel's global mean
    nearly the same for every input (cosine ~0.99 between crops of different volumes), and NT-Xent on such
    vectors stays at ln(2B - 1). It is SimCLR's MLP with batch normalisation (linear, BatchNorm, ReLU, linear);
    project both views in one call, so that its batch norm sees 2B samples.
    """

    def __init__(
        self, in_channels: int, projection_dim: int = 384, count: bool = True, location: bool = True,
        projection: bool = True, num_patches: int = NUM_PATCHES,
    ) -> None:
        super().__init__()
        self.count = nn.Linear(in_channels, num_patches + 1) if count else None
        self.location = nn.Linear(in_channels, num_patches) if location else None
        self.projection = nn.Sequential(
            nn.Linear(in_channels * PROJECTION_GRID**3, projection_dim),
            nn.BatchNorm1d(projection_dim),
            nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim),
        ) if projection else None

    def regions(self, features: torch.Tensor, grid: Sequence[int]) -> dict[str, torch.Tensor | None]:
        if self.count is None and self.location is None:
            return {"count_logits": None, "location_logits": None}
        regions = pool_regions(features, grid)
        return {
            "count_logits": None if self.count is None else self.count(regions),
            "location_logits": None if self.location is None else self.location(regions),
        }

    def project(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError("this network has no projection head; build it with contrastive_views=2.")
        return self.projection(F.adaptive_avg_pool3d(features, PROJECTION_GRID).flatten(1))


def crop_to(feature: torch.Tensor, roi: Sequence[slice], scale: int) -> torch.Tensor:
    """The part of a (B, C, ...) feature map at 1/``scale`` resolution that covers the full-resolution ``roi``."""
    return feature[(slice(None), slice(None)) + tuple(slice(s.start // scale, s.stop // scale) for s in roi)]


class HybridMIMNetwork(nn.Module):
    """The HybridMIM forward pass around a backbone; subclasses say how to encode and how to decode a box.

    The encoder is a chain of ``num_levels`` levels (``encode_level``). Dropout, which makes the two contrastive
    views differ, is kept only in the levels of ``dropout_levels``; every level before the first of them gives
    both views the same output, so it runs once on the batch, and the batch is duplicated only from there on
    (the "shared trunk"). ``dropout_levels=None`` keeps the backbone's dropout everywhere, so the whole encoder
    runs on the duplicated batch (the costly original form, kept for ablations and benchmarks). The decoder
    keeps the backbone's dropout and runs on the first view only.

    ``forward(x)`` with ``x`` (B, C, D, H, W), D, H, W multiples of ``sub_volume_size`` and of the backbone's
    down-sampling, returns a dict:

    - ``reconstruction``: (B, C, *roi_size) logits of the voxels inside the box (``None`` in training when
      ``reconstruct`` is off; evaluation always decodes, so that the validation metric stays defined);
    - ``roi``: the box as a tuple of three slices into (D, H, W);
    - ``count_logits``: (B, R, 9); ``location_logits``: (B, R, 8) (``None`` for a head not built);
    - ``embeddings``: (2, B, projection_dim) for the two dropout views in training, else ``None``.
    """

    downsampling: int  # the input must be a multiple of this
    roi_align: int  # the box's start and size must be multiples of this
    num_levels: int  # encoder levels, from the input's resolution down

    def __init__(
        self,
        backbone: nn.Module,
        deepest_channels: int,
        *,
        sub_volume_size: Sequence[int] | int,
        patch_size: Sequence[int] | int | None,
        roi_size: Sequence[int] | int | None,
        roi_start: Sequence[int] | None,
        projection_dim: int,
        contrastive_views: int,
        dropout_levels: Sequence[int] | None,
        stop_gradient: bool,
        count_head: bool,
        location_head: bool,
        reconstruct: bool,
    ) -> None:
        super().__init__()
        self.sub_volume_size = ensure_tuple_rep(sub_volume_size, 3)
        if any(s % self.downsampling for s in self.sub_volume_size):
            raise ValueError(f"sub_volume_size {self.sub_volume_size} must be a multiple of {self.downsampling}.")
        self.roi_size = None if roi_size is None else ensure_tuple_rep(roi_size, 3)
        if self.roi_size is not None and any(r % self.roi_align or r <= 0 for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be positive multiples of {self.roi_align}.")
        self.roi_start = roi_start
        if contrastive_views not in (1, 2):
            raise ValueError(f"contrastive_views must be 1 or 2, got {contrastive_views}.")
        self.contrastive_views = contrastive_views
        self.backbone = backbone
        self.dropout_levels = None if dropout_levels is None else sorted(set(dropout_levels))
        if self.dropout_levels is not None:
            if not set(self.dropout_levels) <= set(range(self.num_levels)):
                raise ValueError(f"dropout_levels {dropout_levels} must be encoder levels 0..{self.num_levels - 1}.")
            for level in set(range(self.num_levels)) - set(self.dropout_levels):
                for module in self.level_modules(level):
                    for dropout in module.modules():
                        if isinstance(dropout, nn.Dropout):
                            dropout.p = 0.0  # an identity in training; dropout has no weights to save
        dropout_in_use = self._dropout_levels_in_use()
        if contrastive_views == 2 and not dropout_in_use:
            raise ValueError(
                "contrastive_views=2 needs dropout in the encoder (dropout > 0 and at least one dropout level): "
                "without it the two views are identical; use contrastive_views=1 instead."
            )
        # levels before the first dropout give both views the same output: they run once
        self.trunk_levels = min(dropout_in_use) if contrastive_views == 2 else self.num_levels
        self.stop_gradient = stop_gradient
        self.reconstruct = reconstruct
        patch_size = tuple(s // 2 for s in self.sub_volume_size) if patch_size is None else ensure_tuple_rep(patch_size, 3)
        num_patches = int(torch.tensor(patches_per_axis(self.sub_volume_size, patch_size)).prod())
        self.heads = RegionHeads(deepest_channels, projection_dim, count=count_head, location=location_head,
                                 projection=contrastive_views == 2, num_patches=num_patches)

    # what a backbone says: its encoder levels, where their dropout lives, and how to decode a box
    def encode_level(self, level: int, h: torch.Tensor) -> torch.Tensor:
        """Level ``level`` of the encoder applied to the output of the level before (level 0: the input)."""
        raise NotImplementedError

    def level_modules(self, level: int) -> list[nn.Module]:
        """The modules of an encoder level (where its dropout is)."""
        raise NotImplementedError

    def level_output(self, h: torch.Tensor) -> torch.Tensor:
        """The feature map that the heads and the decoder see for a level's output."""
        return h

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        """Reconstruction logits of the voxels of ``roi``, from the input and its (first-view) features."""
        raise NotImplementedError

    def _dropout_levels_in_use(self) -> list[int]:
        return [
            level for level in range(self.num_levels)
            if any(isinstance(m, nn.Dropout) and m.p > 0 for mod in self.level_modules(level) for m in mod.modules())
        ]

    def _run_levels(self, h: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        outputs = []
        for level in range(start, stop):
            h = self.encode_level(level, h)
            outputs.append(h)
        return outputs

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps of one view of ``x``, from the finest to the deepest."""
        return [self.level_output(h) for h in self._run_levels(x, 0, self.num_levels)]

    def forward(self, x: torch.Tensor) -> dict:
        spatial = x.shape[2:]
        grid = region_grid(spatial, self.sub_volume_size)
        if any(s % self.downsampling for s in spatial):
            raise ValueError(f"input spatial size {tuple(spatial)} must be a multiple of {self.downsampling}.")
        roi = centred_roi(spatial, self.roi_size or spatial, self.roi_align, self.roi_start)
        two_views = self.training and self.contrastive_views == 2
        split = self.trunk_levels if two_views else self.num_levels
        n = x.shape[0]

        trunk = self._run_levels(x, 0, split)
        h = trunk[-1] if trunk else x
        second = None
        if not two_views:
            branch = self._run_levels(h, split, self.num_levels)
        elif self.stop_gradient:  # the authors' variant: the second view is a constant target
            branch = self._run_levels(h, split, self.num_levels)
            with torch.no_grad():
                second = self.level_output(self._run_levels(h, split, self.num_levels)[-1])
        else:  # one pass over the duplicated batch: dropout draws independent masks for the two copies
            both = self._run_levels(torch.cat([h, h]), split, self.num_levels)
            second = self.level_output(both[-1][n:])
            branch = [b[:n] for b in both]
        features = [self.level_output(f) for f in trunk + branch]

        embeddings = None
        if second is not None:  # one call: the projection's batch norm sees both views
            projected = self.heads.project(torch.cat([features[-1], second]))
            first, second = projected[:n], projected[n:]
            embeddings = torch.stack([first, second.detach() if self.stop_gradient else second])
        decode = self.reconstruct or not self.training
        return {
            "reconstruction": self.decode(x, features, roi) if decode else None,
            "roi": roi,
            **self.heads.regions(features[-1], grid),
            "embeddings": embeddings,
        }


class HybridMIMUNet(HybridMIMNetwork):
    """MONAI ``BasicUNet`` with HybridMIM heads on its bottleneck (1/16) and partial region decoding.

    The decoder runs on the box only: every encoder feature map is cropped to the box at its own scale.

    Args:
        in_channels: image channels; the backbone reconstructs the same number of channels.
        features: ``BasicUNet`` features (five encoder widths and the last decoder width).
        dropout: dropout inside the backbone's blocks; it makes the two contrastive views differ.
        dropout_levels: encoder levels that keep dropout (0: full resolution, 1: 1/2, ..., 4: 1/16); the levels
            before the first of them run once for both views. ``None``: dropout in every block, as ``BasicUNet``
            builds it, and the whole encoder runs twice.
        stop_gradient: encode the second view without gradients (the authors' variant).
        sub_volume_size: side of a level-1 sub-volume (as in ``TwoLevelMaskd``); a multiple of 16.
        patch_size: side of a level-2 patch (as in ``TwoLevelMaskd``), dividing ``sub_volume_size``; ``None``:
            half of it. The count and location heads have one output per patch of a sub-volume.
        roi_size: side(s) of the box that the decoder reconstructs, multiples of 16; ``None`` decodes the whole
            input (the slower "full" mode, for comparison).
        roi_start: corner of the box; ``None`` centres it.
        projection_dim: size of the contrastive embedding.
        contrastive_views: 2 for the dropout views of the contrastive loss, 1 disables them (and the projection).
        count_head, location_head: build the count / location head (off when its loss terms are off).
        reconstruct: decode the box in training (off when the reconstruction weight is 0).
        act, norm, upsample: passed to ``BasicUNet``.
    """

    downsampling = 16  # BasicUNet pools four times
    roi_align = 16
    num_levels = 5

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.1,
        dropout_levels: Sequence[int] | None = (3, 4),
        stop_gradient: bool = False,
        sub_volume_size: Sequence[int] | int = 32,
        patch_size: Sequence[int] | int | None = None,
        roi_size: Sequence[int] | int | None = 64,
        roi_start: Sequence[int] | None = None,
        projection_dim: int = 384,
        contrastive_views: int = 2,
        count_head: bool = True,
        location_head: bool = True,
        reconstruct: bool = True,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        upsample: str = "deconv",
    ) -> None:
        backbone = BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=in_channels,
            features=features,
            act=act,
            norm=norm,
            dropout=dropout,
            upsample=upsample,
        )
        super().__init__(
            backbone, features[4], sub_volume_size=sub_volume_size, patch_size=patch_size, roi_size=roi_size,
            roi_start=roi_start,
            projection_dim=projection_dim, contrastive_views=contrastive_views, dropout_levels=dropout_levels,
            stop_gradient=stop_gradient, count_head=count_head, location_head=location_head, reconstruct=reconstruct,
        )

    def level_modules(self, level: int) -> list[nn.Module]:
        return [basic_unet_levels(self.backbone)[level]]

    def encode_level(self, level: int, h: torch.Tensor) -> torch.Tensor:
        """Levels at scales 1, 1/2, 1/4, 1/8 and 1/16."""
        return self.level_modules(level)[0](h)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        b = self.backbone
        x0, x1, x2, x3, x4 = (crop_to(f, roi, 2**level) for level, f in enumerate(features))
        u = b.upcat_4(x4, x3)
        u = b.upcat_3(u, x2)
        u = b.upcat_2(u, x1)
        u = b.upcat_1(u, x0)
        return b.final_conv(u)


def swin_level(swin: nn.Module, level: int, h: torch.Tensor) -> torch.Tensor:
    """Level ``level`` of MONAI's ``SwinTransformer`` (0: patch embedding at 1/2; 1..4: the stages, down to
    1/32) applied to the output of the level before, unnormalised, as in ``SwinTransformer.forward``."""
    if level == 0:
        return swin.pos_drop(swin.patch_embed(h))
    if swin.use_v2:
        h = getattr(swin, f"layers{level}c")[0](h.contiguous())
    return getattr(swin, f"layers{level}")[0](h.contiguous())


def swin_level_modules(swin: nn.Module, level: int) -> list[nn.Module]:
    if level == 0:
        return [swin.patch_embed, swin.pos_drop]
    return [getattr(swin, f"layers{level}")] + ([getattr(swin, f"layers{level}c")] if swin.use_v2 else [])


class HybridMIMSwinUNETR(HybridMIMNetwork):
    """MONAI ``SwinUNETR`` with HybridMIM heads on its deepest Swin features (1/32) and partial region decoding.

    Swin tokens are 2 x 2 x 2 voxels, so the 16-voxel level-2 patches of ``TwoLevelMaskd`` are whole tokens
    (8 x 8 x 8 of them) and a 32-voxel sub-volume is one deepest token. Partial decoding: the decoder's first
    step (1/32 -> 1/16) runs on the whole crop; from 1/16 on, the decoder and the residual encoder blocks of
    the skips run on the box only, their inputs cropped at each scale.

    Args:
        in_channels: image channels; the backbone reconstructs the same number of channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12); the deepest features have 16 times as many.
        drop_rate: dropout inside the Swin transformer; it makes the two contrastive views differ.
        dropout_levels: Swin levels that keep dropout (0: patch embedding, 1..4: the stages at 1/4 .. 1/32); the
            levels before the first of them run once for both views. ``None``: dropout everywhere.
        stop_gradient: encode the second view without gradients (the authors' variant).
        sub_volume_size: side of a level-1 sub-volume, a multiple of 32.
        patch_size: side of a level-2 patch, dividing ``sub_volume_size``, a multiple of the Swin token (2);
            ``None``: half of it.
        roi_size: side(s) of the reconstructed box, multiples of 16; ``None`` decodes the whole input.
        roi_start: corner of the box; ``None`` centres it.
        projection_dim: size of the contrastive embedding.
        contrastive_views: 2 for the dropout views of the contrastive loss, 1 disables them.
        count_head, location_head, reconstruct: as in ``HybridMIMUNet``.
        use_v2, use_checkpoint: passed to ``SwinUNETR``.
    """

    downsampling = 32  # SwinUNETR's deepest stage
    roi_align = 16  # the first decoder step runs on the whole crop
    num_levels = 5

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        drop_rate: float = 0.1,
        dropout_levels: Sequence[int] | None = (3, 4),
        stop_gradient: bool = False,
        sub_volume_size: Sequence[int] | int = 32,
        patch_size: Sequence[int] | int | None = None,
        roi_size: Sequence[int] | int | None = 64,
        roi_start: Sequence[int] | None = None,
        projection_dim: int = 384,
        contrastive_views: int = 2,
        count_head: bool = True,
        location_head: bool = True,
        reconstruct: bool = True,
        use_v2: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        backbone = SwinUNETR(
            in_channels=in_channels,
            out_channels=in_channels,
            feature_size=feature_size,
            drop_rate=drop_rate,
            use_v2=use_v2,
            use_checkpoint=use_checkpoint,
        )
        super().__init__(
            backbone, 16 * feature_size, sub_volume_size=sub_volume_size, patch_size=patch_size, roi_size=roi_size,
            roi_start=roi_start,
            projection_dim=projection_dim, contrastive_views=contrastive_views, dropout_levels=dropout_levels,
            stop_gradient=stop_gradient, count_head=count_head, location_head=location_head, reconstruct=reconstruct,
        )

    def level_modules(self, level: int) -> list[nn.Module]:
        return swin_level_modules(self.backbone.swinViT, level)

    def encode_level(self, level: int, h: torch.Tensor) -> torch.Tensor:
        return swin_level(self.backbone.swinViT, level, h)

    def level_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.swinViT.proj_out(h, self.backbone.normalize)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        b = self.backbone
        hidden = features
        dec3 = b.decoder5(b.encoder10(hidden[4]), hidden[3])  # 1/16, whole crop
        dec2 = b.decoder4(crop_to(dec3, roi, 16), b.encoder4(crop_to(hidden[2], roi, 8)))
        dec1 = b.decoder3(dec2, b.encoder3(crop_to(hidden[1], roi, 4)))
        dec0 = b.decoder2(dec1, b.encoder2(crop_to(hidden[0], roi, 2)))
        return b.out(b.decoder1(dec0, b.encoder1(crop_to(x, roi, 1))))
