"""Embedded data: synthetic CT and MRI phantoms, so that every bundle runs out of the box.

The CT phantoms of the bundles are ``abdomen.make_abdominal_ct`` (``anatomy="abdomen"``): touching organs with
overlapping HU, a contrast phase, vessels, bowel, ribs, texture, partial volume and CT noise. The first, simple
phantom below (``anatomy="simple"``) stays for tests that need its speed and its trivially separable organs.

The simple phantom is an axial abdominal CT (Hounsfield units, RAS voxel axes: x to the patient's left, y anterior, z
superior) with body outline, subcutaneous fat, a muscle wall, psoas muscles, visceral fat, liver (sometimes
with a lesion), spleen, kidneys, aorta and a vertebra. Every subject is drawn from its own seed: organ sizes,
positions, rotations, intensities, a smooth deformation of the whole anatomy and the noise level all vary.
The phantoms are written in the Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/``,
``dataset.json``) so that the same code reads them and real MSD tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from hybridmim_components.abdomen import ABDOMEN_LABELS, BTCV_LABELS, make_abdominal_ct
from hybridmim_components.layout import BRATS_MODALITIES

__all__ = [
    "CT_PHANTOM_LABELS",
    "CT_TASKS",
    "ABDOMEN_TASKS",
    "ANATOMIES",
    "BTCV_LABELS",
    "BRATS_LABELS",
    "BRATS_MODALITIES",
    "make_ct_phantom",
    "write_ct_phantoms",
    "ensure_ct_phantoms",
    "make_brain_phantom",
    "write_brain_phantoms",
    "ensure_brain_phantoms",
    "dataset_or_phantoms",
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


def _ellipsoid(x, y, z, centre, radii, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of an ellipsoid rotated by ``angle`` (radians) about the z axis."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0


def _warped_grid(rng: np.random.Generator, shape, spacing, max_shift: float, warp_z: bool = True):
    """Voxel-centre coordinates in mm, centred on the volume, under a smooth subject-specific deformation.

    Returns ``(x, y, z, extent)``: sparse coordinate arrays and the field of view in mm.
    """
    extent = np.array(shape) * np.array(spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    amp = rng.uniform(max_shift / 4, max_shift, 3)
    wave, phase = rng.uniform(0.6, 1.4, 3) * extent.max(), rng.uniform(0, 2 * np.pi, 3)
    x = x + amp[0] * np.sin(2 * np.pi * z / wave[0] + phase[0])
    y = y + amp[1] * np.sin(2 * np.pi * x / wave[1] + phase[1])
    if warp_z:
        z = z + amp[2] * np.sin(2 * np.pi * y / wave[2] + phase[2])
    return x, y, z, extent


def _centred_affine(shape, spacing) -> np.ndarray:
    """Voxel-to-RAS affine with the origin at the volume's centre."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    return affine


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
    x, y, z, extent = _warped_grid(rng, shape, spacing, max_shift=8.0)

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
    return np.clip(image, -1024, 3071).astype(np.int16), label, _centred_affine(shape, spacing)


# label maps from the phantom's organs to each task's labels (organs not listed become background)
CT_TASKS = {
    "organs": (CT_PHANTOM_LABELS, {i: i for i in CT_PHANTOM_LABELS}),
    "btcv": (BTCV_LABELS, {1: 6, 7: 6, 2: 1, 3: 2, 4: 3, 5: 8}),
    "spleen": ({0: "background", 1: "spleen"}, {2: 1}),
    "liver": ({0: "background", 1: "liver", 2: "cancer"}, {1: 1, 7: 2}),
}
# the same tasks from the realistic abdomen, whose labels already follow BTCV's numbering (lesions are liver)
ABDOMEN_TASKS = {
    "organs": (ABDOMEN_LABELS, {i: i for i in ABDOMEN_LABELS}),
    "btcv": (BTCV_LABELS, {**{i: i for i in range(1, 14)}, 14: 6}),
    "spleen": ({0: "background", 1: "spleen"}, {1: 1}),
    "liver": ({0: "background", 1: "liver", 2: "cancer"}, {6: 1, 14: 2}),
}
# the kind of liver lesions (``abdomen.LESIONS``) of a task's realistic phantoms: MSD Liver is scored on its tumours
ABDOMEN_TASK_LESIONS = {"liver": "tumour"}
ANATOMIES = ("abdomen", "simple")


def _write_dataset_json(output_dir: str, name: str, modality: dict, labels: dict, training: list,
                        generator: str = "") -> None:
    description = {
        "name": name,
        "description": "Synthetic phantoms generated by hybridmim_components.phantoms; not real patients.",
        "generator": generator,
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": modality,
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    # written last: its presence marks a complete dataset
    with open(os.path.join(output_dir, "dataset.json"), "w") as f:
        json.dump(description, f, indent=2)


def write_ct_phantoms(
    output_dir: str,
    num_subjects: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (144, 112, 80),
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    task: str = "organs",
    anatomy: str = "abdomen",
) -> str:
    """Write ``num_subjects`` CT phantoms (seeds ``seed``, ``seed + 1``, ...) in the MSD layout.

    ``task`` picks the labels: ``organs`` (every structure of the phantom), ``btcv`` (the 13 BTCV organs),
    ``spleen`` (MSD Task09) or ``liver`` (MSD Task03: liver and cancer). ``anatomy``: ``abdomen`` (the realistic
    phantom of ``hybridmim_components.abdomen``) or ``simple`` (``make_ct_phantom``; 5 of the BTCV organs).
    Returns the folder.
    """
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be at least 1, got {num_subjects}.")
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown phantom anatomy '{anatomy}'; choose one of {ANATOMIES}.")
    tasks = ABDOMEN_TASKS if anatomy == "abdomen" else CT_TASKS
    if task not in tasks:
        raise ValueError(f"unknown phantom task '{task}'; choose one of {sorted(tasks)}.")
    labels, mapping = tasks[task]
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[list(mapping)] = list(mapping.values())
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    training = []
    for i in range(num_subjects):
        if anatomy == "abdomen":
            image, label, affine, _ = make_abdominal_ct(seed + i, shape, spacing, _lesions(anatomy, task))
        else:
            image, label, affine = make_ct_phantom(seed + i, shape, spacing)
        name = f"phantom_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), os.path.join(output_dir, "imagesTr", name))
        nib.save(nib.Nifti1Image(lookup[label], affine), os.path.join(output_dir, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    _write_dataset_json(output_dir, f"HybridMIM CT phantoms ({task})", {"0": "CT"}, labels, training,
                        _generator(anatomy, task))
    return output_dir


def _lesions(anatomy: str, task: str) -> str:
    """The kind of liver lesions (``abdomen.LESIONS``) that ``task``'s phantoms of ``anatomy`` draw."""
    return ABDOMEN_TASK_LESIONS.get(task, "incidental") if anatomy == "abdomen" else "incidental"


def _generator(anatomy: str, task: str) -> str:
    """What drew a CT phantom dataset, as its ``dataset.json`` records it: the anatomy, and the kind of liver
    lesions where a task draws other than incidental ones (a bundle's phantoms of the old kind are then redrawn)."""
    lesions = _lesions(anatomy, task)
    return anatomy if lesions == "incidental" else f"{anatomy} with {lesions} lesions"


def _cached(output_dir: str, generator: str, key: dict, description: str, write) -> str:
    """Fill ``output_dir`` with a dataset that ``write(folder)`` makes, unless its ``dataset.json`` says it is
    from ``generator`` already (phantoms of an earlier generator are replaced). The dataset comes from a cache
    shared by every bundle and run of this user (``$HYBRIDMIM_CACHE``, default ``~/.cache/hybridmim-bundles``),
    keyed by ``key``: the five pre-training bundles and every fresh bundle root use the same phantoms, generated
    once."""
    listing = os.path.join(output_dir, "dataset.json")
    if os.path.isfile(listing):
        with open(listing) as f:
            if json.load(f).get("generator") == generator:
                return output_dir
    print(f"creating {description} in {output_dir}", flush=True)
    root = os.environ.get("HYBRIDMIM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hybridmim-bundles"))
    cached = os.path.join(root, "phantoms", hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
    if not os.path.isfile(os.path.join(cached, "dataset.json")):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        building = tempfile.mkdtemp(dir=os.path.dirname(cached))
        write(building)
        try:
            os.rename(building, cached)  # atomic: a concurrent writer (another rank) may have won, which is fine
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
    _copy_atomically(cached, output_dir)
    return output_dir


def _copy_atomically(source: str, output_dir: str) -> None:
    """Copy the dataset folder ``source`` into ``output_dir`` so that a reader never sees a partial file and sees
    ``dataset.json`` only once every file it lists is complete. The ranks of a DDP run fill one fresh bundle root
    at once: with a plain copy, one rank read the headers of an image that the other was rewriting."""
    os.makedirs(output_dir, exist_ok=True)
    staged = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(output_dir)), prefix=".staging-")
    try:
        shutil.copytree(source, staged, dirs_exist_ok=True)
        names = [os.path.relpath(os.path.join(folder, name), staged)
                 for folder, _, files in os.walk(staged) for name in files]
        for name in sorted(names, key=lambda n: n == "dataset.json"):  # the listing last
            os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
            os.replace(os.path.join(staged, name), os.path.join(output_dir, name))  # atomic on one file system
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def ensure_ct_phantoms(output_dir: str, num_subjects: int = 12, seed: int = 0, task: str = "organs",
                       anatomy: str = "abdomen") -> str:
    """Create the CT phantom dataset in ``output_dir`` unless it is there already, from the same ``anatomy``
    (phantoms of an earlier generator are replaced). Generated once per user and copied from a cache."""
    # bump "version" whenever a generator draws differently, or users keep the phantoms of the old one
    generator = _generator(anatomy, task)
    key = {"kind": "ct", "num_subjects": num_subjects, "seed": seed, "task": task, "generator": generator,
           "version": 1}
    return _cached(output_dir, generator, key, f"{num_subjects} synthetic CT phantoms ({task}, {anatomy})",
                   lambda folder: write_ct_phantoms(folder, num_subjects, seed=seed, task=task, anatomy=anatomy))


BRATS_LABELS = {0: "background", 1: "necrotic_tumor_core", 2: "peritumoral_edema", 4: "enhancing_tumor"}
# relative intensity of each tissue in (T1, T1Gd, T2, FLAIR)
_BRAIN_TISSUES = {
    "scalp": (0.90, 0.90, 0.50, 0.75),
    "csf": (0.20, 0.20, 0.95, 0.10),
    "grey": (0.55, 0.55, 0.60, 0.60),
    "white": (0.75, 0.75, 0.40, 0.45),
    "edema": (0.50, 0.50, 0.90, 0.80),
    "enhancing": (0.60, 1.00, 0.70, 0.70),
    "necrosis": (0.25, 0.25, 0.90, 0.40),
}


def make_brain_phantom(
    seed: int, shape: Sequence[int] = (96, 96, 80), spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one multi-modal brain MRI phantom with a glioma.

    As in real scans, no single modality separates the tumour's sub-regions from normal tissue: edema is bright on
    T2 like CSF and on FLAIR like (less so) grey matter; the necrotic core is CSF-like on T2; the enhancing rim
    stands out on T1Gd only, against a scalp as bright. Each subject draws its own tissue contrasts (about 6 %
    of the range per tissue and channel), a smooth multiplicative bias field per channel (MR inhomogeneity,
    up to 15 %), correlated texture and noise; the tumour's compartments are deformed, not ellipsoids.

    Returns:
        ``(image, label, affine)``: float32 image (4, *shape) with channels ``BRATS_MODALITIES``, uint8 label
        with the BraTS values of ``BRATS_LABELS`` (1 necrosis, 2 edema, 4 enhancing tumour), 4 x 4 affine.
    """
    rng = np.random.default_rng(seed)
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    x, y, z, extent = _warped_grid(rng, shape, spacing, max_shift=4.0, warp_z=False)
    u = rng.uniform
    head_r = np.array([u(0.40, 0.46), u(0.44, 0.48), u(0.38, 0.44)]) * extent
    tissue = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)  # index into the list
    names = ["background", *_BRAIN_TISSUES]

    def paint(name: str, inside: np.ndarray) -> np.ndarray:
        tissue[inside] = names.index(name)
        return inside

    paint("scalp", _ellipsoid(x, y, z, (0, 0, 0), head_r))
    brain = paint("grey", _ellipsoid(x, y, z, (0, 0, 0), head_r * u(0.84, 0.90)))
    paint("white", _ellipsoid(x, y, z, (0, 0, 0), head_r * u(0.55, 0.65)))
    for side in (-1, 1):
        paint("csf", _ellipsoid(x, y, z, (side * u(4, 7), u(-5, 5), u(0, 6)), (u(3, 5), u(12, 18), u(6, 10))))
    # the tumour: edema around a core, a necrotic centre inside the core; each compartment deformed on its own
    centre = rng.uniform(-0.35, 0.35, 3) * head_r
    edema_r = u(12, 22) * np.array([u(0.8, 1.2), u(0.8, 1.2), u(0.8, 1.2)])
    core_r = edema_r * u(0.45, 0.65)
    label = np.zeros(tissue.shape, dtype=np.uint8)
    for name, radii, value in (("edema", edema_r, 2), ("enhancing", core_r, 4), ("necrosis", core_r * u(0.4, 0.7), 1)):
        wave = 2 * np.pi / (u(0.6, 1.2) * radii.mean())
        amplitude = 0.25 * radii.mean()
        shift = [amplitude * np.sin(wave * (x * a + y * b + z * c) + u(0, 2 * np.pi))
                 for a, b, c in rng.normal(size=(3, 3)) / np.sqrt(3)]
        inside = _ellipsoid(x + shift[0], y + shift[1], z + shift[2], centre + rng.normal(0, 1.5, 3), radii,
                            u(0, np.pi)) & brain
        paint(name, inside)
        label[inside] = value
    lookup = np.array([(0.0, 0.0, 0.0, 0.0), *_BRAIN_TISSUES.values()], dtype=np.float32)  # (tissues, 4)
    lookup[1:] = np.clip(lookup[1:] + rng.normal(0, 0.06, lookup[1:].shape), 0.05, None)
    gains = rng.uniform(0.8, 1.2, 4).astype(np.float32) * 1000.0
    image = np.moveaxis(lookup[tissue], -1, 0) * gains[:, None, None, None]
    head = tissue > 0
    for c in range(4):
        bias = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 12.0 / np.asarray(spacing))
        image[c] *= 1.0 + 0.15 * bias / (np.abs(bias).max() + 1e-6)
        texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
        image[c] += (texture / (texture.std() + 1e-6) * 0.04 * gains[c]) * head
    image += rng.normal(0.0, 30.0, image.shape).astype(np.float32) * head
    return np.clip(image, 0, None).astype(np.float32), label, _centred_affine(shape, spacing)


def write_brain_phantoms(
    output_dir: str,
    num_subjects: int = 8,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 80),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """Write brain phantoms in the BraTS 2020 layout (``BraTS20_Training_NNN/BraTS20_Training_NNN_<mod>.nii.gz``
    for each of ``BRATS_MODALITIES`` and ``seg``), plus a ``dataset.json`` datalist of the cases."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be at least 1, got {num_subjects}.")
    training = []
    for i in range(num_subjects):
        image, label, affine = make_brain_phantom(seed + i, shape, spacing)
        case = f"BraTS20_Training_{i + 1:03d}"
        os.makedirs(os.path.join(output_dir, case), exist_ok=True)
        paths = []
        for channel, modality in zip(image, BRATS_MODALITIES):
            paths.append(f"./{case}/{case}_{modality}.nii.gz")
            nib.save(nib.Nifti1Image(channel, affine), os.path.join(output_dir, paths[-1]))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(output_dir, case, f"{case}_seg.nii.gz"))
        training.append({"image": paths, "label": f"./{case}/{case}_seg.nii.gz"})
    modality = {str(i): m for i, m in enumerate(BRATS_MODALITIES)}
    _write_dataset_json(output_dir, "HybridMIM brain MRI phantoms (BraTS layout)", modality, BRATS_LABELS, training,
                        "brain")
    return output_dir


def ensure_brain_phantoms(output_dir: str, num_subjects: int = 8, seed: int = 0) -> str:
    """Create the brain phantom dataset in ``output_dir`` unless it is there already. Generated once per user and
    copied from a cache."""
    key = {"kind": "brain", "num_subjects": num_subjects, "seed": seed, "version": 2}
    return _cached(output_dir, "brain", key, f"{num_subjects} synthetic brain MRI phantoms",
                   lambda folder: write_brain_phantoms(folder, num_subjects=num_subjects, seed=seed))


def dataset_or_phantoms(dataset_dir: str, phantom_dir: str, kind: str = "ct", **options) -> str:
    """What a bundle trains on: ``dataset_dir`` as the user gave it, or, where it is still the bundle's default
    ``phantom_dir``, the embedded phantoms, created there on first use (``ensure_ct_phantoms`` with ``options``,
    or ``ensure_brain_phantoms`` for ``kind="brain"``)."""
    if dataset_dir != phantom_dir:
        return dataset_dir
    if kind not in ("ct", "brain"):
        raise ValueError(f"kind must be 'ct' or 'brain', got {kind!r}.")
    return (ensure_ct_phantoms if kind == "ct" else ensure_brain_phantoms)(phantom_dir, **options)
