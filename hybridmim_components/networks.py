"""Masked image modeling networks: a stock MONAI backbone plus small pre-training heads.

The backbone is kept as the attribute ``backbone`` (``vit`` for MAE) and is used unchanged, so its
``state_dict()`` (what the bundles save as ``models/model.pt``) loads with ``strict=True`` into the same stock
MONAI network that fine-tuning builds. Only the heads defined here are pre-training-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.networks.nets import BasicUNet, MaskedAutoEncoderViT, SwinUNETR, ViT
from monai.networks.utils import pixelshuffle
from monai.utils import ensure_tuple_rep

from hybridmim_components.transforms import region_grid

__all__ = [
    "RegionHeads",
    "HybridMIMNetwork",
    "HybridMIMUNet",
    "HybridMIMSwinUNETR",
    "SimMIMSwinUNETR",
    "ContrastiveSwinUNETR",
    "MAEViT",
    "patchify",
    "centred_roi",
    "pool_regions",
]

NUM_PATCHES = 8  # level-2 patches per sub-volume (2 x 2 x 2)


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


def crop_to(feature: torch.Tensor, roi: Sequence[slice], scale: int) -> torch.Tensor:
    """The part of a (B, C, ...) feature map at 1/``scale`` resolution that covers the full-resolution ``roi``."""
    return feature[(slice(None), slice(None)) + tuple(slice(s.start // scale, s.stop // scale) for s in roi)]


class HybridMIMNetwork(nn.Module):
    """The HybridMIM forward pass around a backbone; subclasses say how to encode and how to decode a box.

    ``forward(x)`` with ``x`` (B, C, D, H, W), D, H, W multiples of ``sub_volume_size`` and of the backbone's
    down-sampling, returns a dict:

    - ``reconstruction``: (B, C, *roi_size) logits of the voxels inside the box;
    - ``roi``: the box as a tuple of three slices into (D, H, W);
    - ``count_logits``: (B, R, 9); ``location_logits``: (B, R, 8);
    - ``embeddings``: (2, B, projection_dim) for the two dropout views, or ``None`` when there is only one.

    During training with ``contrastive_views=2`` the batch is encoded once as ``cat([x, x])``: dropout draws
    independent masks for the two copies, so the pass yields both views; only the first view is decoded.
    """

    downsampling: int  # the input must be a multiple of this
    roi_align: int  # the box's start and size must be multiples of this

    def __init__(
        self,
        backbone: nn.Module,
        deepest_channels: int,
        sub_volume_size: Sequence[int] | int,
        roi_size: Sequence[int] | int | None,
        roi_start: Sequence[int] | None,
        projection_dim: int,
        contrastive_views: int,
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
        self.heads = RegionHeads(in_channels=deepest_channels, projection_dim=projection_dim)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``x``; the last one is the deepest."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        """Reconstruction logits of the voxels of ``roi``, from the input and its (first-view) features."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict:
        spatial = x.shape[2:]
        grid = region_grid(spatial, self.sub_volume_size)
        if any(s % self.downsampling for s in spatial):
            raise ValueError(f"input spatial size {tuple(spatial)} must be a multiple of {self.downsampling}.")
        roi = centred_roi(spatial, self.roi_size or spatial, self.roi_align, self.roi_start)
        views = self.contrastive_views if self.training else 1
        n = x.shape[0]
        features = self.encode(torch.cat([x] * views) if views > 1 else x)
        heads = self.heads(features[-1], grid)
        return {
            "reconstruction": self.decode(x, [f[:n] for f in features], roi),
            "roi": roi,
            "count_logits": heads["count_logits"][:n],
            "location_logits": heads["location_logits"][:n],
            "embeddings": heads["embeddings"].reshape(views, n, -1) if views > 1 else None,
        }


class HybridMIMUNet(HybridMIMNetwork):
    """MONAI ``BasicUNet`` with HybridMIM heads on its bottleneck (1/16) and partial region decoding.

    The decoder runs on the box only: every encoder feature map is cropped to the box at its own scale.

    Args:
        in_channels: image channels; the backbone reconstructs the same number of channels.
        features: ``BasicUNet`` features (five encoder widths and the last decoder width).
        dropout: dropout inside the backbone; it also makes the two views of the contrastive loss differ.
        sub_volume_size: side of a level-1 sub-volume (as in ``TwoLevelMaskd``); a multiple of 16.
        roi_size: side(s) of the box that the decoder reconstructs, multiples of 16; ``None`` decodes the whole
            input (the slower "full" mode, for comparison).
        roi_start: corner of the box; ``None`` centres it.
        projection_dim: size of the contrastive embedding.
        contrastive_views: 2 for the dropout views of the contrastive loss, 1 disables them.
        act, norm, upsample: passed to ``BasicUNet``.
    """

    downsampling = 16  # BasicUNet pools four times
    roi_align = 16

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
        super().__init__(backbone, features[4], sub_volume_size, roi_size, roi_start, projection_dim, contrastive_views)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder feature maps, at scales 1, 1/2, 1/4, 1/8 and 1/16."""
        b = self.backbone
        skips = [b.conv_0(x)]
        for down in (b.down_1, b.down_2, b.down_3, b.down_4):
            skips.append(down(skips[-1]))
        return skips

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        b = self.backbone
        x0, x1, x2, x3, x4 = (crop_to(f, roi, 2**level) for level, f in enumerate(features))
        u = b.upcat_4(x4, x3)
        u = b.upcat_3(u, x2)
        u = b.upcat_2(u, x1)
        u = b.upcat_1(u, x0)
        return b.final_conv(u)


class HybridMIMSwinUNETR(HybridMIMNetwork):
    """MONAI ``SwinUNETR`` with HybridMIM heads on its deepest Swin features (1/32) and partial region decoding.

    Swin tokens are 2 x 2 x 2 voxels, so the 16-voxel level-2 patches of ``TwoLevelMaskd`` are whole tokens
    (8 x 8 x 8 of them) and a 32-voxel sub-volume is one deepest token. Partial decoding: the decoder's first
    step (1/32 -> 1/16) runs on the whole crop; from 1/16 on, the decoder and the residual encoder blocks of
    the skips run on the box only, their inputs cropped at each scale.

    Args:
        in_channels: image channels; the backbone reconstructs the same number of channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12); the deepest features have 16 times as many.
        drop_rate: dropout inside the Swin transformer; it also makes the two contrastive views differ.
        sub_volume_size: side of a level-1 sub-volume, a multiple of 32.
        roi_size: side(s) of the reconstructed box, multiples of 16; ``None`` decodes the whole input.
        roi_start: corner of the box; ``None`` centres it.
        projection_dim: size of the contrastive embedding.
        contrastive_views: 2 for the dropout views of the contrastive loss, 1 disables them.
        use_v2, use_checkpoint: passed to ``SwinUNETR``.
    """

    downsampling = 32  # SwinUNETR's deepest stage
    roi_align = 16  # the first decoder step runs on the whole crop

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        drop_rate: float = 0.1,
        sub_volume_size: Sequence[int] | int = 32,
        roi_size: Sequence[int] | int | None = 64,
        roi_start: Sequence[int] | None = None,
        projection_dim: int = 384,
        contrastive_views: int = 2,
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
            backbone, 16 * feature_size, sub_volume_size, roi_size, roi_start, projection_dim, contrastive_views
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Swin transformer's five hidden states, at scales 1/2, 1/4, 1/8, 1/16 and 1/32."""
        return self.backbone.swinViT(x, self.backbone.normalize)

    def decode(self, x: torch.Tensor, features: list[torch.Tensor], roi: tuple[slice, ...]) -> torch.Tensor:
        b = self.backbone
        hidden = features
        dec3 = b.decoder5(b.encoder10(hidden[4]), hidden[3])  # 1/16, whole crop
        dec2 = b.decoder4(crop_to(dec3, roi, 16), b.encoder4(crop_to(hidden[2], roi, 8)))
        dec1 = b.decoder3(dec2, b.encoder3(crop_to(hidden[1], roi, 4)))
        dec0 = b.decoder2(dec1, b.encoder2(crop_to(hidden[0], roi, 2)))
        return b.out(b.decoder1(dec0, b.encoder1(crop_to(x, roi, 1))))


def swin_features(swin: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Run the four stages of MONAI's ``SwinTransformer`` from patch-embedded tokens; the deepest output (1/32)."""
    h = swin.pos_drop(tokens)
    for stage in (1, 2, 3, 4):
        if swin.use_v2:
            h = getattr(swin, f"layers{stage}c")[0](h.contiguous())
        h = getattr(swin, f"layers{stage}")[0](h.contiguous())
    return swin.proj_out(h, normalize)


class SimMIMSwinUNETR(nn.Module):
    """SimMIM on MONAI's ``SwinUNETR``: masked tokens are replaced by a learned mask token right after the patch
    embedding, and one 1 x 1 x 1 convolution with a pixel shuffle predicts the voxels from the deepest features.

    Args:
        in_channels: image channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12).
        use_v2, use_checkpoint: passed to ``SwinUNETR``.

    ``forward(x, mask)`` with ``x`` (B, C, D, H, W), multiples of 32, and ``mask`` (B, 1, D, H, W) with 1 on
    masked voxels, whole 2 x 2 x 2 Swin tokens (``TwoLevelMaskd`` with patches of a multiple of 2 gives that),
    returns ``{"reconstruction": (B, C, D, H, W)}``. ``backbone`` is a plain ``SwinUNETR`` (its decoder is not
    trained here).
    """

    encoder_stride = 32

    def __init__(self, in_channels: int = 1, feature_size: int = 48, use_v2: bool = False, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.backbone = SwinUNETR(
            in_channels=in_channels, out_channels=in_channels, feature_size=feature_size, use_v2=use_v2,
            use_checkpoint=use_checkpoint,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, feature_size, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Conv3d(16 * feature_size, self.encoder_stride**3 * in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if any(s % self.encoder_stride for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of {self.encoder_stride}.")
        swin = self.backbone.swinViT
        tokens = swin.patch_embed(x)  # (B, feature_size, D/2, H/2, W/2)
        token_mask = F.max_pool3d(mask.to(tokens.dtype), kernel_size=2)
        tokens = tokens * (1 - token_mask) + self.mask_token.to(tokens.dtype) * token_mask
        deepest = swin_features(swin, tokens, self.backbone.normalize)
        return {"reconstruction": pixelshuffle(self.head(deepest), spatial_dims=3, scale_factor=self.encoder_stride)}


class ContrastiveSwinUNETR(nn.Module):
    """Naive contrastive learning on MONAI's ``SwinUNETR`` encoder: two augmented views of each crop, one pass.

    Args:
        in_channels: image channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12).
        hidden_dim, projection_dim: the projection MLP on the globally pooled deepest features.
        use_v2, use_checkpoint: passed to ``SwinUNETR``.

    ``forward(x, view2)`` with two (B, C, D, H, W) views returns ``{"embeddings": (2, B, projection_dim)}``.
    """

    def __init__(
        self, in_channels: int = 1, feature_size: int = 48, hidden_dim: int = 512, projection_dim: int = 128,
        use_v2: bool = False, use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = SwinUNETR(
            in_channels=in_channels, out_channels=in_channels, feature_size=feature_size, use_v2=use_v2,
            use_checkpoint=use_checkpoint,
        )
        # BatchNorm as in SimCLR's projection head: the pooled Swin features of different crops share one
        # dominant direction (cosine ~0.96 at initialisation), and without it NT-Xent collapses to ln(2B - 1)
        self.projection = nn.Sequential(
            nn.Linear(16 * feature_size, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def forward(self, x: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        deepest = self.backbone.swinViT(torch.cat([x, view2]), self.backbone.normalize)[4]
        return {"embeddings": self.projection(deepest.mean(dim=(2, 3, 4))).reshape(2, x.shape[0], -1)}


def patchify(images: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, p1 * p2 * p3 * C): patches in the raster order of a ViT's patch embedding."""
    b, c = images.shape[:2]
    (d, h, w), (p1, p2, p3) = [s // p for s, p in zip(images.shape[2:], patch_size)], patch_size
    patches = images.reshape(b, c, d, p1, h, p2, w, p3).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return patches.reshape(b, d * h * w, p1 * p2 * p3 * c)


class MAEViT(nn.Module):
    """MAE with MONAI's ``MaskedAutoEncoderViT``, exposing its encoder as a MONAI ``ViT`` for fine-tuning.

    ``vit`` shares its modules with the MAE encoder (patch embedding, transformer blocks, final norm), so
    ``net.vit.state_dict()`` loads with ``strict=True`` into ``monai.networks.nets.ViT`` and into the ``vit`` of
    ``monai.networks.nets.UNETR`` of the same ``img_size``, ``hidden_size``, ``mlp_dim`` and ``num_heads``
    (UNETR uses 16^3 patches and 12 layers, the defaults here).

    ``forward(x)`` with ``x`` (B, C, *img_size) returns ``prediction`` (B, N, 16^3 * C) for every patch and
    ``patch_mask`` (B, N), 1 on the masked (removed) patches, N patches in raster order.
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        masking_ratio: float = 0.75,
        decoder_hidden_size: int = 384,
        decoder_mlp_dim: int = 1536,
        decoder_num_layers: int = 4,
        decoder_num_heads: int = 12,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"masking_ratio must be in (0, 1), got {masking_ratio}.")
        common = dict(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate,
        )
        self.mae = MaskedAutoEncoderViT(
            masking_ratio=masking_ratio, decoder_hidden_size=decoder_hidden_size, decoder_mlp_dim=decoder_mlp_dim,
            decoder_num_layers=decoder_num_layers, decoder_num_heads=decoder_num_heads, **common,
        )
        self.patch_size = self.mae.patch_size
        self.vit = ViT(classification=False, **common)
        self.vit.patch_embedding = self.mae.patch_embedding
        self.vit.blocks = nn.ModuleList(list(self.mae.blocks)[:-1])
        self.vit.norm = self.mae.blocks[-1]
        # MONAI's TransformerBlock always builds a cross-attention norm; without cross-attention it never gets a
        # gradient, which DistributedDataParallel rejects. Frozen, it stays in the state dict (strict loading).
        for block in (*self.mae.blocks[:-1], *self.mae.decoder_blocks[:-1]):
            if not block.with_cross_attention:
                block.norm_cross_attn.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction, patch_mask = self.mae(x)
        return {"prediction": prediction, "patch_mask": patch_mask}
