"""The encoder of each network family, named by the key prefixes of its weights.

Fine-tuning with ``transfer: encoder`` loads the pre-trained tensors under these prefixes and starts the rest
(decoder and head) fresh, as nnssl's fine-tuning does; a pre-training run writes the prefixes of its
``model.pt`` into its plan. The encoder is what the stock network itself calls its encoder, the stem included:

- ``BasicUNet``: ``conv_0`` (the stem) and the downsampling path ``down_1`` .. ``down_4``;
- ``SwinUNETR``: the Swin transformer ``swinViT`` and the residual blocks that read the image and its stages
  (``encoder1`` .. ``encoder4``, ``encoder10``);
- ``UNETR``: the ViT ``vit`` and the blocks that read the image and its hidden states (``encoder1`` ..
  ``encoder4``);
- ``ViT`` (MAE's ``model.pt``): all of it;
- ``SegResNet``: ``convInit`` (the stem) and ``down_layers``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

__all__ = ["ENCODER_PREFIXES", "basic_unet_levels", "encoder_prefixes", "in_encoder"]

ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "BasicUNet": ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
    "SwinUNETR": ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10."),
    "UNETR": ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4."),
    "ViT": ("",),
    "SegResNet": ("convInit.", "down_layers."),
}


def basic_unet_levels(unet: nn.Module) -> tuple[nn.Module, ...]:
    """The five encoder levels of MONAI's ``BasicUNet`` (its prefixes above), at scales 1, 1/2, 1/4, 1/8, 1/16."""
    return unet.conv_0, unet.down_1, unet.down_2, unet.down_3, unet.down_4


def encoder_prefixes(network: nn.Module | str) -> tuple[str, ...]:
    """The key prefixes of the encoder of ``network`` (a module or its class name).

    Raises:
        ValueError: the family has no encoder defined here; the message lists the known ones.
    """
    name = network if isinstance(network, str) else type(network).__name__
    if name not in ENCODER_PREFIXES:
        raise ValueError(
            f"no encoder is defined for a {name}; known: {', '.join(ENCODER_PREFIXES)}. Fine-tune with "
            "--transfer all, or add the family to hybridmim_components.encoders.ENCODER_PREFIXES."
        )
    return ENCODER_PREFIXES[name]


def in_encoder(key: str, prefixes: Iterable[str]) -> bool:
    """Whether the weight named ``key`` lies under one of the encoder's ``prefixes``."""
    return any(key.startswith(prefix) for prefix in prefixes)
