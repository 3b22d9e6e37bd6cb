"""The baselines' pre-training networks: SimMIM, the naive contrastive baseline and the SwinUNETR pretext tasks on
a SwinUNETR, MAE on a ViT, SimMIM and the contrastive baseline on a ViT too (the WACV study runs both on
ViT/UNETR and SwinUNETR), Models Genesis on a UNet. HybridMIM's own networks are in ``networks``.

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

from hybridmim_components.geometry import unpatchify
from hybridmim_components.encoders import basic_unet_levels
from hybridmim_components.networks import swin_level

__all__ = [
    "SimMIMSwinUNETR",
    "SimMIMViT",
    "ContrastiveSwinUNETR",
    "ContrastiveViT",
    "MAEViT",
    "ModelsGenesisUNet",
    "SwinSSLSwinUNETR",
    "swin_features",
    "upsampling_decoder",
]


def simmim_head(in_features: int, out_features: int, depth: int, width: int, conv: bool) -> nn.Module:
    """SimMIM's prediction head: one linear layer (``depth`` 1, SimMIM's own), or ``depth - 1`` hidden layers of
    ``width`` with GELU before it (the WACV study's decoder depths). ``conv``: 1 x 1 x 1 convolutions on a feature
    map, else linear layers on tokens."""
    if depth < 1:
        raise ValueError(f"head_depth must be at least 1 (SimMIM's linear head), got {depth}.")
    layer = (lambda a, b: nn.Conv3d(a, b, kernel_size=1)) if conv else nn.Linear
    if depth == 1:  # its weights keep their names, head.weight and head.bias
        return layer(in_features, out_features)
    hidden = []
    for i in range(depth - 1):
        hidden += [layer(in_features if i == 0 else width, width), nn.GELU()]
    return nn.Sequential(*hidden, layer(width, out_features))


def swin_features(swin: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Run the four stages of MONAI's ``SwinTransformer`` from patch-embedded tokens; the deepest output (1/32)."""
    h = swin.pos_drop(tokens)
    for level in (1, 2, 3, 4):
        h = swin_level(swin, level, h)
    return swin.proj_out(h, normalize)


class SimMIMSwinUNETR(nn.Module):
    """SimMIM on MONAI's ``SwinUNETR``: masked tokens are replaced by a learned mask token right after the patch
    embedding, and one 1 x 1 x 1 convolution with a pixel shuffle predicts the voxels from the deepest features.

    Args:
        in_channels: image channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12).
        use_v2, use_checkpoint: passed to ``SwinUNETR``.
        head_depth: 1 (SimMIM's linear head, the default) or more: ``head_depth - 1`` hidden 1 x 1 x 1
            convolutions of ``head_width`` channels with GELU before the last one, for the WACV study's comparison
            of decoder depths.
        head_width: channels of the hidden layers (default: the deepest features' 16 * feature_size).

    ``forward(x, mask)`` with ``x`` (B, C, D, H, W), multiples of 32, and ``mask`` (B, 1, D, H, W) with 1 on
    masked voxels, whole 2 x 2 x 2 Swin tokens (``TwoLevelMaskd`` with patches of a multiple of 2 gives that),
    returns ``{"reconstruction": (B, C, D, H, W)}``. ``backbone`` is a plain ``SwinUNETR`` (its decoder is not
    trained here).
    """

    encoder_stride = 32

    def __init__(self, in_channels: int = 1, feature_size: int = 48, use_v2: bool = False, use_checkpoint: bool = False,
                 head_depth: int = 1, head_width: int | None = None) -> None:
        super().__init__()
        self.backbone = SwinUNETR(
            in_channels=in_channels, out_channels=in_channels, feature_size=feature_size, use_v2=use_v2,
            use_checkpoint=use_checkpoint,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, feature_size, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = simmim_head(16 * feature_size, self.encoder_stride**3 * in_channels, head_depth,
                                head_width or 16 * feature_size, conv=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if any(s % self.encoder_stride for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of {self.encoder_stride}.")
        swin = self.backbone.swinViT
        tokens = swin.patch_embed(x)  # (B, feature_size, D/2, H/2, W/2)
        token_mask = F.max_pool3d(mask.to(tokens.dtype), kernel_size=2)
        tokens = tokens * (1 - token_mask) + self.mask_token.to(tokens.dtype) * token_mask
        deepest = swin_features(swin, tokens, self.backbone.normalize)
        return {"reconstruction": pixelshuffle(self.head(deepest), spatial_dims=3, scale_factor=self.encoder_stride)}


def freeze_unused_cross_attention_norms(blocks) -> None:
    """MONAI's ``TransformerBlock`` always builds a cross-attention norm; without cross-attention it never gets a
    gradient, which ``DistributedDataParallel`` rejects. Frozen, it stays in the state dict (strict loading)."""
    for block in blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)


def unetr_encoder(in_channels: int, img_size: Sequence[int] | int, patch_size: int, hidden_size: int, mlp_dim: int,
                  num_layers: int, num_heads: int, dropout_rate: float) -> ViT:
    """A plain ``ViT`` as ``UNETR`` builds its encoder (no classification token), ready for DDP."""
    vit = ViT(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
              mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate,
              classification=False)
    freeze_unused_cross_attention_norms(vit.blocks)
    return vit


class SimMIMViT(nn.Module):
    """SimMIM on MONAI's ``ViT``, the encoder of ``UNETR``: the patch embeddings of masked patches are replaced by a
    learned mask token before the position embedding, and a head on each output token predicts its patch's voxels.

    Args:
        in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, dropout_rate: the
            ``ViT`` (``UNETR`` fine-tunes it with 16^3 patches, 12 layers, and its own ``img_size``).
        head_depth, head_width: SimMIM's linear head (1) or a deeper one (``simmim_head``; width default
            ``hidden_size``).

    ``forward(x, mask)`` with ``x`` (B, C, *img_size) and ``mask`` (B, 1, *img_size), 1 on masked voxels in whole
    ViT patches (``TwoLevelMask`` with ``patch_size`` equal to the ViT's), returns ``{"reconstruction": (B, C,
    *img_size)}``. ``backbone`` is a plain ``ViT``: its ``state_dict()`` loads strictly into ``ViT`` and into
    ``UNETR``'s ``vit``.
    """

    def __init__(self, in_channels: int = 1, img_size: Sequence[int] | int = 96, patch_size: int = 16,
                 hidden_size: int = 768, mlp_dim: int = 3072, num_layers: int = 12, num_heads: int = 12,
                 dropout_rate: float = 0.0, head_depth: int = 1, head_width: int | None = None) -> None:
        super().__init__()
        self.backbone = unetr_encoder(in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                                      dropout_rate)
        self.patch_size = (patch_size,) * 3
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = simmim_head(hidden_size, patch_size**3 * in_channels, head_depth, head_width or hidden_size,
                                conv=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.backbone.patch_embedding
        tokens = embedding.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, N, hidden), raster order
        token_mask = F.max_pool3d(mask.to(tokens.dtype), kernel_size=self.patch_size).flatten(1).unsqueeze(-1)
        tokens = tokens * (1 - token_mask) + self.mask_token.to(tokens.dtype) * token_mask
        h = embedding.dropout(tokens + embedding.position_embeddings)
        for block in self.backbone.blocks:
            h = block(h)
        patches = self.head(self.backbone.norm(h))
        return {"reconstruction": unpatchify(patches, self.patch_size, x.shape[2:])}


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


class ContrastiveViT(nn.Module):
    """Naive contrastive learning on MONAI's ``ViT`` (``UNETR``'s encoder): the two views in one pass, the output
    tokens averaged, and the projection MLP of ``ContrastiveSwinUNETR``.

    ``forward(x, view2)`` with two (B, C, *img_size) views returns ``{"embeddings": (2, B, projection_dim)}``.
    ``backbone`` is a plain ``ViT``.
    """

    def __init__(self, in_channels: int = 1, img_size: Sequence[int] | int = 96, patch_size: int = 16,
                 hidden_size: int = 768, mlp_dim: int = 3072, num_layers: int = 12, num_heads: int = 12,
                 dropout_rate: float = 0.0, hidden_dim: int = 512, projection_dim: int = 128) -> None:
        super().__init__()
        self.backbone = unetr_encoder(in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads,
                                      dropout_rate)
        self.projection = nn.Sequential(nn.Linear(hidden_size, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                        nn.ReLU(inplace=True), nn.Linear(hidden_dim, projection_dim))

    def forward(self, x: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.backbone(torch.cat([x, view2]))
        return {"embeddings": self.projection(tokens.mean(dim=1)).reshape(2, x.shape[0], -1)}


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
        freeze_unused_cross_attention_norms((*self.mae.blocks[:-1], *self.mae.decoder_blocks[:-1]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction, patch_mask = self.mae(x)
        return {"prediction": prediction, "patch_mask": patch_mask}


class ModelsGenesisUNet(nn.Module):
    """Models Genesis (Zhou et al., Medical Image Analysis 2021) on MONAI's ``BasicUNet``: the whole U-Net learns
    to restore the original crop from a corrupted one. The corruptions are transforms of the data pipeline; the
    network is ``BasicUNet`` unchanged, with as many output channels as input channels.

    Args:
        in_channels: image channels, restored one for one.
        features: ``BasicUNet`` features (five encoder widths and the last decoder width).
        act, norm, dropout, upsample: passed to ``BasicUNet`` (its defaults; Models Genesis has no dropout).

    ``forward(x)`` with ``x`` (B, C, D, H, W), multiples of 16, returns ``{"reconstruction": (B, C, D, H, W)}``,
    logits: the loss applies the sigmoid that ends the authors' network. ``encode(x)`` returns the five encoder
    maps, at scales 1 to 1/16 (for the probe).
    """

    downsampling = 16  # BasicUNet pools four times

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        self.backbone = BasicUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=in_channels, features=features, act=act,
            norm=norm, dropout=dropout, upsample=upsample,
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for level in basic_unet_levels(self.backbone):
            x = level(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of {self.downsampling}.")
        return {"reconstruction": self.backbone(x)}


def upsampling_decoder(channels: int, out_channels: int, stages: int = 5) -> nn.Sequential:
    """The SwinUNETR pretext tasks' reconstruction head (the reference's "vae" head): ``stages`` blocks of a 3x3x3
    convolution, instance norm, LeakyReLU and a trilinear 2x upsampling, halving the channels for the first four,
    then a 1x1x1 convolution to ``out_channels``: (B, channels, d, h, w) -> (B, out_channels, 2^stages d, ...)."""
    layers, width = [], channels
    for stage in range(stages):
        narrower = width // 2 if stage < 4 else width
        layers += [nn.Conv3d(width, narrower, kernel_size=3, padding=1), nn.InstanceNorm3d(narrower), nn.LeakyReLU(),
                   nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
        width = narrower
    layers.append(nn.Conv3d(width, out_channels, kernel_size=1))
    return nn.Sequential(*layers)


class SwinSSLSwinUNETR(nn.Module):
    """The SwinUNETR pretext tasks (Tang et al., CVPR 2022) on MONAI's ``SwinUNETR`` encoder: rotation prediction,
    contrastive coding and the reconstruction of cut-out views, from the deepest Swin features (1/32).

    The heads follow the reference (``SwinUNETR/Pretrain/models/ssl_head.py`` of MONAI's research-contributions):
    a linear 4-way rotation head, a linear contrastive head to ``projection_dim`` and ``upsampling_decoder``. The
    reference feeds the rotation head the first spatial token of the deepest map and the contrastive head the
    second; here both get the mean over all tokens, which sees the whole crop, not one corner of it.

    Args:
        in_channels: image channels.
        feature_size: ``SwinUNETR`` feature size (a multiple of 12).
        projection_dim: size of the contrastive embedding (the reference's 512).
        use_v2, use_checkpoint: passed to ``SwinUNETR``.

    ``forward(x, view2)`` with the two augmented views (B, C, D, H, W) each, multiples of 32 and in training at
    least 64 on one axis (the reconstruction head's instance norm needs more than one deepest voxel), returns
    ``rotation_logits`` (2B, 4) and ``reconstruction`` (2B, C, D, H, W), first views first, and ``embeddings``
    (2, B, projection_dim). ``encode(x)`` returns the encoder's feature maps (for the probe). ``backbone`` is a
    plain ``SwinUNETR`` (its decoder is not trained here).
    """

    encoder_stride = 32

    def __init__(self, in_channels: int = 1, feature_size: int = 48, projection_dim: int = 512, use_v2: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.backbone = SwinUNETR(
            in_channels=in_channels, out_channels=in_channels, feature_size=feature_size, use_v2=use_v2,
            use_checkpoint=use_checkpoint,
        )
        deepest = 16 * feature_size
        self.rotation_head = nn.Linear(deepest, 4)
        self.contrastive_head = nn.Linear(deepest, projection_dim)
        self.reconstruction_head = upsampling_decoder(deepest, in_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Swin encoder's five feature maps, 1/2 to 1/32 (for the probe; those of ``HybridMIMSwinUNETR``)."""
        return list(self.backbone.swinViT(x, self.backbone.normalize))

    def forward(self, x: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        if any(s % self.encoder_stride for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of {self.encoder_stride}.")
        deepest = self.backbone.swinViT(torch.cat([x, view2]), self.backbone.normalize)[4]
        pooled = deepest.mean(dim=(2, 3, 4))
        return {
            "rotation_logits": self.rotation_head(pooled),
            "embeddings": self.contrastive_head(pooled).reshape(2, x.shape[0], -1),
            "reconstruction": self.reconstruction_head(deepest),
        }
