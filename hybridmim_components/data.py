"""Datalists from a user's data: NIfTI folders, MSD task folders, BTCV and BraTS layouts, datalist JSON.

A datalist is a list of ``{"image": path or [paths], "label": path}`` items, as MONAI's
``load_decathlon_datalist`` reads them. Splits are seeded; label fractions are nested (the items of a smaller
fraction are a subset of those of a larger one), so label-efficiency curves compare like with like.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

from monai.data import partition_dataset

from hybridmim_components.abdomen import BTCV_LABELS
from hybridmim_components.dataset_check import require_valid_dataset
from hybridmim_components.manifest import manifest_datalist
from hybridmim_components.phantoms import dataset_or_phantoms, ensure_ct_phantoms

from hybridmim_components.layout import (
    MISSING,
    Layout,
    Problem,
    datalist_json,
    paired_items,
    read_layout,
    validate_datalist,
)

__all__ = [
    "load_datalist",
    "readable_items",
    "image_items",
    "pretraining_datalist",
    "paired_datalist",
    "train_val_split",
    "kfold_split",
    "label_subset",
    "finetune_split",
    "write_datalist",
    "inference_items",
    "pretraining_inference_items",
    "probe_datalist",
    "probe_class_names",
]

# the probe's default volumes: 4 abdominal phantoms of subjects no bundle's own phantoms use
PROBE_PHANTOMS = {"num_subjects": 4, "seed": 900, "task": "btcv"}


def _raise_on(problems: list[Problem], source: str) -> None:
    """Raise when a layout has problems: FileNotFoundError where only paths are missing, else ValueError."""
    if not problems:
        return
    lines = "\n".join(f"  - {p}" for p in problems)
    message = (f"the dataset {source} cannot be read as it is ({len(problems)} problem(s)):\n{lines}\n"
               f"`python tools/check_dataset.py {source}` lists these and the problems of the files themselves.")
    raise (FileNotFoundError if all(p.problem == MISSING for p in problems) else ValueError)(message)


def load_datalist(source: str, key: str = "training") -> list[dict]:
    """Read a list of ``{"image": path or [paths], "label": path}`` items from a user's data.

    Args:
        source: one of the layouts of ``hybridmim_components.layout``: an MSD task folder with ``dataset.json``
            or a datalist JSON file (its ``key`` list, paths relative to the file's folder); a BraTS 2020/2021
            folder of case folders; a folder with ``imagesTr/`` and ``labelsTr/`` (or BTCV's ``img/`` and
            ``label/``, also under ``RawData/Training/``), paired by name; a folder of NIfTI volumes (images
            only, for pre-training).
        key: the list to read from a JSON datalist.

    Raises:
        FileNotFoundError: the source, or files it lists, do not exist (each named).
        ValueError: any other layout problem, each named with its fix.
    """
    return readable_items(read_layout(source, keys=(key,)))


def readable_items(found: Layout) -> list[dict]:
    """The items of a ``read_layout`` result; raises as ``load_datalist`` does if it has layout problems."""
    _raise_on(found.problems, found.source)
    return found.items


def image_items(source: str) -> list[dict]:
    """The items of ``source`` with their images only (``{"image": ...}``): what inference and pre-training read."""
    return [{"image": item["image"]} for item in load_datalist(source)]


def inference_items(path: str) -> list[dict]:
    """What a fine-tuning bundle's inference reads: every NIfTI volume of the folder ``path``, or the one file."""
    if os.path.isdir(path):
        return [{"image": p} for p in sorted(glob.glob(os.path.join(path, "*.nii*")))]
    return [{"image": path}]


def pretraining_inference_items(dataset_dir: str, phantom_dir: str) -> list[dict]:
    """What a pre-training bundle's inference reads: the images of ``dataset_dir``, or of the bundle's phantoms
    while ``dataset_dir`` is still its default ``phantom_dir`` (``phantoms.dataset_or_phantoms``)."""
    return image_items(dataset_or_phantoms(dataset_dir, phantom_dir))


def probe_datalist(datalist: str, phantom_dir: str) -> list[dict]:
    """The segmentation probe's labelled volumes: the user's ``datalist`` (a datalist JSON or dataset folder), or
    without one the 4 BTCV phantoms of ``PROBE_PHANTOMS``, written to ``phantom_dir`` on first use."""
    return load_datalist(datalist or ensure_ct_phantoms(phantom_dir, **PROBE_PHANTOMS))


def probe_class_names(datalist: str) -> list[str] | None:
    """The probe's class names: BTCV's 13 organs for its default phantoms; ``None`` (numbered) for the user's."""
    return None if datalist else [BTCV_LABELS[c] for c in range(1, 14)]


def pretraining_datalist(source: str, manifest: str, preprocessing: Sequence, channels: int, dataset_check: str
                         ) -> list[dict]:
    """The volumes of a pre-training run: a preprocessed corpus's ``manifest`` (checked against the bundle's
    ``preprocessing``) where one is given, else the dataset ``source``, checked at the ``dataset_check`` level
    (see ``dataset_check.require_valid_dataset``) for images of ``channels`` channels."""
    if manifest:
        return manifest_datalist(manifest, preprocessing)
    return load_datalist(require_valid_dataset(source, channels=channels, level=dataset_check))


def paired_datalist(image_dir: str, label_dir: str) -> list[dict]:
    """Pair the NIfTI files of two folders by case number (BTCV: imgNNNN/labelNNNN) or identical names."""
    problems: list[Problem] = []
    items = paired_items(image_dir, label_dir, problems)
    _raise_on(problems, image_dir)
    return items


def train_val_split(items: Sequence, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Seeded split into training and validation items, at least one of each."""
    if len(items) < 2:
        raise ValueError(f"need at least 2 volumes (one is held out for validation), got {len(items)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    num_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
    shuffled = partition_dataset(items, num_partitions=1, shuffle=True, seed=seed)[0]
    return list(shuffled[num_val:]), list(shuffled[:num_val])


def kfold_split(items: Sequence, num_folds: int = 5, fold: int = 0, seed: int = 0) -> tuple[list, list]:
    """Seeded k-fold: fold ``fold`` is the validation set, the other folds the training set."""
    if not 2 <= num_folds <= len(items):
        raise ValueError(f"num_folds must be between 2 and the number of cases ({len(items)}), got {num_folds}.")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}.")
    folds = partition_dataset(items, num_partitions=num_folds, shuffle=True, seed=seed)
    return [item for i, f in enumerate(folds) if i != fold for item in f], list(folds[fold])


def label_subset(items: Sequence, fraction: float = 1.0, seed: int = 0) -> list:
    """A seeded ``fraction`` of the items (at least one); smaller fractions are subsets of larger ones."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
    shuffled = partition_dataset(items, num_partitions=1, shuffle=True, seed=seed)[0]
    return list(shuffled[: max(1, round(fraction * len(items)))])


def finetune_split(
    source: str, num_folds: int = 5, fold: int = 0, seed: int = 0, label_fraction: float = 1.0
) -> tuple[list, list]:
    """Training and validation items of a fine-tuning run.

    A datalist JSON with a ``validation`` list is used as it is; otherwise the ``training`` items (or those of
    the folder) are split by ``kfold_split``. ``label_fraction`` then keeps a nested subset of the training items.
    """
    items = load_datalist(source)
    listing = datalist_json(source)
    validation = read_layout(listing, keys=("validation",)) if listing else None
    if validation and validation.items:
        train, val = items, readable_items(validation)
    else:
        train, val = kfold_split(items, num_folds, fold, seed)
    return label_subset(train, label_fraction, seed), val


def write_datalist(path: str, training: Sequence[dict], validation: Sequence[dict] = ()) -> str:
    """Write a datalist JSON with paths relative to its folder; validated before it is written."""
    base = os.path.dirname(os.path.abspath(path))

    def rel(value):
        return [rel(v) for v in value] if isinstance(value, list) else os.path.relpath(os.path.abspath(value), base)

    content = {"training": [{k: rel(v) for k, v in item.items()} for item in training]}
    if validation:
        content["validation"] = [{k: rel(v) for k, v in item.items()} for item in validation]
    validate_datalist(content, path)
    os.makedirs(base, exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
    return path
