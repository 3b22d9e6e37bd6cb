"""Transforms of the fine-tuning bundles that MONAI lacks. The pre-training methods' transforms are in
``transforms``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, RandFlipd
from monai.utils.type_conversion import convert_to_tensor

__all__ = ["BratsChannelsToLabelsd", "per_axis_flips"]


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


def per_axis_flips(keys: KeysCollection, spatial_axes: Sequence[int], prob: float) -> Compose:
    """Flip each of ``spatial_axes`` on its own, with probability ``prob`` each.

    MONAI's ``RandFlipd(spatial_axis=[0, 1, 2])`` flips all the listed axes together, one draw for all: with the
    left-right axis among them, a left organ lands on the right in that fraction of the samples. Listing the axes a
    task may flip (none for the abdomen, whose organs have sides; all three for the brain) says it plainly.
    An empty ``spatial_axes`` flips nothing.

    Raises:
        ValueError: an axis outside 0..2, or listed twice; ``prob`` outside [0, 1].
    """
    axes = [int(a) for a in spatial_axes]
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"flip_axes must list distinct spatial axes among 0, 1, 2 (0 is left-right after RAS "
                         f"orientation), got {list(spatial_axes)}.")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {prob}.")
    return Compose([RandFlipd(keys, prob=prob, spatial_axis=a) for a in axes])
