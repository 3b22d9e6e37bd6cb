"""A dataset check that reports every problem at once, naming the file and the fix.

Training on a bad dataset fails late and obscurely (a shape error deep in a collate, a NaN loss hours in) or,
worse, not at all (labels outside the task's classes train a wrong model). ``check_dataset`` reads a dataset in
any layout that ``hybridmim_components.data.load_datalist`` accepts (both read it with
``hybridmim_components.layout.read_layout``, so the check passes exactly the layouts that loading reads) and returns a list of ``Problem``; it keeps
going after each one, so one pass shows everything to fix. ``tools/check_dataset.py`` prints them; the bundles
call ``require_valid_dataset`` before they build their datasets.

Two levels: ``"headers"`` reads only the NIfTI headers (shapes, affines, spacings, dimensions, channels; fast
enough for 100k pre-training volumes), ``"full"`` also reads every voxel (truncated files, NaN/Inf, label
values, duplicate volumes under different names).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from hybridmim_components.layout import Problem, as_paths, read_layout

__all__ = ["Problem", "DatasetProblemsError", "check_dataset", "require_valid_dataset", "LEVELS"]

LEVELS = ("full", "headers", "off")
REREAD = "re-export it from the source (a copy cut short by an interrupted transfer reads as truncated) or remove it"


class DatasetProblemsError(ValueError):
    """Raised by ``require_valid_dataset``; ``problems`` holds every ``Problem`` found."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"the dataset {source} has {len(self.problems)} problem(s):\n{lines}\n"
            f"Fix them and run again (`python tools/check_dataset.py {source}` re-checks without training), or "
            "pass --dataset_check off to skip the check."
        )


def _check_inside_listing(listing: str, items: list[dict], problems: list[Problem]) -> None:
    """A datalist's volumes lie in its folder, so that the dataset moves and is shared as one folder."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(listing)))
    for path in (p for item in items for k in ("image", "label") for p in as_paths(item.get(k))):
        if os.path.commonpath([os.path.realpath(path), base]) != base:
            problems.append(Problem(
                path, f"is listed by {listing} but lies outside its folder {base}",
                "keep the volumes inside the datalist's folder and list them by relative paths, so that the "
                "dataset can be moved and shared as one folder"))


class _Volume:
    """One file's header facts, and its voxels when they were read; ``error`` if it could not be read."""

    def __init__(self, path: str, read_data: bool) -> None:
        self.path, self.error, self.data = path, None, None
        try:
            image = nib.load(path)
            self.shape, self.affine = tuple(image.shape), np.asarray(image.affine, dtype=float)
            # the header as written: nibabel mends a zero spacing to 1 on load, which would hide a lost spacing
            with nib.openers.ImageOpener(path) as f:
                written = type(image.header).from_fileobj(f, check=False)
            self.spacing = tuple(abs(float(z)) for z in written["pixdim"][1:4]) if "pixdim" in written else \
                tuple(float(z) for z in image.header.get_zooms()[:3])
            if read_data:
                self.data = np.asanyarray(image.dataobj)
        except Exception as e:  # nibabel, gzip and zlib each have their own errors for a damaged file
            self.error = f"{type(e).__name__}: {e}"


def _check_volume(volume: _Volume, role: str, spacing_range: tuple[float, float], problems: list[Problem]) -> bool:
    """Checks of one file on its own; False when it cannot be used at all."""
    if volume.error:
        problems.append(Problem(volume.path, f"cannot be read ({volume.error})", REREAD))
        return False
    spatial = volume.shape[:3]
    if len(volume.shape) < 3 or 1 in spatial:
        problems.append(Problem(volume.path, f"is 2D (shape {volume.shape}) where a 3D volume is expected",
                                "give the whole 3D volume, not a slice"))
        return False
    extra = volume.shape[3:]
    if role == "label" and any(n > 1 for n in extra):
        problems.append(Problem(volume.path, f"is a {len(volume.shape)}D label (shape {volume.shape}) where a 3D "
                                "label map is expected", "store one 3D map of integer labels"))
    elif len(extra) > 1:
        problems.append(Problem(volume.path, f"is {len(volume.shape)}D (shape {volume.shape}) where 3D or 3D with "
                                "channels last is expected", "store a 3D volume, or 4D with the channels last"))
    low, high = spacing_range
    bad = [s for s in volume.spacing if not np.isfinite(s) or s <= 0]
    if bad:
        problems.append(Problem(volume.path, f"has zero or invalid voxel spacing {volume.spacing}",
                                "write the real spacing into the NIfTI header (pixdim) when converting"))
    elif any(s < low or s > high for s in volume.spacing):
        problems.append(Problem(volume.path, f"has an implausible voxel spacing {volume.spacing} mm (expected "
                                f"{low} to {high} mm)", "check the units and the header written by the converter"))
    if volume.data is not None and np.issubdtype(volume.data.dtype, np.floating) and not np.isfinite(volume.data).all():
        count = int((~np.isfinite(volume.data)).sum())
        problems.append(Problem(volume.path, f"has {count} NaN or infinite voxel(s)",
                                "replace them (e.g. by the background value) or remove the volume"))
    return True


def _channels(volume: _Volume) -> int:
    return int(np.prod(volume.shape[3:])) if len(volume.shape) > 3 else 1


def _check_channels(images: list[_Volume], first_path: str, channels: int, problems: list[Problem]) -> None:
    found = sum(_channels(v) for v in images)
    if found != channels and channels == 1 and len(images) == 1:
        problems.append(Problem(first_path, f"is {len(images[0].shape)}D (shape {images[0].shape}) "
                                "where a 3D volume is expected", "give one 3D volume per case"))
    elif found != channels:
        problems.append(Problem(
            first_path, f"gives {found} image channel(s) ({len(images)} file(s)) but the network takes {channels}",
            f"give {channels} channel(s): one 4D file with the channels last or a list of {channels} 3D files"))


def _check_same_grid(reference: _Volume, others: list[_Volume], label: _Volume | None, problems: list[Problem]) -> None:
    """The other channels and the label lie on the first image's grid: same shape, same affine."""
    for volume in others:
        what = "label" if volume is label else "image channel"
        if volume.shape[:3] != reference.shape[:3]:
            problems.append(Problem(volume.path, f"has the {what} shape {volume.shape[:3]} but its image "
                                    f"{reference.path} has {reference.shape[:3]}",
                                    "resample the label onto the image's grid, or pair it with the right image"))
        elif not np.allclose(volume.affine, reference.affine, atol=1e-3):
            problems.append(Problem(volume.path, f"has an affine other than that of its image {reference.path} "
                                    f"(max difference {np.abs(volume.affine - reference.affine).max():.4g})",
                                    "write the image's affine into the label (same grid, same orientation)"))


def _check_label_values(label: _Volume, allowed: set[int], problems: list[Problem]) -> None:
    wrong = [v for v in np.unique(label.data).tolist() if v != int(v) or int(v) not in allowed]
    if wrong:
        problems.append(Problem(label.path, f"has label values {wrong[:10]} outside the task's labels "
                                f"{sorted(allowed)}", "map the labels to the task's values (see the bundle's "
                                "class_names) or use the bundle that matches them"))


def check_dataset(
    source: str,
    labels: Sequence[int] | None = None,
    channels: int = 1,
    level: str = "full",
    keys: Sequence[str] = ("training", "validation"),
    spacing_range: Sequence[float] = (0.05, 20.0),
) -> list[Problem]:
    """Every problem of a dataset, in one pass.

    Args:
        source: what ``--dataset_dir`` takes (see ``hybridmim_components.data.load_datalist``).
        labels: the label values the task allows (e.g. ``[0, 1]`` for spleen, ``[0, 1, 2, 4]`` for BraTS);
            ``None`` for images without labels (pre-training).
        channels: the number of image channels the network takes (BraTS: 4, as four files or one 4D file).
        level: ``"full"`` reads every voxel, ``"headers"`` only the headers (see the module docstring).
        keys: the lists of a datalist JSON to check; the first must be there, the others may.
        spacing_range: plausible voxel spacings in mm.

    Returns the problems found, in dataset order; empty when the dataset is fine.
    """
    if level not in LEVELS[:2]:
        raise ValueError(f"level must be 'full' or 'headers', got {level!r}.")
    found = read_layout(source, keys)
    problems, items = list(found.problems), found.items
    if found.listing:
        _check_inside_listing(found.listing, items, problems)
    seen_files: dict[str, str] = {}
    seen_content: dict[str, str] = {}
    allowed = None if labels is None else {int(v) for v in labels}
    for item in items:
        image_paths, label_paths = as_paths(item.get("image")), as_paths(item.get("label"))
        listed_twice = False
        for path in image_paths + label_paths:
            real = os.path.realpath(path)
            if real in seen_files:
                listed_twice = True
                problems.append(Problem(path, f"is listed twice (also as {seen_files[real]})",
                                        "list each case once: a duplicate leaks between training and validation"))
            seen_files.setdefault(real, path)
        if not all(os.path.isfile(p) for p in image_paths + label_paths):
            continue  # read_layout reported the missing files
        images = [_Volume(p, level == "full") for p in image_paths]
        label = _Volume(label_paths[0], level == "full") if label_paths else None
        usable = [v for v in images if _check_volume(v, "image", tuple(spacing_range), problems)]
        label_usable = label is not None and _check_volume(label, "label", tuple(spacing_range), problems)
        if len(usable) == len(images):
            _check_channels(images, image_paths[0], channels, problems)
            if level == "full" and not listed_twice:
                digest = hashlib.blake2b(b"".join(np.ascontiguousarray(v.data).tobytes() for v in images)).hexdigest()
                if digest in seen_content:
                    problems.append(Problem(image_paths[0], f"has the same voxels as {seen_content[digest]}",
                                            "remove the duplicate case: it leaks between training and validation"))
                seen_content.setdefault(digest, image_paths[0])
        if usable:
            _check_same_grid(usable[0], usable[1:] + ([label] if label_usable else []), label, problems)
        if label_usable and label.data is not None and allowed is not None:
            _check_label_values(label, allowed, problems)
    return problems


def require_valid_dataset(
    source: str,
    labels: Sequence[int] | None = None,
    channels: int = 1,
    level: str = "full",
    keys: Sequence[str] = ("training", "validation"),
) -> str:
    """``check_dataset`` for a bundle: return ``source`` if it has no problem, else raise
    ``DatasetProblemsError`` listing all of them. ``level="off"`` returns ``source`` unchecked."""
    if level not in LEVELS:
        raise ValueError(f"dataset_check must be one of {LEVELS}, got {level!r}.")
    if level == "off":
        return source
    problems = check_dataset(source, labels=labels, channels=channels, level=level, keys=keys)
    if problems:
        raise DatasetProblemsError(source, problems)
    return source
