# Copyright 2026 hybridmim-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Preprocess an unlabelled corpus once, in parts, into memory-mapped volumes and a JSON Lines manifest.

Pre-training on 10k-100k volumes cannot decode and cache every volume in memory (a resampled abdominal CT is
about 50 MB as float32). This runs a bundle's own loading chain (``load_and_scale``: orientation, spacing,
intensity window, foreground crop) once per volume and writes the result as a file from which
:class:`hybridmim_components.manifest.ReadCropsd` reads a random crop without reading the rest of the
volume: an uncompressed ``.npy`` (the default; memory-mapped), or with ``storage="blosc2"`` a ``.b2nd`` array of
compressed 64^3 chunks (zstd level 1 with byte shuffle), of which a crop decompresses only the chunks it touches.
The layout of ``output_dir``::

    volumes/<id>.npy or <id>.b2nd         (channels, x, y, z), as the bundle's chain leaves it; float32, or
                                          float16 with ``dtype="float16"`` (see below)
    manifest/part-<i>-of-<n>.jsonl        one record per volume (see ``manifest.RECORD_KEYS``)
    manifest/rejected-<i>-of-<n>.jsonl    one record per rejected volume, with its reason

Any scheduler can spread the work: part ``i`` of ``n`` takes every n-th volume of the sorted source list, so the
parts partition the corpus whatever machine runs them. A part can be stopped at any point (even ``kill -9``) and
rerun: a volume is written under a temporary name and renamed when complete, its record is appended only after
that, and a rerun skips every volume that has a record (accepted or rejected).

``dtype="float16"`` halves the bytes: the chain scales intensities to [0, 1], where float16 resolves 2^-11 (0.2 HU
of the -175..250 HU window), and a crop is read back as float32. float32 ``.npy``, the default, keeps the crops
exactly as the in-memory path makes them and needs no other package; blosc2 float16 takes about a sixth of its
disk at a similar rate of crops read from a cold disk (``docs/performance.md``, "Pre-training at scale").
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import nibabel as nib
import numpy as np
import torch

from hybridmim_components.data import readable_items
from hybridmim_components.layout import NIFTI_SUFFIXES, as_paths, read_layout
from hybridmim_components.manifest import PREPROCESSING_FILE, STORAGE_SUFFIXES, part_name, read_records
from hybridmim_components.loading import describe_preprocessing

__all__ = ["list_sources", "volume_id", "save_volume", "preprocess_volume", "preprocess"]

# BIDS suffixes (and a few common spellings) that name a modality in a file name, e.g. sub-01_T1w.nii.gz
_MODALITY_SUFFIXES = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "t1": "T1w", "t2": "T2w", "t1ce": "T1ce",
                      "t1gd": "T1ce", "pd": "PD", "pdw": "PD", "ct": "CT", "dwi": "DWI", "swi": "SWI"}


def list_sources(sources: str | Sequence[str]) -> list[dict]:
    """Every volume of ``sources`` as ``{"image": path}`` items (a datalist's ``modality`` key is kept), sorted
    by path and without duplicates. A source is a datalist JSON, a labelled dataset folder in a layout of
    ``hybridmim_components.layout`` (``dataset.json``, ``imagesTr/``, BraTS case folders: its images, each BraTS
    modality on its own, not its labels), or any other folder, searched recursively for
    NIfTI files (e.g. a BIDS tree)."""
    items: dict[str, dict] = {}
    for source in [sources] if isinstance(sources, str) else sources:
        if not os.path.exists(source):
            raise FileNotFoundError(f"preprocessing source {source} does not exist; pass folders of NIfTI volumes "
                                    "or datalist JSON files.")
        found = read_layout(source)
        if found.layout in ("datalist", "paired", "brats"):
            for item in readable_items(found):
                if not isinstance(item["image"], str) and found.layout != "brats":
                    raise ValueError(f"{source} lists multi-channel items ({item['image']}); preprocessing takes "
                                     "one file per volume.")
                for path in map(os.path.abspath, as_paths(item["image"])):  # a BraTS case: each modality, no label
                    items[path] = {"image": path, **({"modality": item["modality"]} if "modality" in item else {})}
        else:
            for folder, _, names in os.walk(source):
                for name in names:
                    if name.endswith(NIFTI_SUFFIXES):
                        path = os.path.abspath(os.path.join(folder, name))
                        items[path] = {"image": path}
    if not items:
        raise ValueError(f"no NIfTI volumes (*.nii, *.nii.gz) in {sources}.")
    return [items[p] for p in sorted(items)]


def volume_id(path: str) -> str:
    """A file name that is readable and unique for a source path: the name's stem and 10 hex digits of its path's
    hash (two ``image.nii.gz`` in different folders get different ids)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path).split(".nii")[0])
    return f"{stem}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]}"


def _subject_and_modality(item: dict, default_modality: str) -> tuple[str | None, str]:
    path = item["image"]
    subject = next((part[4:] for part in path.split(os.sep) if part.startswith("sub-")), None)
    suffix = os.path.basename(path).split(".nii")[0].rsplit("_", 1)[-1].lower()
    modality = item.get("modality") or _MODALITY_SUFFIXES.get(suffix, default_modality)
    return subject, modality


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_volume(item: dict, output_dir: str, transform: Callable, default_modality: str = "CT",
                      modalities: Sequence[str] | None = None, min_size: int = 0,
                      spacing_range: Sequence[float] = (0.0, float("inf")), dtype: str = "float32",
                      storage: str = "npy") -> dict:
    """Preprocess one volume into ``output_dir/volumes/<id>.npy`` (or ``.b2nd``); return its manifest record, or
    a rejection ``{"image", "id", "reason"}``. Never raises for a bad volume: a corpus of 100k has some.

    Args:
        item: ``{"image": path}``, optionally with ``modality``.
        transform: the bundle's loading chain (``load_and_scale``); takes ``{"image": path}``, returns the
            processed ``(channels, x, y, z)`` array under ``image``.
        modalities: keep only these modalities (``None``: all).
        min_size: reject a volume with fewer voxels than this along any axis (a localiser, a thin slab).
        spacing_range: reject a volume whose original spacing (mm) lies outside ``[low, high]`` in any axis.
        dtype: ``"float32"`` or ``"float16"``, the stored values' type.
        storage: ``"npy"`` or ``"blosc2"`` (see ``save_volume``).
    """
    path = item["image"]
    ident = volume_id(path)
    subject, modality = _subject_and_modality(item, default_modality)

    def rejected(reason: str) -> dict:
        return {"image": path, "id": ident, "modality": modality, "reason": reason}

    if modalities is not None and modality not in modalities:
        return rejected(f"modality {modality} is not among {list(modalities)}")
    try:
        header = nib.load(path)
        shape, spacing = tuple(int(s) for s in header.shape), [float(z) for z in header.header.get_zooms()[:3]]
    except Exception as e:  # an unreadable file is a reason, not a stop
        return rejected(f"cannot read the header ({type(e).__name__}: {e})")
    if len(shape) != 3:
        return rejected(f"is {len(shape)}D with shape {list(shape)}; a 3D volume is expected")
    if min(shape) < min_size:
        return rejected(f"shape {list(shape)} is below the minimum size {min_size}")
    if not all(spacing_range[0] <= z <= spacing_range[1] for z in spacing):
        return rejected(f"spacing {spacing} mm lies outside the range {list(spacing_range)}")
    try:
        original = np.asarray(header.dataobj, dtype=np.float32)
        if not np.isfinite(original).all():
            return rejected("has NaN or infinite values")
        statistics = {"min": float(original.min()), "max": float(original.max()), "mean": float(original.mean()),
                      "std": float(original.std()), "p0.5": float(np.percentile(original, 0.5)),
                      "p99.5": float(np.percentile(original, 99.5))}
        del original
        processed = np.ascontiguousarray(np.asarray(transform({"image": path})["image"], dtype=np.float32))
        processed = processed.astype(dtype, copy=False)
    except Exception as e:
        return rejected(f"preprocessing failed ({type(e).__name__}: {str(e)[:300]})")
    folder, suffix = os.path.join(output_dir, "volumes"), STORAGE_SUFFIXES[storage]
    target = os.path.join(folder, f"{ident}{suffix}")
    for stale in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(ident)}.partial-*")):
        os.remove(stale)  # left by a killed run of this part
    partial = os.path.join(folder, f"{ident}.partial-{os.getpid()}{suffix}")
    save_volume(processed, partial)
    os.replace(partial, target)  # atomic: a stopped run leaves a .partial file, never a short volume
    return {"id": ident, "image": path, "file": os.path.relpath(target, output_dir), "subject": subject,
            "modality": modality, "spacing": spacing, "shape": list(shape),
            "processed_shape": list(processed.shape), "intensity": statistics, "sha256": _file_hash(path)}


def save_volume(array: np.ndarray, path: str) -> None:
    """Write a processed (C, x, y, z) array: ``.npy`` uncompressed, or ``.b2nd`` as blosc2 chunks of C x 64^3
    (zstd level 1 after byte shuffle; the level and chunks measured in ``tools/benchmark_scale.py``)."""
    if path.endswith(STORAGE_SUFFIXES["blosc2"]):
        import blosc2

        blosc2.asarray(array, urlpath=path, mode="w",
                       chunks=(array.shape[0], *(min(64, s) for s in array.shape[1:])),
                       blocks=(array.shape[0], *(min(32, s) for s in array.shape[1:])),
                       cparams={"codec": blosc2.Codec.ZSTD, "clevel": 1, "filters": [blosc2.Filter.SHUFFLE]})
    else:
        with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the name
            np.save(f, array, allow_pickle=False)


_worker_transform: Callable | None = None  # each worker's copy of the loading chain


def _start_worker(transform: Callable, forked: bool = False) -> None:
    global _worker_transform
    _worker_transform = transform
    if forked:  # the parent's OpenMP threads do not exist in a fork: one thread per worker, as DataLoader's
        torch.set_num_threads(1)


def _worker(args: tuple) -> dict:
    item, output_dir, options = args
    return preprocess_volume(item, output_dir, _worker_transform, **options)


def preprocess(sources: str | Sequence[str], output_dir: str, transform: Callable, part: int = 0,
               num_parts: int = 1, num_workers: int = 1, default_modality: str = "CT",
               modalities: Sequence[str] | None = None, min_size: int = 0,
               spacing_range: Sequence[float] = (0.0, float("inf")), dtype: str = "float32",
               storage: str = "npy", quiet: bool = False) -> dict:
    """Preprocess part ``part`` of ``num_parts`` of the volumes of ``sources`` into ``output_dir``.

    Volumes that already have a record (accepted or rejected) in this part's files are skipped; the others are
    processed over ``num_workers`` processes and their records appended as each one ends. Returns a summary:
    ``{"part", "num_parts", "volumes", "done_before", "accepted", "rejected", "seconds"}``.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, num_parts={num_parts}), got {part}.")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    if storage not in STORAGE_SUFFIXES:
        raise ValueError(f"storage must be one of {sorted(STORAGE_SUFFIXES)}, got {storage!r}.")
    if storage == "blosc2":
        try:
            import blosc2  # noqa: F401
        except ImportError as e:
            raise ImportError("storage='blosc2' needs the blosc2 package: pip install blosc2 "
                              "(or pip install -e \".[scale]\").") from e
    mine = list_sources(sources)[part::num_parts]
    os.makedirs(os.path.join(output_dir, "volumes"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "manifest"), exist_ok=True)
    accepted_file = os.path.join(output_dir, "manifest", part_name("part", part, num_parts))
    rejected_file = os.path.join(output_dir, "manifest", part_name("rejected", part, num_parts))
    _write_preprocessing(output_dir, transform)
    for f in (accepted_file, rejected_file):
        _drop_partial_line(f)
    done = {r["image"] for f in (accepted_file, rejected_file) for r in read_records(f)}
    todo = [item for item in mine if item["image"] not in done]
    options = {"default_modality": default_modality, "modalities": modalities, "min_size": min_size,
               "spacing_range": spacing_range, "dtype": dtype, "storage": storage}
    summary = {"part": part, "num_parts": num_parts, "volumes": len(mine), "done_before": len(mine) - len(todo),
               "accepted": 0, "rejected": 0, "seconds": 0.0}
    start = time.perf_counter()
    tasks = [(item, output_dir, options) for item in todo]
    # forked workers inherit the chain as it is: a bundle's chain holds lambdas, which cannot be pickled
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(transform, True)) if num_workers > 1 else None
    _start_worker(transform)
    with pool or _InProcess() as runner:
        for record in runner.map(_worker, tasks):
            kind = "rejected" if "reason" in record else "accepted"
            with open(rejected_file if kind == "rejected" else accepted_file, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            summary[kind] += 1
            if not quiet:
                done_now = summary["accepted"] + summary["rejected"]
                note = f": {record['reason']}" if kind == "rejected" else ""
                print(f"[part {part}/{num_parts}] {done_now}/{len(todo)} {kind} {record['image']}{note}", flush=True)
    summary["seconds"] = time.perf_counter() - start
    if not quiet:
        processed = summary["accepted"] + summary["rejected"]
        rate = f", {processed / summary['seconds']:.2f} volumes/s" if processed else ""
        print(f"part {part} of {num_parts} of {sources} into {output_dir}: {len(mine)} volumes, {summary['done_before']}"
              f" done before, {summary['accepted']} accepted, {summary['rejected']} rejected "
              f"({summary['seconds']:.0f} s{rate})", flush=True)
    return summary


def _write_preprocessing(output_dir: str, transform: Callable) -> None:
    """Record the chain's spacing, orientation and normalisation; every part must use the same."""
    described = json.loads(json.dumps(describe_preprocessing(getattr(transform, "transforms", [transform]))))
    path = os.path.join(output_dir, PREPROCESSING_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            written = json.load(f)
        if written != described:
            raise ValueError(f"{output_dir} holds volumes preprocessed with {written}, but this part's settings "
                             f"are {described}; use one setting for every part, or another output_dir.")
        return
    with open(f"{path}.partial-{os.getpid()}", "w") as f:
        json.dump(described, f, indent=2)
    os.replace(f"{path}.partial-{os.getpid()}", path)


def _drop_partial_line(path: str) -> None:
    """Cut a last line that a killed run left unterminated, so that the next record starts a line of its own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        content = f.read()
        if content and not content.endswith(b"\n"):
            f.truncate(content.rfind(b"\n") + 1)


class _InProcess:
    """``ProcessPoolExecutor``'s ``map`` in this process, for one worker (and for tests' speed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, tasks):
        return map(fn, tasks)
