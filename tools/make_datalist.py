"""Make a datalist JSON (``training`` and ``validation`` lists, paths relative to the file) from a dataset layout.

    python tools/make_datalist.py msd   /data/Task09_Spleen            --output lists/spleen_fold0.json
    python tools/make_datalist.py btcv  /data/BTCV                     --output lists/btcv_fold0.json
    python tools/make_datalist.py brats /data/BraTS2020_TrainingData   --output lists/brats_fold0.json
    python tools/make_datalist.py folders /data/images /data/labels    --output lists/mine.json

Options of every command: ``--num_folds 5 --fold 0 --seed 0`` (seeded k-fold: the fold is the validation set)
and ``--label_fraction 1.0`` (a nested, seeded subset of the training cases, for label-efficiency experiments).
Give the file to a fine-tuning bundle with ``--dataset_dir lists/spleen_fold0.json``.
"""

from __future__ import annotations

import fire

from hybridmim_components.data import (
    kfold_split,
    label_subset,
    load_datalist,
    paired_datalist,
    write_datalist,
)


def _write(items: list[dict], output: str, num_folds: int, fold: int, seed: int, label_fraction: float) -> str:
    train, val = kfold_split(items, num_folds, fold, seed)
    train = label_subset(train, label_fraction, seed)
    path = write_datalist(output, train, val)
    print(f"wrote {path}: {len(train)} training and {len(val)} validation cases (fold {fold} of {num_folds})")
    return path


def msd(task_dir: str, output: str, num_folds: int = 5, fold: int = 0, seed: int = 0, label_fraction: float = 1.0) -> str:
    """An MSD task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``)."""
    return _write(load_datalist(task_dir), output, num_folds, fold, seed, label_fraction)


def btcv(root: str, output: str, num_folds: int = 5, fold: int = 0, seed: int = 0, label_fraction: float = 1.0) -> str:
    """BTCV: ``img/imgNNNN.nii.gz`` with ``label/labelNNNN.nii.gz`` (also under ``RawData/Training``)."""
    return _write(load_datalist(root), output, num_folds, fold, seed, label_fraction)


def brats(root: str, output: str, num_folds: int = 5, fold: int = 0, seed: int = 0, label_fraction: float = 1.0) -> str:
    """BraTS 2020/2021: one folder per case with ``<case>_{t1,t1ce,t2,flair,seg}.nii.gz``."""
    return _write(load_datalist(root), output, num_folds, fold, seed, label_fraction)


def folders(
    image_dir: str, label_dir: str, output: str, num_folds: int = 5, fold: int = 0, seed: int = 0,
    label_fraction: float = 1.0,
) -> str:
    """Generic image and label folders, paired by case number or identical file names."""
    return _write(paired_datalist(image_dir, label_dir), output, num_folds, fold, seed, label_fraction)


if __name__ == "__main__":
    fire.Fire({"msd": msd, "btcv": btcv, "brats": brats, "folders": folders}, serialize=lambda result: None)
