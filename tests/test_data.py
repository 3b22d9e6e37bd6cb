import json
import os

import nibabel as nib
import numpy as np
import pytest

from hybridmim_components.data import (
    CT_PHANTOM_LABELS,
    ensure_ct_phantoms,
    load_datalist,
    make_ct_phantom,
    train_val_split,
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
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "liver"
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


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datalist(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no NIfTI volumes"):
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


def test_make_phantoms_cli(tmp_path):
    import sys

    from conftest import REPO, run_command

    out = tmp_path / "cli"
    proc = run_command(
        [sys.executable, "tools/make_phantoms.py", "--output_dir", str(out), "--num_subjects", "2",
         "--seed", "5", "--shape", "[40,32,24]"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    items = load_datalist(str(out))
    assert len(items) == 2 and nib.load(items[0]["image"]).shape == (40, 32, 24)
    assert np.array_equal(nib.load(items[0]["image"]).get_fdata(), make_ct_phantom(5, (40, 32, 24))[0])
