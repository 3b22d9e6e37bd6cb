"""Every dataset layout the docs promise, laid out on disk as a user's download looks: the check passes, loading
reads the same items, and a short training run of the matching bundle trains on them."""

import json
import os
import shutil
import sys

import pytest

from hybridmim_components.data import load_datalist
from hybridmim_components.dataset_check import check_dataset
from hybridmim_components.layout import read_layout

from conftest import REPO, TINY_UNET, bundle_config, monai_bundle, run_command, tiny_pretrain_args

CT_LABELS = {"msd_spleen_segmentation": range(2), "msd_liver_segmentation": range(3),
             "btcv_multiorgan_segmentation": range(14), "brats_tumor_segmentation": (0, 1, 2, 4)}


def _ct(root, task="spleen"):
    from hybridmim_components.phantoms import write_ct_phantoms

    return write_ct_phantoms(str(root), num_subjects=4, shape=(40, 40, 32), task=task)


def msd_task_folder(root):
    """MSD Task09 as downloaded: dataset.json, imagesTr/, labelsTr/ (and an imagesTs/ that is not read)."""
    source = _ct(root / "Task09_Spleen")
    os.makedirs(os.path.join(source, "imagesTs"))
    return source, "msd_spleen_segmentation", "datalist"


def images_labels_folders(root):
    """imagesTr/ + labelsTr/ without a dataset.json, paired by name."""
    source = _ct(root / "mine")
    os.remove(os.path.join(source, "dataset.json"))
    return source, "msd_spleen_segmentation", "paired"


def _btcv(source, parent):
    """BTCV's names: img/img0001.nii.gz with label/label0001.nii.gz, under ``parent``."""
    images, labels = os.path.join(source, "imagesTr"), os.path.join(source, "labelsTr")
    for folder, prefix in ((images, "img"), (labels, "label")):
        target = os.path.join(source, parent, prefix)
        os.makedirs(target)
        for i, name in enumerate(sorted(os.listdir(folder)), start=1):
            shutil.move(os.path.join(folder, name), os.path.join(target, f"{prefix}{i:04d}.nii.gz"))
        os.rmdir(folder)
    os.remove(os.path.join(source, "dataset.json"))
    return source


def btcv_img_label(root):
    """BTCV as the MONAI tutorials unpack it: img/ and label/ at the top."""
    return _btcv(_ct(root / "BTCV", task="btcv"), ""), "btcv_multiorgan_segmentation", "paired"


def btcv_as_downloaded(root):
    """BTCV's RawData.zip from Synapse: RawData/Training/{img,label}/, RawData/Testing/img/ (no labels)."""
    source = _btcv(_ct(root / "BTCV", task="btcv"), "RawData/Training")
    os.makedirs(os.path.join(source, "RawData", "Testing", "img"))
    return source, "btcv_multiorgan_segmentation", "paired"


def _brats(root):
    from hybridmim_components.phantoms import write_brain_phantoms

    source = write_brain_phantoms(str(root), num_subjects=4, shape=(40, 40, 32))
    os.remove(os.path.join(source, "dataset.json"))
    return source


def brats_2020(root):
    """MICCAI_BraTS2020_TrainingData: BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz,
    with the CSV files the download carries."""
    source = _brats(root / "MICCAI_BraTS2020_TrainingData")
    for name in ("name_mapping.csv", "survival_info.csv"):
        with open(os.path.join(source, name), "w") as f:
            f.write("BraTS_2020_subject_ID\n")
    return source, "brats_tumor_segmentation", "brats"


def brats_2021(root):
    """BraTS2021_Training_Data: BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz."""
    source = _brats(root / "BraTS2021_Training_Data")
    for i, case in enumerate(sorted(os.listdir(source))):
        new = f"BraTS2021_{i:05d}"
        for name in os.listdir(os.path.join(source, case)):
            os.rename(os.path.join(source, case, name), os.path.join(source, case, name.replace(case, new)))
        os.rename(os.path.join(source, case), os.path.join(source, new))
    return source, "brats_tumor_segmentation", "brats"


def datalist_file(root):
    """A datalist JSON of its own, with training and validation lists, paths relative to it."""
    data = _ct(root / "liver", task="liver")
    items = json.load(open(os.path.join(data, "dataset.json")))["training"]
    path = os.path.join(data, "fold0.json")
    with open(path, "w") as f:
        json.dump({"training": items[:3], "validation": items[3:]}, f)
    return path, "msd_liver_segmentation", "datalist"


def plain_folder(root):
    """A folder of unlabelled volumes, for pre-training."""
    source = _ct(root / "ct")
    shutil.rmtree(os.path.join(source, "labelsTr"))
    os.remove(os.path.join(source, "dataset.json"))
    return os.path.join(source, "imagesTr"), "hybridmim_unet_pretrain", "folder"


LAYOUTS = [msd_task_folder, images_labels_folders, btcv_img_label, btcv_as_downloaded, brats_2020, brats_2021,
           datalist_file, plain_folder]


@pytest.mark.slow
@pytest.mark.parametrize("build", LAYOUTS, ids=[b.__name__ for b in LAYOUTS])
def test_layout_is_checked_loaded_and_trained_on(build, tmp_path):
    source, bundle, layout = build(tmp_path / "data")
    assert read_layout(source).layout == layout
    labels = CT_LABELS.get(bundle)
    channels = 4 if bundle.startswith("brats") else 1
    assert check_dataset(source, labels=labels, channels=channels) == []
    items = load_datalist(source)
    assert len(items) == (3 if build is datalist_file else 4)
    assert all("label" in item for item in items) == (layout != "folder")

    root = str(tmp_path / "bundle")
    common = ["--bundle_root", root, "--dataset_dir", source, "--num_workers", "0"]
    if layout == "folder":
        args = tiny_pretrain_args(root, source)
    else:
        args = common + ["--features", TINY_UNET, "--roi_size", "[32,32,32]", "--num_folds", "2", "--max_epochs", "1",
                         "--val_interval", "1", "--cache_rate", "0"]
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(bundle)) + args, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the plan counts the volumes the run was given: the whole corpus for pre-training, the training part of the
    # split for fine-tuning (a 2-fold split of 4 cases, or the datalist's own training list)
    plan = json.load(open(os.path.join(root, "models", "plan.json")))
    trained = 4 if layout == "folder" else 3 if build is datalist_file else 2
    assert plan["data"]["volumes"] == trained, plan["data"]


BROKEN = {
    # the layouts' own problems: loading must refuse what the check reports, naming the same path
    "labels folder missing": lambda root: (shutil.rmtree(os.path.join(_ct(root), "labelsTr")),
                                           os.remove(os.path.join(root, "dataset.json")), str(root))[-1],
    "label without image": lambda root: (os.remove(os.path.join(_ct(root), "imagesTr", "phantom_001.nii.gz")),
                                         os.remove(os.path.join(root, "dataset.json")), str(root))[-1],
    "BraTS case without t2": lambda root: (os.remove(next(
        os.path.join(d, f) for d, _, fs in sorted(os.walk(_brats(root))) for f in fs if f.endswith("_t2.nii.gz"))),
        str(root))[-1],
    "RawData without labels": lambda root: (shutil.rmtree(os.path.join(btcv_as_downloaded(root)[0], "RawData",
                                                                       "Training", "label")), str(root / "BTCV"))[-1],
}


@pytest.mark.parametrize("name", BROKEN)
def test_loading_refuses_what_the_check_reports(name, tmp_path):
    source = BROKEN[name](tmp_path)
    problems = check_dataset(source, labels=None, channels=4 if "BraTS" in name else 1, level="headers")
    assert problems, f"{name}: the check found nothing"
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        load_datalist(source)
    assert problems[0].path in str(raised.value)


if __name__ == "__main__":  # lay out each layout under a folder, to look at: python tests/test_layouts.py /tmp/x
    import pathlib

    for build in LAYOUTS:
        print(build.__name__, build(pathlib.Path(sys.argv[1]) / build.__name__)[0])
