"""The dataset check: a table of broken datasets, each problem found with its file named, all of them at once."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from hybridmim_components.dataset_check import DatasetProblemsError, check_dataset, require_valid_dataset

from conftest import REPO

SHAPE, SPACING = (10, 10, 8), (1.0, 1.0, 2.0)


def write(path, data, spacing=SPACING, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    image = nib.Nifti1Image(np.asarray(data), affine)
    ndim = np.asarray(data).ndim
    image.header.set_zooms((tuple(spacing) + image.header.get_zooms()[3:])[:ndim])
    nib.save(image, path)
    return path


def good_case(root, name, seed=0, label_values=(0, 1)):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=SHAPE).astype(np.float32)
    label = rng.choice(label_values, size=SHAPE).astype(np.uint8)
    return (write(os.path.join(root, "imagesTr", f"{name}.nii.gz"), image),
            write(os.path.join(root, "labelsTr", f"{name}.nii.gz"), label))


def msd_folder(root, cases=3):
    for i in range(cases):
        good_case(root, f"case_{i:03d}", seed=i)
    return str(root)


def with_datalist(root, items):
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"training": items}, f)
    return str(root)


# each builder breaks one thing in a good dataset; returns (source, the path the problem must name)
def label_shape_mismatch(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "labelsTr", "case_001.nii.gz"), np.zeros((10, 10, 6), np.uint8))


def label_affine_mismatch(root):
    msd_folder(root)
    shifted = np.diag([*SPACING, 1.0])
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    return str(root), write(os.path.join(root, "labelsTr", "case_001.nii.gz"), np.zeros(SHAPE, np.uint8), affine=shifted)


def label_values_outside(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "labelsTr", "case_002.nii.gz"), np.full(SHAPE, 3, np.uint8))


def image_2d(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "imagesTr", "case_000.nii.gz"), np.zeros((10, 10), np.float32))


def image_4d(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "imagesTr", "case_000.nii.gz"), np.zeros((*SHAPE, 3), np.float32))


def label_4d(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "labelsTr", "case_000.nii.gz"), np.zeros((*SHAPE, 2), np.uint8))


def nan_voxels(root):
    msd_folder(root)
    data = np.zeros(SHAPE, np.float32)
    data[2, 2, 2], data[3, 3, 3] = np.nan, np.inf
    return str(root), write(os.path.join(root, "imagesTr", "case_001.nii.gz"), data)


def zero_spacing(root):
    msd_folder(root)
    # written byte by byte: nibabel mends a zero pixdim when it saves, converters do not
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_qform(np.diag([*SPACING, 1.0]), code=1)
    header["pixdim"][2] = 0.0
    header["vox_offset"] = 352
    path = os.path.join(root, "imagesTr", "case_001.nii.gz")
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + np.zeros(SHAPE, np.float32).tobytes(order="F"))
    return str(root), path


def absurd_spacing(root):
    msd_folder(root)
    # a header whose z spacing is in micrometres: the affine (from the same header) agrees with the label's no more
    return str(root), write(os.path.join(root, "imagesTr", "case_002.nii.gz"), np.zeros(SHAPE, np.float32),
                            spacing=(1.0, 1.0, 2000.0))


def truncated_gzip(root):
    msd_folder(root)
    path = os.path.join(root, "imagesTr", "case_001.nii.gz")
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])
    return str(root), path


def not_a_nifti(root):
    msd_folder(root)
    path = os.path.join(root, "imagesTr", "case_001.nii.gz")
    with gzip.open(path, "wb") as f:
        f.write(b"this is not a NIfTI file" * 20)
    return str(root), path


def empty_folder(root):
    return str(root), str(root)


def empty_images_folder(root):
    os.makedirs(os.path.join(root, "imagesTr"))
    os.makedirs(os.path.join(root, "labelsTr"))
    return str(root), os.path.join(root, "imagesTr")


def empty_brats_case(root):
    case = os.path.join(root, "BraTS20_Training_001")
    for modality in ("t1", "t1ce", "t2", "flair", "seg"):
        write(os.path.join(case, f"BraTS20_Training_001_{modality}.nii.gz"), np.zeros(SHAPE, np.float32))
    os.makedirs(os.path.join(root, "BraTS20_Training_002"))
    return str(root), os.path.join(root, "BraTS20_Training_002")


def image_without_label(root):
    msd_folder(root)
    return str(root), write(os.path.join(root, "imagesTr", "case_009.nii.gz"), np.zeros(SHAPE, np.float32))


def case_listed_twice(root):
    msd_folder(root)
    items = [{"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in (0, 1, 2, 1)]
    return with_datalist(root, items), os.path.join(root, "imagesTr", "case_001.nii.gz")


def duplicate_content(root):
    msd_folder(root)
    image, label = good_case(root, "case_007", seed=1)  # case_001's voxels under another name
    return str(root), image


def datalist_outside_its_folder(root):
    inside = root / "dataset"
    msd_folder(inside)
    outside, _ = good_case(root / "elsewhere", "case_005", seed=5)
    items = [{"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in range(3)]
    items.append({"image": "../elsewhere/imagesTr/case_005.nii.gz", "label": "../elsewhere/labelsTr/case_005.nii.gz"})
    return with_datalist(inside, items), outside


def datalist_missing_file(root):
    msd_folder(root)
    items = [{"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in range(4)]
    return with_datalist(root, items), os.path.join(root, "imagesTr", "case_003.nii.gz")


def wrong_channel_count(root):
    case = os.path.join(root, "BraTS20_Training_001")
    for modality in ("t1", "t1ce", "t2", "flair", "seg"):
        write(os.path.join(case, f"BraTS20_Training_001_{modality}.nii.gz"), np.zeros(SHAPE, np.float32))
    # a case converted to one 4D file of 3 modalities instead of 4
    write(os.path.join(root, "four_d", "case.nii.gz"), np.zeros((*SHAPE, 3), np.float32))
    write(os.path.join(root, "four_d", "case_seg.nii.gz"), np.zeros(SHAPE, np.uint8))
    with open(os.path.join(root, "datalist.json"), "w") as f:
        json.dump({"training": [
            {"image": [f"BraTS20_Training_001/BraTS20_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
             "label": "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz"},
            {"image": "four_d/case.nii.gz", "label": "four_d/case_seg.nii.gz"},
        ]}, f)
    return os.path.join(root, "datalist.json"), os.path.join(root, "four_d", "case.nii.gz")


CASES = {
    # builder: (words the problem must contain, number of problems, check arguments); a defect of a case's image
    # and its label (both listed twice, both missing) is one problem per file
    label_shape_mismatch: ("label shape (10, 10, 6)", 1, {}),
    label_affine_mismatch: ("affine other than that of its image", 1, {}),
    label_values_outside: ("label values [3] outside the task's labels [0, 1]", 1, {}),
    image_2d: ("is 2D", 1, {}),
    image_4d: ("is 4D", 1, {}),
    label_4d: ("4D label", 1, {}),
    nan_voxels: ("2 NaN or infinite voxel(s)", 1, {}),
    zero_spacing: ("zero or invalid voxel spacing", 1, {}),
    absurd_spacing: ("implausible voxel spacing", 2, {}),  # and its affine no longer matches the label's
    truncated_gzip: ("cannot be read", 1, {}),
    not_a_nifti: ("cannot be read", 1, {}),
    empty_folder: ("is an empty folder", 1, {}),
    empty_images_folder: ("is empty", 2, {}),  # imagesTr and labelsTr
    empty_brats_case: ("empty case folder", 1, {"labels": [0, 1, 2, 4], "channels": 4}),
    image_without_label: ("has no label", 1, {}),
    case_listed_twice: ("is listed twice", 2, {}),
    duplicate_content: ("has the same voxels as", 1, {}),
    datalist_outside_its_folder: ("outside its folder", 2, {}),
    datalist_missing_file: ("does not exist", 2, {}),
    wrong_channel_count: ("gives 3 image channel(s)", 1, {"labels": [0, 1, 2, 4], "channels": 4}),
}


@pytest.mark.parametrize("build", CASES, ids=[b.__name__ for b in CASES])
def test_each_problem_is_found_with_its_file_and_a_fix(build, tmp_path):
    source, path = build(tmp_path)
    words, count, kwargs = CASES[build]
    problems = check_dataset(source, **{"labels": [0, 1], **kwargs})
    assert len(problems) == count, [str(p) for p in problems]
    problem = problems[0]
    assert os.path.normpath(problem.path) == os.path.normpath(path) and words in problem.problem, str(problem)
    assert len(problem.fix) > 15  # says what to do


def test_a_good_dataset_has_no_problem(tmp_path, tiny_task_phantoms):
    assert check_dataset(msd_folder(tmp_path), labels=[0, 1]) == []
    assert check_dataset(tiny_task_phantoms["brats_tumor_segmentation"], labels=[0, 1, 2, 4], channels=4) == []
    assert check_dataset(tiny_task_phantoms["btcv_multiorgan_segmentation"], labels=range(14)) == []


def test_every_problem_is_reported_at_once(tmp_path):
    """One pass finds all of them: a user fixes the dataset once, not once per error."""
    source, _ = nan_voxels(tmp_path)
    write(os.path.join(tmp_path, "labelsTr", "case_002.nii.gz"), np.full(SHAPE, 5, np.uint8))
    write(os.path.join(tmp_path, "imagesTr", "case_009.nii.gz"), np.zeros(SHAPE, np.float32))
    with pytest.raises(DatasetProblemsError) as raised:
        require_valid_dataset(source, labels=[0, 1])
    assert len(raised.value.problems) == 3
    message = str(raised.value)
    for name in ("imagesTr/case_001.nii.gz", "labelsTr/case_002.nii.gz", "imagesTr/case_009.nii.gz"):
        assert name in message
    assert "tools/check_dataset.py" in message


def test_headers_level_reads_no_voxels(tmp_path):
    """Pre-training checks 10k+ volumes at start: the headers only. Voxel problems are left to the full level."""
    source, _ = nan_voxels(tmp_path)
    assert check_dataset(source, labels=[0, 1], level="headers") == []
    zero_spacing(tmp_path)
    assert ["zero or invalid" in p.problem for p in check_dataset(source, labels=[0, 1], level="headers")] == [True]


@pytest.mark.slow
def test_tool_prints_every_problem_and_fails(tmp_path):
    source, path = label_values_outside(tmp_path)
    tool = [sys.executable, os.path.join(REPO, "tools", "check_dataset.py")]
    bad = subprocess.run(tool + [source, "--bundle", "msd_spleen_segmentation"], capture_output=True, text=True)
    assert bad.returncode == 1 and path in bad.stdout and "outside the task's labels [0, 1]" in bad.stdout, bad
    # BTCV allows 14 labels: the same dataset is fine for it
    good = subprocess.run(tool + [source, "--bundle", "btcv_multiorgan_segmentation"], capture_output=True, text=True)
    assert good.returncode == 0 and "no problem" in good.stdout, good
