"""Checks of one input item, as dictionary transforms, so that bad input fails with the file and the key named.

Without them, a missing file or a volume with the wrong number of channels fails deep inside a loader or a
convolution ("expected input[1, 1, 96, 96, 96] to have 4 channels"), which names neither the file nor the fix.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform


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
