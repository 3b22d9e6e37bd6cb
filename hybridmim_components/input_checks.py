"""Checks of one input item, as dictionary transforms, so that bad input fails with the file and the key named.

Without them, a missing file or a volume with the wrong number of channels fails deep inside a loader or a
convolution ("expected input[1, 1, 96, 96, 96] to have 4 channels"), which names neither the file nor the fix.
A whole dataset is checked at once by ``hybridmim_components.dataset_check``; these catch what goes wrong with
one item while a run reads it.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch

from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform


class ImageFilesExistd(MapTransform):
    """Raise ``FileNotFoundError`` naming the key and the path when a file of ``keys`` does not exist.

    A value is a path or a list of paths (one per channel, e.g. the four BraTS modalities).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            for path in paths:
                if not isinstance(path, (str, os.PathLike)):
                    continue  # already loaded (an array or a tensor)
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"'{key}': no file at {str(path)!r}. Give the path of an existing NIfTI file (MONAI Label sends "
                        "an empty path for an image id that its datastore does not have)."
                    )
        return d


class ChannelCountd(MapTransform):
    """Raise ``ValueError`` when a channel-first image of ``keys`` has other than ``num_channels`` channels.

    Args:
        keys: keys of channel-first images, shape (C, H, W, D).
        num_channels: the number of channels the network takes.
        channel_names: names of the channels, in order, for the message.
    """

    def __init__(self, keys: KeysCollection, num_channels: int, channel_names: Sequence[str] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {num_channels}.")
        if channel_names is not None and len(channel_names) != num_channels:
            raise ValueError(f"channel_names has {len(channel_names)} names for {num_channels} channels.")
        self.num_channels, self.channel_names = num_channels, channel_names

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            found = d[key].shape[0]
            if found != self.num_channels:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", "the input")
                names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
                raise ValueError(
                    f"'{key}' of {source} has {found} channel(s), but the network takes {self.num_channels} "
                    f"channels{names}. Give one {self.num_channels}-channel volume (a 4-D NIfTI, channels last) or a "
                    f"list of {self.num_channels} single-channel files in that order."
                )
        return d


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged``, whose errors name the file.

    A volume that cannot be read (truncated by an interrupted copy, damaged, removed while a run reads from disk)
    otherwise stops a run with ``EOFError: Compressed file ended before the end-of-stream marker was reached``
    and no path. This raises ``OSError`` with the key, the path and what to do; the run stops there, and its
    last full checkpoint, written at the end of the previous epoch, is what ``--resume True`` continues from.
    The arguments are those of ``LoadImaged``.
    """

    def __call__(self, data: Mapping[Hashable, object], reader=None) -> dict:
        try:
            return super().__call__(data, reader)
        except Exception as e:
            named = {k: data[k] for k in self.keys if k in data}
            raise OSError(
                f"cannot read {named} ({type(e).__name__}: {e}). Re-export or remove the volume; "
                "`python tools/check_dataset.py <dataset>` finds every such file at once. Then resume with "
                "--resume True: the run continues from its last full checkpoint."
            ) from e


class FiniteValuesd(MapTransform):
    """Raise ``ValueError`` naming the file when an image of ``keys`` has NaN or infinite values.

    One NaN voxel makes every loss of the batch NaN; the check at load time says which volume it was.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            finite = torch.isfinite(torch.as_tensor(d[key]))
            if not bool(finite.all()):
                source = getattr(d[key], "meta", {}).get("filename_or_obj", "the input")
                raise ValueError(
                    f"'{key}' of {source} has {int((~finite).sum())} NaN or infinite value(s). Replace them (e.g. by "
                    "the background value) or remove the volume; `python tools/check_dataset.py <dataset>` finds "
                    "every such file at once."
                )
        return d
