import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from hybridmim_components.abdomen import make_abdominal_ct
from hybridmim_components.data import (
    finetune_split,
    kfold_split,
    label_subset,
    load_datalist,
    train_val_split,
    write_datalist,
)
from hybridmim_components.phantoms import (
    BRATS_LABELS,
    CT_PHANTOM_LABELS,
    ensure_ct_phantoms,
    make_brain_phantom,
    make_ct_phantom,
    write_brain_phantoms,
    write_ct_phantoms,
)


def test_phantom_is_deterministic_and_varies_by_seed():
    a, la, affine = make_ct_phantom(0, shape=(64, 56, 40))
    b, lb, _ = make_ct_phantom(0, shape=(64, 56, 40))
    c, lc, _ = make_ct_phantom(1, shape=(64, 56, 40))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(la, lc)
    assert a.dtype == np.int16 and la.dtype == np.uint8 and affine.shape == (4, 4)


def test_phantom_anatomy_in_hounsfield_units():
    image, label, _ = make_ct_phantom(2)
    assert set(np.unique(label)) >= set(range(7))  # every organ; the lesion is drawn in most subjects
    mean_hu = {name: image[label == i].mean() for i, name in CT_PHANTOM_LABELS.items() if (label == i).any()}
    assert mean_hu["vertebra"] > mean_hu["aorta"] > mean_hu["liver"] > -100
    assert (image[label == 0] < -500).mean() > 0.3  # air outside the body
    assert 150 < ((label == 1).sum() * 1.5 * 1.5 * 2.0) / 1000 < 3000  # liver volume in mL
    # the liver lies on the patient's right (negative x in RAS), the spleen on the left
    xs = np.arange(image.shape[0])[:, None, None]
    assert (xs * (label == 1)).sum() / (label == 1).sum() < image.shape[0] / 2
    assert (xs * (label == 2)).sum() / (label == 2).sum() > image.shape[0] / 2


def test_msd_layout_and_loaders(tmp_path):
    root = ensure_ct_phantoms(str(tmp_path / "ct"), num_subjects=2)
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "spleen" and meta["generator"] == "abdomen"
    items = load_datalist(root)
    assert len(items) == 2 and all(os.path.isfile(i["image"]) and os.path.isfile(i["label"]) for i in items)
    nii = nib.load(items[0]["image"])
    assert nii.header.get_zooms() == (1.5, 1.5, 2.0)
    mtime = os.path.getmtime(items[0]["image"])
    ensure_ct_phantoms(root, num_subjects=2)  # present: not rewritten
    assert os.path.getmtime(items[0]["image"]) == mtime
    # the datalist file itself, and a plain folder of volumes
    assert load_datalist(os.path.join(root, "dataset.json")) == items
    folder = load_datalist(os.path.join(root, "imagesTr"))
    assert [i["image"] for i in folder] == [i["image"] for i in items]


def test_liver_phantoms_of_the_incidental_kind_are_redrawn_with_tumours(tmp_path, monkeypatch):
    """MSD Liver's phantoms draw tumours (``abdomen.LESIONS``); a bundle whose folder still holds the liver
    phantoms of the incidental kind (``dataset.json`` says ``abdomen``) gets them redrawn, not reused."""
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    root = ensure_ct_phantoms(str(tmp_path / "liver"), num_subjects=1, task="liver")
    listing = os.path.join(root, "dataset.json")
    meta = json.load(open(listing))
    assert meta["generator"] == "abdomen with tumour lesions" and meta["labels"]["2"] == "cancer"
    meta["generator"] = "abdomen"  # as the phantoms of before
    with open(listing, "w") as f:
        json.dump(meta, f)
    image = load_datalist(root)[0]["image"]
    with open(image, "wb") as f:
        f.write(b"the old phantom")
    ensure_ct_phantoms(root, num_subjects=1, task="liver")
    assert json.load(open(listing))["generator"] == "abdomen with tumour lesions"
    assert np.array_equal(nib.load(image).get_fdata(), make_abdominal_ct(0, lesions="tumour")[0])


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datalist(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is an empty folder"):
        load_datalist(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a volume")
    with pytest.raises(ValueError, match="has no NIfTI volumes"):
        load_datalist(str(tmp_path))
    bad = tmp_path / "list.json"
    bad.write_text('{"training": [{"image": "nope.nii.gz"}]}')
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_datalist(str(bad))
    bad.write_text('{"validation": []}')
    with pytest.raises(ValueError, match="under the key 'training'"):
        load_datalist(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(str(bad))


def test_train_val_split_is_seeded_and_disjoint():
    items = [{"image": str(i)} for i in range(10)]
    train, val = train_val_split(items, 0.2, seed=1)
    assert len(val) == 2 and len(train) == 8
    assert sorted(i["image"] for i in train + val) == sorted(i["image"] for i in items)
    assert train_val_split(items, 0.2, seed=1) == (train, val)
    assert train_val_split(items, 0.2, seed=2) != (train, val)
    with pytest.raises(ValueError, match="at least 2"):
        train_val_split(items[:1])


@pytest.mark.slow
def test_make_phantoms_cli(tmp_path):
    import sys

    from conftest import REPO, run_command

    out = tmp_path / "cli"
    proc = run_command(
        [sys.executable, "tools/make_phantoms.py", "write", "--output_dir", str(out), "--num_subjects", "2",
         "--seed", "5", "--shape", "[40,32,24]"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    items = load_datalist(str(out))
    assert len(items) == 2 and nib.load(items[0]["image"]).shape == (40, 32, 24)
    assert np.array_equal(nib.load(items[0]["image"]).get_fdata(), make_abdominal_ct(5, (40, 32, 24))[0])


@pytest.mark.parametrize("anatomy,task,expected", [
    ("simple", "btcv", {0, 1, 2, 3, 6, 8}), ("simple", "spleen", {0, 1}), ("simple", "liver", {0, 1, 2}),
    ("abdomen", "btcv", set(range(14))), ("abdomen", "spleen", {0, 1}), ("abdomen", "liver", {0, 1, 2}),
])
def test_task_label_maps(tmp_path, anatomy, task, expected):
    root = write_ct_phantoms(str(tmp_path), num_subjects=1, seed=2, task=task, anatomy=anatomy,
                             shape=(64, 56, 40) if anatomy == "simple" else (144, 112, 80))
    labels = set(np.unique(nib.load(load_datalist(root)[0]["label"]).get_fdata()).astype(int))
    assert labels == expected
    assert json.load(open(os.path.join(root, "dataset.json")))["labels"]["1"] == {"btcv": "spleen", "spleen": "spleen", "liver": "liver"}[task]


def test_brain_phantom_and_brats_layout(tmp_path):
    image, label, _ = make_brain_phantom(1, shape=(64, 64, 48))
    assert image.shape == (4, 64, 64, 48) and set(np.unique(label)) <= set(BRATS_LABELS)
    assert {1, 2, 4} <= set(np.unique(label))
    # the enhancing tumour is brighter on T1Gd than on T1 (1.0 vs 0.6, times channel gains of 0.8..1.2 and
    # contrasts jittered per subject), and
    # the edema is brighter on FLAIR than the head outside the tumour
    enhancing = label == 4
    assert image[1][enhancing].mean() > 1.1 * image[0][enhancing].mean()
    outside = (image[3] > 0) & (label == 0)
    assert image[3][label == 2].mean() > 1.1 * image[3][outside].mean()
    root = write_brain_phantoms(str(tmp_path / "brats"), num_subjects=2, shape=(48, 48, 40))
    os.remove(os.path.join(root, "dataset.json"))  # read the case folders themselves
    items = load_datalist(root)
    assert len(items) == 2 and [os.path.basename(p).split("_")[-1] for p in items[0]["image"]] == [
        "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    os.remove(items[1]["image"][2])
    with pytest.raises(ValueError, match=r"BraTS20_Training_002: has no t2 file"):
        load_datalist(root)


def test_btcv_layout(tmp_path):
    for sub in ("img", "label"):
        os.makedirs(tmp_path / sub)
    affine = np.eye(4)
    for i in (1, 2, 10):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), str(tmp_path / "img" / f"img{i:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), affine), str(tmp_path / "label" / f"label{i:04d}.nii.gz"))
    items = load_datalist(str(tmp_path))
    assert [(os.path.basename(i["image"]), os.path.basename(i["label"])) for i in items] == [
        ("img0001.nii.gz", "label0001.nii.gz"), ("img0002.nii.gz", "label0002.nii.gz"), ("img0010.nii.gz", "label0010.nii.gz")]
    os.remove(tmp_path / "label" / "label0002.nii.gz")
    with pytest.raises(ValueError, match="img0002.nii.gz: has no label in"):
        load_datalist(str(tmp_path))


def test_kfold_and_nested_label_fractions():
    items = [{"image": str(i)} for i in range(10)]
    folds = [kfold_split(items, 5, f, seed=0)[1] for f in range(5)]
    assert sorted(i["image"] for f in folds for i in f) == sorted(i["image"] for i in items)
    train, val = kfold_split(items, 5, 2, seed=0)
    assert len(train) == 8 and not {i["image"] for i in train} & {i["image"] for i in val}
    small, large = label_subset(train, 0.25, seed=0), label_subset(train, 0.5, seed=0)
    assert len(small) == 2 and len(large) == 4 and all(i in large for i in small)
    with pytest.raises(ValueError, match="fold must be"):
        kfold_split(items, 5, 5)
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(items, 0.0)


def test_datalist_json_with_validation_and_schema_errors(tmp_path):
    root = write_ct_phantoms(str(tmp_path / "ct"), num_subjects=3, shape=(32, 32, 32), task="spleen")
    items = load_datalist(root)
    path = write_datalist(str(tmp_path / "lists" / "fold0.json"), items[:2], items[2:])
    assert json.load(open(path))["training"][0]["image"].startswith("../ct/imagesTr/")
    train, val = finetune_split(path, label_fraction=0.5)
    assert len(train) == 1 and [v["image"] for v in val] == [items[2]["image"]]
    train, val = finetune_split(root, num_folds=3, fold=1)
    assert len(train) == 2 and len(val) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"training": [{"label": "x.nii.gz"}]}')
    with pytest.raises(ValueError, match=r"bad.json: is not a valid datalist at training/0: 'image' is a required"):
        load_datalist(str(bad))


@pytest.mark.slow
def test_make_datalist_cli(tmp_path):
    import sys

    from conftest import REPO, run_command

    root = write_brain_phantoms(str(tmp_path / "brats"), num_subjects=5, shape=(24, 24, 24))
    os.remove(os.path.join(root, "dataset.json"))
    output = tmp_path / "lists" / "brats.json"
    proc = run_command(
        [sys.executable, "tools/make_datalist.py", "brats", root, "--output", str(output), "--num_folds", "5",
         "--fold", "1", "--label_fraction", "0.5"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "2 training and 1 validation" in proc.stdout
    train, val = finetune_split(str(output))
    assert len(train) == 2 and len(val) == 1 and len(train[0]["image"]) == 4
    proc = run_command([sys.executable, "tools/make_datalist.py", "msd", str(tmp_path / "nowhere"), "--output", "x.json"], cwd=REPO)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_phantoms_are_generated_once_and_copied(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    first = ensure_ct_phantoms(str(tmp_path / "a"), num_subjects=1, task="spleen")
    (cached,) = (tmp_path / "cache" / "phantoms").iterdir()
    stamp = os.path.getmtime(cached / "imagesTr" / "phantom_000.nii.gz")
    second = ensure_ct_phantoms(str(tmp_path / "b"), num_subjects=1, task="spleen")
    assert os.path.getmtime(cached / "imagesTr" / "phantom_000.nii.gz") == stamp  # not drawn again
    for name in ("imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz", "dataset.json"):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read()
    ensure_ct_phantoms(str(tmp_path / "c"), num_subjects=1, task="liver")  # another task, another entry
    assert len(list((tmp_path / "cache" / "phantoms").iterdir())) == 2


# one "rank": fill each of the shared folders with the cached phantoms, then read every file that the listing names
# (compared with the cache), as a bundle's dataset check does as soon as the call returns; both ranks start each
# folder together, give or take a few milliseconds
_FILL_AND_READ = """
import json, os, random, sys, time
from hybridmim_components.phantoms import ensure_ct_phantoms
rank, meeting, cached, folders = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for i, folder in enumerate(folders):
    open(os.path.join(meeting, f"{i}_{rank}"), "w").close()
    while len([n for n in os.listdir(meeting) if n.startswith(f"{i}_")]) < 2:
        time.sleep(0.0002)
    time.sleep(int(rank) * random.uniform(0, 0.008))  # rank 1 arrives while rank 0 copies (a copy takes ~10 ms)
    ensure_ct_phantoms(folder, num_subjects=3, task="spleen")
    for item in json.load(open(os.path.join(folder, "dataset.json")))["training"]:
        for key in ("image", "label"):
            if open(os.path.join(folder, item[key]), "rb").read() != open(os.path.join(cached, item[key]), "rb").read():
                sys.exit(f"{folder}: {item[key]} is not the whole file")
"""


def test_two_ranks_filling_one_bundle_root_never_read_a_partial_phantom(tmp_path, monkeypatch):
    """The ranks of a DDP run on a fresh bundle root copy the embedded phantoms into one folder at once; neither may
    read a file that the other is still writing (seen in CI: the two-process GPU-check run failed in its dataset
    check). Twenty fresh folders, two processes that start each one together."""
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ensure_ct_phantoms(str(tmp_path / "warm"), num_subjects=3, task="spleen")  # only the copy races, not the drawing
    (cached,) = (tmp_path / "cache" / "phantoms").iterdir()
    folders = [str(tmp_path / f"root_{i}" / "phantoms") for i in range(20)]
    (tmp_path / "meeting").mkdir()
    ranks = [subprocess.Popen([sys.executable, "-c", _FILL_AND_READ, str(rank), str(tmp_path / "meeting"), str(cached),
                               *folders],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    deadline = time.monotonic() + 600
    while None in [rank.poll() for rank in ranks] and time.monotonic() < deadline:
        if any(rank.returncode for rank in ranks):  # one failed: the other would wait for it at the next folder
            break
        time.sleep(0.2)
    for rank in ranks:
        rank.kill()
    errors = [rank.communicate()[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert not [name for name in os.listdir(tmp_path / "root_0") if name != "phantoms"]  # no staging folder left
