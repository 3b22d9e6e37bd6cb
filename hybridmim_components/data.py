"""Datalists from a user's data: NIfTI folders, MSD task folders, BTCV and BraTS layouts, datalist JSON.

A datalist is a list of ``{"image": path or [paths], "label": path}`` items, as MONAI's
``load_decathlon_datalist`` reads them. Splits are seeded; label fractions are nested (the items of a smaller
fraction are a subset of those of a larger one), so label-efficiency curves compare like with like.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import jsonschema

from monai.data import load_decathlon_datalist, partition_dataset

__all__ = [
    "load_datalist",
    "validate_datalist",
    "paired_datalist",
    "btcv_datalist",
    "brats_datalist",
    "brats_case_files",
    "PAIRED_LAYOUTS",
    "train_val_split",
    "kfold_split",
    "label_subset",
    "finetune_split",
    "write_datalist",
    "nifti_files",
    "datalist_json",
    "is_brats_case",
    "case_id",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")  # channel order of the BraTS bundle
DATALIST_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "datalist_schema.json")
ACCEPTED = (
    "pass --dataset_dir as an MSD task folder with dataset.json, a datalist JSON file, a BraTS folder of case "
    "folders, a folder with imagesTr/ and labelsTr/, or (pre-training) a folder of .nii/.nii.gz volumes"
)


def nifti_files(folder: str) -> list[str]:
    """The ``.nii``/``.nii.gz`` files of a folder, sorted, with their paths."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(NIFTI_SUFFIXES))


def validate_datalist(content: object, source: str) -> None:
    """Check a datalist JSON against ``schemas/datalist_schema.json``; the error names the file and the item."""
    with open(DATALIST_SCHEMA) as f:
        schema = json.load(f)
    try:
        jsonschema.validate(content, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise ValueError(
            f"{source} is not a valid datalist at {where}: {e.message}. Expected "
            '{"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}, ...], "validation": [...]} '
            "with paths relative to the file."
        ) from None


def datalist_json(source: str) -> str | None:
    """The datalist JSON a source stands for: the file itself, or an MSD folder's ``dataset.json``."""
    if os.path.isdir(source):
        source = os.path.join(source, "dataset.json")
    return source if os.path.isfile(source) else None


def _read_datalist_json(path: str) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {ACCEPTED}.") from e
    validate_datalist(content, path)
    return content


def is_brats_case(folder: str) -> bool:
    """A folder holding a BraTS segmentation (``<case>_seg.nii[.gz]``)."""
    return os.path.isdir(folder) and any(n.endswith(NIFTI_SUFFIXES) and "_seg." in n for n in os.listdir(folder))


def load_datalist(source: str, key: str = "training") -> list[dict]:
    """Read a list of ``{"image": path or [paths], "label": path}`` items from a user's data.

    Args:
        source: one of
            - an MSD task folder with ``dataset.json`` (its ``key`` list, paths relative to the folder);
            - a datalist JSON file (its ``key`` list, paths relative to the file's folder);
            - a BraTS 2020/2021 folder of case folders (``<case>_{t1,t1ce,t2,flair,seg}.nii.gz``);
            - a folder with ``imagesTr/`` and ``labelsTr/`` (or BTCV's ``img/`` and ``label/``), paired by name;
            - a folder of NIfTI volumes (images only, for pre-training).
        key: the list to read from a JSON datalist.

    Raises:
        FileNotFoundError / ValueError: naming the path and saying which layouts are accepted.
    """
    if not os.path.exists(source):
        raise FileNotFoundError(f"dataset path {source} does not exist; {ACCEPTED}.")
    listing = datalist_json(source)
    if listing:
        content = _read_datalist_json(listing)
        if not content.get(key):
            raise ValueError(f"{listing} has no non-empty list under the key '{key}'.")
        items = load_decathlon_datalist(listing, is_segmentation=True, data_list_key=key)
        source = listing
    elif any(is_brats_case(os.path.join(source, d)) for d in os.listdir(source)):
        items = brats_datalist(source)
    elif any(os.path.isdir(os.path.join(source, d)) for d in ("imagesTr", "img")):
        items = btcv_datalist(source)
    else:
        volumes = nifti_files(source)
        if not volumes:
            raise ValueError(f"no NIfTI volumes (*.nii, *.nii.gz) in {source}; {ACCEPTED}.")
        items = [{"image": path} for path in volumes]
    for item in items:
        paths = [p for k in ("image", "label") for p in ([item[k]] if isinstance(item.get(k), str) else item.get(k, []))]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{source} lists files that do not exist: {missing}.")
    return items


def case_id(path: str) -> str:
    """The last number in a file name ('img0007.nii.gz' -> '7'), or the name without suffix."""
    name = os.path.basename(path).split(".nii")[0]
    numbers = re.findall(r"\d+", name)
    return str(int(numbers[-1])) if numbers else name


def paired_datalist(image_dir: str, label_dir: str) -> list[dict]:
    """Pair the NIfTI files of two folders by case number (BTCV: imgNNNN/labelNNNN) or identical names."""
    images, labels = nifti_files(image_dir), nifti_files(label_dir)
    by_id = {case_id(p): p for p in labels}
    unpaired = [p for p in images if case_id(p) not in by_id]
    if not images or unpaired:
        raise ValueError(
            f"cannot pair the images of {image_dir} with the labels of {label_dir}: "
            + (f"no label for {unpaired[:5]}" if images else "no NIfTI images")
            + "; images and labels must share a case number or a name."
        )
    return [{"image": p, "label": by_id[case_id(p)]} for p in images]


# (images, labels) sub-folders of a labelled dataset: the Medical Segmentation Decathlon's, then BTCV's
PAIRED_LAYOUTS = (("imagesTr", "labelsTr"), ("img", "label"), ("RawData/Training/img", "RawData/Training/label"))


def btcv_datalist(root: str) -> list[dict]:
    """BTCV (``img/imgNNNN``, ``label/labelNNNN``, also under ``RawData/Training``) or ``imagesTr``/``labelsTr``."""
    for images, labels in PAIRED_LAYOUTS:
        if os.path.isdir(os.path.join(root, images)) and os.path.isdir(os.path.join(root, labels)):
            return paired_datalist(os.path.join(root, images), os.path.join(root, labels))
    raise ValueError(f"{root} has neither imagesTr/ + labelsTr/ nor img/ + label/ folders; {ACCEPTED}.")


def brats_case_files(folder: str) -> dict[str, str]:
    """A BraTS case folder's NIfTI files by their lower-case suffix (``<case>_t1ce.nii.gz`` -> ``t1ce``)."""
    return {os.path.basename(p).split(".nii")[0].rsplit("_", 1)[-1].lower(): p for p in nifti_files(folder)}


def brats_datalist(root: str) -> list[dict]:
    """BraTS 2020/2021 case folders; ``image`` lists the four modalities in ``BRATS_MODALITIES`` order."""
    items = []
    for case in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        files = brats_case_files(os.path.join(root, case))
        if not files:
            continue
        missing = [m for m in (*BRATS_MODALITIES, "seg") if m not in files]
        if missing:
            raise ValueError(f"BraTS case {os.path.join(root, case)} has no {missing} file (expected <case>_<modality>.nii.gz).")
        items.append({"image": [files[m] for m in BRATS_MODALITIES], "label": files["seg"]})
    if not items:
        raise ValueError(f"no BraTS case folders in {root}; {ACCEPTED}.")
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
    if listing and _read_datalist_json(listing).get("validation"):
        train, val = items, load_datalist(source, key="validation")
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
