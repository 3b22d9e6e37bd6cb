# Copyright 2026 hybridmim-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Read a preprocessed corpus (see :mod:`hybridmim_components.preprocess`) in constant memory.

The manifest is a folder of JSON Lines files, one per preprocessing part. Pre-training lists its records as
``{"image": <volume file>, "sha256": ...}`` items, and :class:`ReadCropsd` reads each crop from the volume on disk
(a memory-mapped ``.npy``, or a chunked, compressed blosc2 ``.b2nd``), so that a run holds no volume in memory:
resident memory does not grow with the number of volumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from hybridmim_components.loading import describe_preprocessing

__all__ = ["RECORD_KEYS", "PREPROCESSING_FILE", "STORAGE_SUFFIXES", "part_name", "read_records", "read_manifest",
           "manifest_datalist", "open_volume", "ReadCropsd", "crop_transforms", "cache_rate"]

RECORD_KEYS = ("id", "image", "file", "subject", "modality", "spacing", "shape", "processed_shape", "intensity",
               "sha256")
PREPROCESSING_FILE = "preprocessing.json"
STORAGE_SUFFIXES = {"npy": ".npy", "blosc2": ".b2nd"}  # storage format -> file suffix of a processed volume


def part_name(kind: str, part: int, num_parts: int) -> str:
    """``part-003-of-016.jsonl``: the file of one part's accepted (``kind="part"``) or rejected records."""
    return f"{kind}-{part:03d}-of-{num_parts:03d}.jsonl"


def read_records(path: str) -> list[dict]:
    """The records of one JSON Lines file (none if it does not exist). A last line cut short by a killed
    writer is dropped: its volume has no record, so a rerun processes it again."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):  # only an unterminated last line may be partial
                raise ValueError(f"{path} line {number} is not JSON ({e}); preprocessing writes whole lines, so "
                                 "the file was edited or damaged: delete it and rerun that part.") from e
    return records


def read_manifest(manifest: str, preprocessing: Sequence | None = None) -> list[dict]:
    """Every accepted record of a preprocessed corpus, sorted by id, with ``image`` made absolute.

    Args:
        manifest: the preprocessing's output folder (or its ``manifest/`` folder).
        preprocessing: this run's loading chain (``load_and_scale``): when given, the corpus must have been
            preprocessed with the same spacing, orientation and intensity normalisation.

    Raises:
        FileNotFoundError / ValueError: naming the folder and saying what to do.
    """
    root = os.path.dirname(manifest.rstrip(os.sep)) if os.path.basename(manifest.rstrip(os.sep)) == "manifest" \
        else manifest
    folder = os.path.join(root, "manifest")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{root} is not a preprocessed corpus (no manifest/ folder); run "
                                "`python tools/preprocess.py --sources <volumes> --output_dir <folder>` first.")
    records: dict[str, dict] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("part-") and name.endswith(".jsonl"):
            for record in read_records(os.path.join(folder, name)):
                record["file"] = os.path.join(root, record["file"])
                if os.path.isfile(record["file"]):
                    records[record["id"]] = record
    if not records:
        raise ValueError(f"the manifest in {folder} lists no preprocessed volume; see its rejected-*.jsonl files "
                         "for the reasons, or run the preprocessing first.")
    if preprocessing is not None:
        with open(os.path.join(root, PREPROCESSING_FILE)) as f:
            written = json.load(f)
        expected = json.loads(json.dumps(describe_preprocessing(preprocessing)))
        if written != expected:
            raise ValueError(f"{root} was preprocessed with {written}, but this run's loading chain is {expected}; "
                             "preprocess the corpus again with this bundle's settings, or set them to the corpus's.")
    return [records[k] for k in sorted(records)]


def manifest_datalist(manifest: str, preprocessing: Sequence | None = None) -> list[dict]:
    """The pre-training items of a manifest: ``{"image": <volume file>, "sha256": <source's hash>}``."""
    return [{"image": r["file"], "sha256": r["sha256"]} for r in read_manifest(manifest, preprocessing)]


def open_volume(path: str):
    """A processed (channels, x, y, z) volume, opened so that a slice reads only its own part: a memory-mapped
    ``.npy``, or a blosc2 ``.b2nd`` array, whose slices decompress only the chunks they touch (needs
    ``pip install blosc2``)."""
    if path.endswith(STORAGE_SUFFIXES["blosc2"]):
        import blosc2

        # one thread: data-loader workers are forked from a process that may have read a volume already (the
        # validation runs in it), and a thread pool does not survive a fork (two runs hung in the workers' first
        # read before this); the loader's workers are the parallelism
        blosc2.set_nthreads(1)
        return blosc2.open(path, mode="r")
    return np.load(path, mmap_mode="r")


class ReadCropsd(Randomizable, MapTransform):
    """Read ``num_samples`` crops of ``roi_size`` from volumes on disk (``open_volume``), never the whole volume.

    Takes ``{key: path}`` and returns a list of ``num_samples`` dicts with ``key`` a float tensor of shape
    ``(channels, *roi_size)``, as MONAI's ``RandSpatialCropSamplesd`` returns them (a volume smaller than
    ``roi_size`` is zero-padded at its end, as ``SpatialPadd`` pads the in-memory path). With
    ``random_center=False`` every crop is the centre crop, as ``CenterSpatialCropd`` takes it.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], num_samples: int = 1,
                 random_center: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(roi_size) != 3 or min(roi_size) < 1:
            raise ValueError(f"roi_size must be three positive sizes, got {roi_size}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        self.roi_size, self.num_samples, self.random_center = [int(r) for r in roi_size], num_samples, random_center

    def randomize(self, shape: Sequence[int]) -> list[int]:
        return [int(self.R.randint(0, max(s - r, 0) + 1)) for s, r in zip(shape, self.roi_size)]

    def _crop(self, volume: np.ndarray, starts: Sequence[int]) -> torch.Tensor:
        window = tuple(slice(s, s + r) for s, r in zip(starts, self.roi_size))
        crop = np.array(volume[(slice(None), *window)], dtype=np.float32)  # copies just these voxels
        pad = [(0, 0)] + [(0, r - c) for r, c in zip(self.roi_size, crop.shape[1:])]
        return torch.from_numpy(np.pad(crop, pad) if any(p for _, p in pad) else crop)

    def __call__(self, data: Mapping[Hashable, str]) -> list[dict]:
        volumes = {}
        for key in self.key_iterator(dict(data)):
            try:
                volumes[key] = open_volume(data[key])
            except Exception as e:
                raise OSError(f"cannot read the preprocessed volume {data[key]} ({type(e).__name__}: {e}); "
                              "rerun the preprocessing part that wrote it.") from e
        shape = next(iter(volumes.values())).shape[1:]
        samples = []
        for _ in range(self.num_samples):
            starts = self.randomize(shape) if self.random_center else \
                [max(s // 2 - r // 2, 0) for s, r in zip(shape, self.roi_size)]
            samples.append({**data, **{key: self._crop(v, starts) for key, v in volumes.items()}})
        return samples


def crop_transforms(manifest: str, from_disk, load_and_scale: Sequence, crop, after: Sequence = ()) -> list:
    """The transforms that give a pre-training crop: with a ``manifest``, one read from the processed volume on disk
    (``from_disk``, a ``ReadCropsd``); else the volume loaded and scaled (``load_and_scale``), then ``crop``. The
    method's own transforms (``after``: masking, views, corruptions) follow either way."""
    return ([from_disk] if manifest else [*load_and_scale, crop]) + list(after)


def cache_rate(manifest: str, rate: float) -> float:
    """The dataset's cache rate: none from a ``manifest`` (its crops are read from disk, in constant memory), else
    ``rate``."""
    return 0.0 if manifest else rate
