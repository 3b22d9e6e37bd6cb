"""Embedded data: synthetic abdominal CT phantoms, and datalists from a user's own data.

A phantom is an axial abdominal CT (Hounsfield units, RAS voxel axes: x to the patient's left, y anterior, z
superior) with body outline, subcutaneous fat, a muscle wall, psoas muscles, visceral fat, liver (sometimes
with a lesion), spleen, kidneys, aorta and a vertebra. Every subject is drawn from its own seed: organ sizes,
positions, rotations, intensities, a smooth deformation of the whole anatomy and the noise level all vary.
The phantoms are written in the Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/``,
``dataset.json``) so that the same code reads them and real MSD tasks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from monai.data import load_decathlon_datalist, partition_dataset

__all__ = [
    "CT_PHANTOM_LABELS",
    "make_ct_phantom",
    "write_ct_phantoms",
    "ensure_ct_phantoms",
    "load_datalist",
    "train_val_split",
]

CT_PHANTOM_LABELS = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "right_kidney",
    4: "left_kidney",
    5: "aorta",
    6: "vertebra",
    7: "liver_lesion",
}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _ellipsoid(x, y, z, centre, radii, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of an ellipsoid rotated by ``angle`` (radians) about the z axis."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0


def make_ct_phantom(
    seed: int, shape: Sequence[int] = (144, 112, 80), spacing: Sequence[float] = (1.5, 1.5, 2.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one phantom subject.

    Args:
        seed: the subject; the same seed gives the same volume.
        shape: voxels along (x, y, z).
        spacing: voxel size in mm along (x, y, z).

    Returns:
        ``(image, label, affine)``: int16 HU image and uint8 label of ``shape`` (values of
        ``CT_PHANTOM_LABELS``), and the 4 x 4 voxel-to-RAS affine.
    """
    rng = np.random.default_rng(seed)
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    extent = np.array(shape) * np.array(spacing)  # field of view in mm
    axes = [(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    # a smooth, subject-specific deformation of the whole anatomy
    amp, wave, phase = rng.uniform(2, 8, 3), rng.uniform(0.6, 1.4, 3) * extent.max(), rng.uniform(0, 2 * np.pi, 3)
    x = x + amp[0] * np.sin(2 * np.pi * z / wave[0] + phase[0])
    y = y + amp[1] * np.sin(2 * np.pi * x / wave[1] + phase[1])
    z = z + amp[2] * np.sin(2 * np.pi * y / wave[2] + phase[2])

    u = rng.uniform
    image = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), -1000.0, dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    # body: an elliptic cylinder that widens slightly towards the feet
    ax, ay = u(0.40, 0.46) * extent[0], u(0.36, 0.42) * extent[1]
    taper = 1.0 - u(0.0, 0.1) * z / extent[2]
    ex, ey = (x / (ax * taper)) ** 2, (y / (ay * taper)) ** 2
    body = ex + ey <= 1.0
    fat_depth = u(0.06, 0.14)
    wall = ex + ey <= (1.0 - fat_depth) ** 2
    cavity = ex + ey <= (1.0 - fat_depth - u(0.06, 0.09)) ** 2
    image[body] = u(-120, -80)  # subcutaneous fat
    image[wall] = u(40, 60)  # muscle wall
    image[cavity] = u(-60, -20)  # visceral fat and bowel

    spine_y = -0.62 * ay
    psoas_r = (u(0.07, 0.10) * ax, u(0.10, 0.14) * ay, extent[2])
    for side in (-1, 1):
        image[_ellipsoid(x, y, z, (side * 0.22 * ax, spine_y + 0.05 * ay, 0), psoas_r)] = u(45, 60)

    def organ(index: int, centre, radii, hu: float, angle: float = 0.0) -> np.ndarray:
        inside = _ellipsoid(x, y, z, centre, radii, angle) & cavity
        image[inside], label[inside] = hu, index
        return inside

    jitter = lambda scale: rng.normal(0, scale)  # noqa: E731
    liver_hu = u(50, 70)
    liver = organ(
        1,
        (-0.42 * ax + jitter(5), 0.10 * ay + jitter(5), 0.20 * extent[2] + jitter(6)),
        (u(0.36, 0.46) * ax, u(0.45, 0.60) * ay, u(0.30, 0.42) * extent[2]),
        liver_hu,
        u(-0.3, 0.3),
    )
    if rng.random() < 0.7 and liver.any():
        # a hypodense lesion centred on a random liver voxel
        idx = rng.integers(liver.sum())
        centre = [np.broadcast_to(c, liver.shape)[liver][idx] for c in (x, y, z)]
        lesion = _ellipsoid(x, y, z, centre, [u(5, 14)] * 3) & liver
        image[lesion], label[lesion] = liver_hu - u(25, 50), 7
    organ(
        2,
        (0.50 * ax + jitter(4), -0.25 * ay + jitter(4), 0.15 * extent[2] + jitter(5)),
        (u(0.12, 0.18) * ax, u(0.22, 0.30) * ay, u(0.22, 0.30) * extent[2]),
        u(40, 55),
        u(-0.6, 0.0),
    )
    kidney_hu = u(140, 190)
    for index, side in ((3, -1), (4, 1)):
        organ(
            index,
            (side * 0.36 * ax + jitter(3), -0.38 * ay + jitter(3), -0.12 * extent[2] + jitter(5)),
            (u(0.10, 0.13) * ax, u(0.14, 0.18) * ay, u(0.22, 0.30) * extent[2]),
            kidney_hu + jitter(8),
            side * u(0.2, 0.5),
        )
    aorta_r = u(0.05, 0.07) * ax
    organ(5, (0.08 * ax + jitter(2), spine_y + 0.30 * ay, 0), (aorta_r, aorta_r, extent[2]), u(150, 250))
    vertebra_r = u(0.12, 0.15) * ax
    organ(6, (jitter(2), spine_y, 0), (vertebra_r, 0.85 * vertebra_r, extent[2]), u(350, 600))

    image += rng.normal(0.0, u(8, 20), image.shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    return np.clip(image, -1024, 3071).astype(np.int16), label, affine


def write_ct_phantoms(
    output_dir: str,
    num_subjects: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (144, 112, 80),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
) -> str:
    """Write ``num_subjects`` phantoms (seeds ``seed``, ``seed + 1``, ...) in the MSD layout; return the folder."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be at least 1, got {num_subjects}.")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    training = []
    for i in range(num_subjects):
        image, label, affine = make_ct_phantom(seed + i, shape, spacing)
        name = f"phantom_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), os.path.join(output_dir, "imagesTr", name))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(output_dir, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": "HybridMIM synthetic abdominal CT phantoms",
        "description": f"Synthetic abdominal CT phantoms from hybridmim_components.data (seeds {seed}..{seed + num_subjects - 1}).",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in CT_PHANTOM_LABELS.items()},
        "numTraining": num_subjects,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    # written last: its presence marks a complete dataset
    with open(os.path.join(output_dir, "dataset.json"), "w") as f:
        json.dump(description, f, indent=2)
    return output_dir


def ensure_ct_phantoms(output_dir: str, num_subjects: int = 12, seed: int = 0) -> str:
    """Create the phantom dataset in ``output_dir`` unless its ``dataset.json`` is already there."""
    if not os.path.isfile(os.path.join(output_dir, "dataset.json")):
        print(f"creating {num_subjects} synthetic CT phantoms in {output_dir}", flush=True)
        write_ct_phantoms(output_dir, num_subjects=num_subjects, seed=seed)
    return output_dir


def load_datalist(source: str, key: str = "training") -> list[dict]:
    """Read a list of ``{"image": path, ...}`` items from a user's data.

    Args:
        source: one of
            - an MSD task folder with ``dataset.json`` (its ``key`` list, paths relative to the folder);
            - a datalist JSON file (its ``key`` list, paths relative to the file's folder);
            - a folder of NIfTI volumes (``*.nii``/``*.nii.gz``; images only, for pre-training).
        key: the list to read from a JSON datalist.

    Raises:
        FileNotFoundError / ValueError: naming the path and saying which layouts are accepted.
    """
    accepted = (
        "pass --dataset_dir as an MSD task folder with dataset.json, a datalist JSON file, "
        "or a folder of .nii/.nii.gz volumes"
    )
    if not os.path.exists(source):
        raise FileNotFoundError(f"dataset path {source} does not exist; {accepted}.")
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset.json")):
        source = os.path.join(source, "dataset.json")
    if os.path.isfile(source):
        try:
            with open(source) as f:
                content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e}); {accepted}.") from e
        if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
            raise ValueError(f"{source} has no non-empty list under the key '{key}'.")
        if not all(isinstance(item, (dict, str)) for item in content[key]):
            raise ValueError(f"items of '{key}' in {source} must be paths or dicts with an 'image' key.")
        items = load_decathlon_datalist(source, is_segmentation=True, data_list_key=key)
    else:
        volumes = sorted(
            os.path.join(source, name) for name in os.listdir(source) if name.endswith(NIFTI_SUFFIXES)
        )
        if not volumes:
            raise ValueError(f"no NIfTI volumes (*.nii, *.nii.gz) in {source}; {accepted}.")
        items = [{"image": path} for path in volumes]
    for item in items:
        if "image" not in item:
            raise ValueError(f"an item of {source} has no 'image' key: {item}.")
        missing = [v for k, v in item.items() if k in ("image", "label") and not os.path.exists(v)]
        if missing:
            raise FileNotFoundError(f"{source} lists files that do not exist: {missing}.")
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
