"""A linear segmentation head on a frozen encoder: few-shot fine-tuning's ``transfer: linear``.

With one or two labelled volumes, full fine-tuning has too many weights to fit; a linear map from the frozen
encoder's features to the classes has few, and scores what the pre-trained features already separate. The
segmentation probe of pre-training (``probe.SegmentationProbe``) fits such a head in closed batches to rank
pre-trainings; ``LinearHeadSegmenter`` is the same head as a network: a fine-tuning bundle trains it with its own
loop and loss, saves it as its ``model.pt``, and its ``inference.json``, ``evaluate.json`` and MONAI Label run it at
full resolution like any other network.

The forward pass, for a stock MONAI network (``BasicUNet``, ``SwinUNETR``, ``UNETR``, ``SegResNet``):

1. the network's encoder (``encoder_features``: the feature maps its own decoder reads, finest first) runs frozen
   and without gradients;
2. every level is brought onto one grid at 1/``feature_scale`` of the input (``probe.multiscale_features``) and
   the levels are concatenated;
3. a per-channel standardisation without learned scale (``BatchNorm3d(affine=False)``: at inference, the
   statistics of the training crops, as the probe standardises over its fitting crops) and a 1x1x1 convolution give
   the class logits on the grid, interpolated (trilinear) back to the input's size.

At inference steps 3 and the interpolation are an affine map of the features: the head stays linear.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridmim_components.encoders import basic_unet_levels
from hybridmim_components.probe import multiscale_features

__all__ = ["LINEAR_HEAD", "encoder_features", "encoder_channels", "output_channels", "LinearHeadSegmenter",
           "as_trained"]

LINEAR_HEAD = "linear"  # the plan's network.head of a model.pt that holds a LinearHeadSegmenter
FAMILIES = ("BasicUNet", "SwinUNETR", "UNETR", "SegResNet")


def _family(network: nn.Module) -> str:
    name = type(network).__name__
    if name not in FAMILIES:
        raise ValueError(f"a linear head needs the encoder of a {', '.join(FAMILIES)}; got a {name}. Fine-tune it "
                         "with --transfer all, encoder or decoder.")
    return name


def encoder_features(network: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder feature maps of a stock network for input (N, C, D, H, W), finest first: the maps its decoder
    reads (BasicUNet: ``conv_0``, ``down_1`` .. ``down_4``; SwinUNETR: ``encoder1`` .. ``encoder4``, ``encoder10``;
    UNETR: ``encoder1`` .. ``encoder4`` and the last hidden state; SegResNet: ``convInit`` and ``down_layers``)."""
    family = _family(network)
    if family == "BasicUNet":
        maps = [x]
        for level in basic_unet_levels(network):
            maps.append(level(maps[-1]))
        return maps[1:]
    if family == "SwinUNETR":
        hidden = network.swinViT(x, network.normalize)
        return [network.encoder1(x), network.encoder2(hidden[0]), network.encoder3(hidden[1]),
                network.encoder4(hidden[2]), network.encoder10(hidden[4])]
    if family == "UNETR":
        last, hidden = network.vit(x)
        return [network.encoder1(x), network.encoder2(network.proj_feat(hidden[3])),
                network.encoder3(network.proj_feat(hidden[6])), network.encoder4(network.proj_feat(hidden[9])),
                network.proj_feat(last)]
    maps, h = [], network.convInit(x)
    for down in network.down_layers:
        h = down(h)
        maps.append(h)
    return maps


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    return convs[-1].out_channels


def encoder_channels(network: nn.Module) -> list[int]:
    """The channels of each map of ``encoder_features``, read from the network's modules (no forward pass)."""
    family = _family(network)
    if family == "BasicUNet":
        levels = basic_unet_levels(network)
    elif family == "SwinUNETR":
        levels = [network.encoder1, network.encoder2, network.encoder3, network.encoder4, network.encoder10]
    elif family == "UNETR":
        return [_last_conv_channels(m) for m in (network.encoder1, network.encoder2, network.encoder3,
                                                 network.encoder4)] + [network.hidden_size]
    else:
        levels = list(network.down_layers)
    return [_last_conv_channels(m) for m in levels]


def output_channels(network: nn.Module) -> int:
    """The classes a stock network segments: the output channels of its last convolution."""
    return _last_conv_channels(network)


class LinearHeadSegmenter(nn.Module):
    """A linear head on the frozen encoder of ``network`` (a stock MONAI network, its decoder unused).

    Args:
        network: the fine-tuning network, pre-trained weights already in its encoder; its parameters are frozen
            (``requires_grad`` off) and it stays in evaluation mode (no dropout, no statistics updated).
        num_classes: output channels; by default those of ``network``'s own output layer.
        feature_scale: the features' grid is the input's divided by this (the probe's default, 4).

    Input (N, C, D, H, W); output (N, num_classes, D, H, W) logits.
    """

    def __init__(self, network: nn.Module, num_classes: int | None = None, feature_scale: int = 4) -> None:
        super().__init__()
        if feature_scale < 1:
            raise ValueError(f"feature_scale must be 1 or more, got {feature_scale}.")
        self.network, self.feature_scale = network, int(feature_scale)
        channels = sum(encoder_channels(network))
        self.standardise = nn.BatchNorm3d(channels, affine=False)
        self.head = nn.Conv3d(channels, num_classes or output_channels(network), kernel_size=1)
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.network.eval()

    def train(self, mode: bool = True) -> LinearHeadSegmenter:
        super().train(mode)
        self.network.eval()  # frozen: its dropout stays off and its statistics fixed
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = [max(1, s // self.feature_scale) for s in x.shape[2:]]
        with torch.no_grad():
            features = multiscale_features(encoder_features(self.network, x), grid)
        logits = self.head(self.standardise(features))
        return F.interpolate(logits, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


def as_trained(network: nn.Module, plan: Mapping | None) -> nn.Module:
    """The network that a fine-tuning run saved: ``network`` wrapped in a ``LinearHeadSegmenter`` when the run's
    plan (``models/plan.json``) says its ``network.head`` is ``linear``, else ``network`` itself. Inference,
    evaluation and MONAI Label build their ``network_def`` through this, so that a linear model loads strictly."""
    head = plan.get("network", {}).get("head") if isinstance(plan, Mapping) else None
    return LinearHeadSegmenter(network) if head == LINEAR_HEAD else network
