"""Which layout a user's dataset has, and its items: the one reader behind loading and checking a dataset.

``read_layout`` decides the layout of what ``--dataset_dir`` names, lists its items (``{"image": path or
[paths], "label": path}``, the form MONAI's ``load_decathlon_datalist`` returns) and records every layout problem
as a ``Problem`` instead of stopping at the first: ``data.load_datalist`` raises on them, ``dataset_check``
reports them with the problems it finds in the files themselves. One reader, so that a dataset the check accepts
is one that loading reads.

The layouts, tried in this order:
    - ``datalist``: a datalist JSON file, or a folder with ``dataset.json`` (an MSD task folder); paths relative
      to the file;
    - ``brats``: a folder of BraTS 2020/2021 case folders (``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``);
    - ``paired``: images and labels in two sub-folders, paired by case number or name (``PAIRED_LAYOUTS``:
      ``imagesTr/`` + ``labelsTr/``, BTCV's ``img/`` + ``label/``, BTCV as downloaded,
      ``RawData/Training/img/`` + ``RawData/Training/label/``);
    - ``folder``: a folder of NIfTI volumes, images only (pre-training).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import jsonschema

__all__ = [
    "Problem",
    "Layout",
    "read_layout",
    "paired_items",
    "as_paths",
    "nifti_files",
    "datalist_json",
    "validate_datalist",
    "is_brats_case",
    "brats_case_files",
    "case_id",
    "ACCEPTED",
    "BRATS_MODALITIES",
    "LAYOUTS",
    "MISSING",
    "NIFTI_SUFFIXES",
    "PAIRED_LAYOUTS",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")  # channel order of the BraTS bundle
# (images, labels) sub-folders of a labelled dataset: the Medical Segmentation Decathlon's, then BTCV's
PAIRED_LAYOUTS = (("imagesTr", "labelsTr"), ("img", "label"), ("RawData/Training/img", "RawData/Training/label"))
LAYOUTS = ("datalist", "brats", "paired", "folder")
DATALIST_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "datalist_schema.json")
ACCEPTED = (
    "pass --dataset_dir as an MSD task folder with dataset.json, a datalist JSON file, a BraTS folder of case "
    "folders, a folder with imagesTr/ and labelsTr/ (or BTCV's img/ and label/, also under RawData/Training/), "
    "or (pre-training) a folder of .nii/.nii.gz volumes"
)
MISSING = "does not exist"  # the problem of a path that is not there; loading raises FileNotFoundError for it


@dataclass(frozen=True)
class Problem:
    """One problem: the file or folder, what is wrong with it, and what to do."""

    path: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}. Fix: {self.fix}."


@dataclass
class Layout:
    """What ``read_layout`` found: the layout's name (one of ``LAYOUTS``, ``""`` when none applies), the items,
    the datalist JSON read (if any) and the layout problems."""

    source: str
    layout: str = ""
    items: list[dict] = field(default_factory=list)
    listing: str | None = None
    problems: list[Problem] = field(default_factory=list)


def nifti_files(folder: str) -> list[str]:
    """The ``.nii``/``.nii.gz`` files of a folder, sorted, with their paths."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(NIFTI_SUFFIXES))


DATALIST_FORMAT = ('{"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}, ...], "validation": [...]} '
                   "with paths relative to the file")


def datalist_error(content: object) -> str | None:
    """What makes ``content`` an invalid datalist (checked against ``schemas/datalist_schema.json``), naming the
    item; ``None`` for a valid one."""
    with open(DATALIST_SCHEMA) as f:
        schema = json.load(f)
    try:
        jsonschema.validate(content, schema)
    except jsonschema.ValidationError as e:
        return f"is not a valid datalist at {'/'.join(str(p) for p in e.absolute_path) or 'top level'}: {e.message}"
    return None


def validate_datalist(content: object, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the item if ``content`` is not a valid datalist."""
    error = datalist_error(content)
    if error:
        raise ValueError(f"{source} {error}. Expected {DATALIST_FORMAT}.")


def datalist_json(source: str) -> str | None:
    """The datalist JSON a source stands for: the file itself, or an MSD folder's ``dataset.json``."""
    if os.path.isdir(source):
        source = os.path.join(source, "dataset.json")
    return source if os.path.isfile(source) else None


def is_brats_case(folder: str) -> bool:
    """A folder holding a BraTS segmentation (``<case>_seg.nii[.gz]``)."""
    return os.path.isdir(folder) and any(n.endswith(NIFTI_SUFFIXES) and "_seg." in n for n in os.listdir(folder))


def brats_case_files(folder: str) -> dict[str, str]:
    """A BraTS case folder's NIfTI files by their lower-case suffix (``<case>_t1ce.nii.gz`` -> ``t1ce``)."""
    return {os.path.basename(p).split(".nii")[0].rsplit("_", 1)[-1].lower(): p for p in nifti_files(folder)}


def case_id(path: str) -> str:
    """The last number in a file name ('img0007.nii.gz' -> '7'), or the name without suffix."""
    name = os.path.basename(path).split(".nii")[0]
    numbers = re.findall(r"\d+", name)
    return str(int(numbers[-1])) if numbers else name


def as_paths(value) -> list[str]:
    """An item's ``image`` or ``label`` as a list of paths (one channel's file, or each channel's)."""
    return [value] if isinstance(value, str) else list(value or [])


def _datalist_items(listing: str, keys: Sequence[str], problems: list[Problem]) -> list[dict]:
    try:
        with open(listing) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        problems.append(Problem(listing, f"is not valid JSON ({e})", f"correct the JSON syntax; {ACCEPTED}"))
        return []
    error = datalist_error(content)
    if error:
        problems.append(Problem(listing, error, f"write it as {DATALIST_FORMAT}"))
        return []
    if not content.get(keys[0]):
        problems.append(Problem(listing, f"has no non-empty list under the key '{keys[0]}'",
                                f"list the cases under '{keys[0]}'"))
    base = os.path.dirname(os.path.abspath(listing))

    def resolve(value):  # as load_decathlon_datalist does: relative to the file, other keys kept
        return [resolve(v) for v in value] if isinstance(value, list) else os.path.normpath(os.path.join(base, value))

    return [{k: resolve(v) if k in ("image", "label") else v for k, v in raw.items()}
            for key in keys for raw in content.get(key) or []]


def _brats_items(root: str, problems: list[Problem]) -> list[dict]:
    items = []
    for case in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        folder = os.path.join(root, case)
        files = brats_case_files(folder)
        if not files:
            problems.append(Problem(folder, "is an empty case folder (no NIfTI files)",
                                    "add the case's files or remove the folder"))
            continue
        missing = [m for m in (*BRATS_MODALITIES, "seg") if m not in files]
        if missing:
            problems.append(Problem(folder, f"has no {', '.join(missing)} file",
                                    f"add <case>_<modality>.nii.gz for each of {', '.join((*BRATS_MODALITIES, 'seg'))}"))
            continue
        items.append({"image": [files[m] for m in BRATS_MODALITIES], "label": files["seg"]})
    return items


def paired_items(image_dir: str, label_dir: str, problems: list[Problem]) -> list[dict]:
    """The images of one folder with their labels in another, paired by case number (BTCV's
    ``imgNNNN``/``labelNNNN``) or identical names; every image or label without its partner is a problem."""
    folders = {}
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            problems.append(Problem(folder, MISSING, f"put the {'images' if folder == image_dir else 'labels'} "
                                    f"there; {ACCEPTED}"))
            folders[folder] = []
        else:
            folders[folder] = nifti_files(folder)
            if not folders[folder]:
                problems.append(Problem(folder, "is empty (no .nii/.nii.gz files)", "put the volumes there"))
    images, labels = folders[image_dir], folders[label_dir]
    by_id = {case_id(p): p for p in labels}
    image_ids = {case_id(p) for p in images}
    for path in images:
        if case_id(path) not in by_id and labels:
            problems.append(Problem(path, f"has no label in {label_dir}",
                                    "add its label under the same name or case number, or remove the image"))
    for path in labels:
        if case_id(path) not in image_ids and images:
            problems.append(Problem(path, f"has no image in {image_dir}",
                                    "add its image under the same name or case number, or remove the label"))
    return [{"image": p, "label": by_id[case_id(p)]} for p in images if case_id(p) in by_id]


def _detect(source: str, keys: Sequence[str], found: Layout) -> None:
    problems = found.problems
    if not os.path.exists(source):
        problems.append(Problem(source, MISSING, ACCEPTED))
        return
    found.listing = datalist_json(source)
    if found.listing:
        found.layout, found.items = "datalist", _datalist_items(found.listing, keys, problems)
        return
    if not os.path.isdir(source):
        problems.append(Problem(source, "is neither a folder nor a datalist JSON", ACCEPTED))
        return
    if not os.listdir(source):
        problems.append(Problem(source, "is an empty folder", ACCEPTED))
        return
    if any(is_brats_case(os.path.join(source, d)) for d in os.listdir(source)):
        found.layout, found.items = "brats", _brats_items(source, problems)
        return
    for images, labels in PAIRED_LAYOUTS:
        if os.path.isdir(os.path.join(source, images)):
            found.layout = "paired"
            found.items = paired_items(os.path.join(source, images), os.path.join(source, labels), problems)
            return
    found.layout, found.items = "folder", [{"image": p} for p in nifti_files(source)]
    if not found.items:
        problems.append(Problem(source, "has no NIfTI volumes (*.nii, *.nii.gz)", ACCEPTED))


def read_layout(source: str, keys: Sequence[str] = ("training",)) -> Layout:
    """The layout of ``source``, its items and every layout problem (see the module docstring).

    Args:
        source: what ``--dataset_dir`` takes.
        keys: the lists of a datalist JSON to read; the first must be there and non-empty, the others may be.

    Every listed file that is not there is a problem too (``MISSING``), so that loading and the check agree on
    which items can be read.
    """
    found = Layout(source)
    _detect(source, keys, found)
    for item in found.items:
        for path in (p for k in ("image", "label") for p in as_paths(item.get(k))):
            if not os.path.isfile(path):
                found.problems.append(Problem(path, MISSING, "correct the path in the datalist or add the file"))
    return found
