"""A realistic abdominal CT phantom: one in which segmentation needs context, not a threshold.

The first phantoms (``phantoms.make_ct_phantom``) drew uniform ellipsoids with HU values far apart, so that a
network segments them from intensity alone and no pre-training can matter. Here, for each subject (its own seed):

- the contrast phase is non-contrast or portal-venous, and every tissue's mean HU is drawn from its literature
  range for that phase (``HU_RANGES``). The ranges overlap (liver, spleen, pancreas, bowel wall, kidney in the
  non-contrast phase; liver and spleen in the portal-venous phase), so a threshold cannot tell the organs apart;
- every organ is an ellipsoid or a tube under its own smooth random deformation, placed so that neighbours touch
  (liver and right kidney, liver and gallbladder, spleen and stomach, pancreas and splenic vein);
- the liver and spleen hold branching vessels; the liver 0 to 3 lesions of one of two kinds (``LESIONS``):
  incidental ones, 3 to 9 mm in radius with a contrast from -70 to +25 HU (hypodense metastases to faintly
  hyperdense lesions, many below the texture and noise), or, for the MSD Liver task, tumours as its portal-venous
  scans show them, 8 to 17 mm in radius and 30 to 70 HU darker than the liver;
- stomach and bowel loops hold air (in front, the patient lying supine) and fluid; ribs, vertebrae with discs,
  and psoas muscles surround the organs;
- tissue texture is spatially correlated, the slice profile blurs across slices (partial volume; slices thicker
  than their spacing), and noise is correlated in-plane at CT-like levels (10 to 25 HU).

Labels follow BTCV's numbering (1 to 13) with 14 liver lesion, 15 bone and 16 bowel; ``phantoms.CT_TASKS`` maps
them to each task. Deterministic by seed; a 144 x 112 x 80 subject takes about a second.

HU ranges are those commonly tabulated for adult abdominal CT: unenhanced liver 50 to 65 HU and spleen about 10
HU lower (Kodama et al., AJR 2007;188:1307-1312); portal-venous liver 90 to 120 HU and spleen 100 to 130 HU;
nephrographic renal parenchyma 140 to 190 HU; unenhanced pancreas 35 to 50 HU; bile 0 to 20 HU; fat -120 to -80
HU; vertebral cancellous bone 150 to 300 HU and cortical bone 700+ HU (tables in Radiopaedia, "Hounsfield unit",
and in standard radiology texts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["BTCV_LABELS", "ABDOMEN_LABELS", "HU_RANGES", "PHASES", "LESIONS", "make_abdominal_ct"]

# the 13 organs of BTCV (Beyond the Cranial Vault), with its label values: the one definition of them
BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_veins",
    11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
}
# the phantom draws BTCV's organs with BTCV's values, and three structures more
ABDOMEN_LABELS = {**BTCV_LABELS, 14: "liver_lesion", 15: "bone", 16: "bowel"}
PHASES = ("non_contrast", "portal_venous")
# mean HU of each tissue: (non-contrast range, portal-venous range)
HU_RANGES = {
    "fat": ((-120, -80), (-120, -80)),
    "muscle": ((40, 60), (50, 70)),
    "liver": ((50, 65), (90, 120)),
    "spleen": ((40, 55), (100, 130)),
    "kidney": ((30, 45), (140, 190)),
    "pancreas": ((35, 50), (80, 110)),
    "gallbladder": ((0, 20), (0, 20)),
    "adrenal": ((10, 30), (40, 70)),
    "gut_wall": ((35, 50), (70, 100)),
    "fluid": ((0, 20), (0, 20)),
    "aorta": ((35, 50), (150, 200)),
    "vena_cava": ((35, 50), (100, 140)),
    "portal_vein": ((35, 50), (140, 180)),
    "cancellous_bone": ((150, 300), (150, 300)),
    "cortical_bone": ((700, 1100), (700, 1100)),
    "disc": ((70, 100), (70, 100)),
}
# liver lesions: radius as a fraction of the cavity's half-width, and contrast to the liver (HU). Both kinds take
# the same random draws, so a subject's anatomy outside its lesions does not depend on the kind. Incidental lesions
# are mostly a few voxels at 3 x 3 x 4 mm and many have less contrast than the liver's texture and noise (measured:
# 3 of the 19 lesions of the 12 MSD Liver phantoms both exceed 50 voxels there and are 25 HU darker), which no
# training can learn; the tumours are what a liver tumour segmentation is asked to find.
LESIONS = {
    "incidental": {"radius": (0.04, 0.12), "contrast": (-70.0, 25.0)},
    "tumour": {"radius": (0.10, 0.22), "contrast": (-70.0, -30.0)},
}
# texture (standard deviation of the correlated tissue pattern, HU)
TEXTURE = {"fat": 12.0, "muscle": 6.0, "liver": 6.0, "spleen": 5.0, "kidney": 8.0, "pancreas": 10.0,
           "gut_wall": 6.0, "fluid": 3.0, "cancellous_bone": 40.0, "cortical_bone": 60.0}


class _Canvas:
    """The voxel grid in mm (RAS: x to the patient's left, y anterior, z superior) and the painted maps."""

    def __init__(self, shape, spacing, rng: np.random.Generator) -> None:
        self.shape, self.spacing, self.rng = shape, np.asarray(spacing, float), rng
        self.axes = [((np.arange(n) - (n - 1) / 2) * sp).astype(np.float32) for n, sp in zip(shape, spacing)]
        self.x, self.y, self.z = np.meshgrid(*self.axes, indexing="ij", sparse=True)
        self.mean = np.full(shape, -1000.0, np.float32)  # HU before texture, blur and noise
        self.texture = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, np.uint8)

    def paint(self, inside: np.ndarray, hu: float, label: int | None = None, texture: float = 0.0) -> np.ndarray:
        self.mean[inside], self.texture[inside] = hu, texture
        if label is not None:
            self.label[inside] = label
        return inside

    def box(self, low, high) -> tuple[slice, ...]:
        """Voxel slices covering the mm box [low, high]."""
        out = []
        for axis, lo, hi in zip(self.axes, low, high):
            start, stop = np.searchsorted(axis, lo), np.searchsorted(axis, hi, side="right")
            out.append(slice(int(start), int(max(stop, start))))
        return tuple(out)


def _warp(canvas: _Canvas, scale: float, amplitude: float) -> tuple:
    """Coordinates under a smooth random displacement: two sinusoidal modes of wavelength ~``scale`` mm."""
    rng, (x, y, z) = canvas.rng, (canvas.x, canvas.y, canvas.z)
    coords = []
    for _ in range(3):
        shift = 0.0
        for _ in range(2):
            k = rng.normal(size=3)
            k *= 2 * np.pi / (scale * rng.uniform(0.8, 1.6) * np.linalg.norm(k))
            shift = shift + amplitude * rng.uniform(0.5, 1.0) * np.sin(
                k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * np.pi))
        coords.append(shift)
    return x + coords[0], y + coords[1], z + coords[2]


def _ellipsoid(coords, centre, radii, angle: float = 0.0, tilt: float = 0.0) -> np.ndarray:
    """Normalised radius of an ellipsoid rotated by ``angle`` about z and ``tilt`` about x: inside where <= 1."""
    dx, dy, dz = (c - float(o) for c, o in zip(coords, centre))
    ca, sa, ct, st = np.cos(angle), np.sin(angle), np.cos(tilt), np.sin(tilt)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    v, w = ct * v + st * dz, -st * v + ct * dz
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2


def _organ(canvas: _Canvas, centre, radii, angle=0.0, tilt=0.0, warp: float = 0.12) -> np.ndarray:
    """An ellipsoid under its own smooth deformation (amplitude ``warp`` of its mean radius): a boolean mask."""
    mean_radius = float(np.mean(radii))
    coords = _warp(canvas, 2.5 * mean_radius, warp * mean_radius)
    return _ellipsoid(coords, centre, radii, angle, tilt) <= 1.0


def _curve(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points on the quadratic (3 control points) or cubic (4) Bezier curve through ``points``."""
    t = np.linspace(0, 1, n)[:, None]
    if len(points) == 3:
        return (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t**2 * points[2]
    return ((1 - t) ** 3 * points[0] + 3 * (1 - t) ** 2 * t * points[1] + 3 * (1 - t) * t**2 * points[2]
            + t**3 * points[3])


def _tube(canvas: _Canvas, path: np.ndarray, radius, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean mask of a tube along the polyline ``path`` (K, 3) mm, radius per point (or one), with its
    cross-section stretched by ``scale`` along x, y, z. Computed segment by segment within its bounding box."""
    radius = np.broadcast_to(np.asarray(radius, float), (len(path),))
    scale = np.asarray(scale, float)
    inside = np.zeros(canvas.shape, bool)
    for a, b, ra, rb in zip(path[:-1], path[1:], radius[:-1], radius[1:]):
        reach = max(ra, rb) * scale
        region = canvas.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if any(s.stop <= s.start for s in region):
            continue
        p = [axis[s] for axis, s in zip(canvas.axes, region)]
        px, py, pz = np.meshgrid(*p, indexing="ij", sparse=True)
        d = (b - a) / scale
        length2 = max(float(d @ d), 1e-9)
        rel = [(px - a[0]) / scale[0], (py - a[1]) / scale[1], (pz - a[2]) / scale[2]]
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / length2, 0.0, 1.0)
        dist2 = (rel[0] - t * d[0]) ** 2 + (rel[1] - t * d[1]) ** 2 + (rel[2] - t * d[2]) ** 2
        inside[region] |= dist2 <= (ra + t * (rb - ra)) ** 2
    return inside


def _branches(canvas: _Canvas, root, towards, reach: float, count: int, radius: float) -> list[np.ndarray]:
    """``count`` vessel paths from ``root`` fanning out around the direction of ``towards``, each a gently curved
    polyline of length up to ``reach`` mm, tapering from ``radius``."""
    rng, root = canvas.rng, np.asarray(root, float)
    main = np.asarray(towards, float) - root
    main /= np.linalg.norm(main) + 1e-9
    paths = []
    for _ in range(count):
        direction = main + rng.normal(0, 0.55, 3)
        direction /= np.linalg.norm(direction)
        length = reach * rng.uniform(0.5, 1.0)
        bend = rng.normal(0, 0.25 * length, 3)
        path = _curve(np.stack([root, root + 0.5 * length * direction + bend, root + length * direction]), 8)
        paths.append((path, np.linspace(radius, 0.35 * radius, len(path))))
    return paths


def _until_touching(make, centre, towards, other: np.ndarray, steps: int = 10):
    """Move an organ from ``centre`` towards the point ``towards`` in tenths of the way until it touches the
    ``other`` mask (one voxel apart at most): ``(centre, mask)``. ``make(centre)`` draws the organ's mask."""
    centre, towards = np.asarray(centre, float), np.asarray(towards, float)
    mask = make(centre)
    for _ in range(steps):
        if (ndimage.binary_dilation(mask) & other).any():
            break
        centre = centre + 0.1 * (towards - centre)
        mask = make(centre)
    return centre, mask


def make_abdominal_ct(
    seed: int, shape: Sequence[int] = (144, 112, 80), spacing: Sequence[float] = (1.5, 1.5, 2.0),
    lesions: str = "incidental",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Draw one abdominal CT subject.

    Args:
        seed: the subject; the same seed gives the same volume.
        shape: voxels along (x, y, z); the anatomy scales with the field of view.
        spacing: voxel size in mm along (x, y, z).
        lesions: the kind of liver lesions, a key of ``LESIONS``.

    Returns:
        ``(image, label, affine, info)``: int16 HU image and uint8 label (values of ``ABDOMEN_LABELS``) of
        ``shape``, the 4 x 4 voxel-to-RAS affine, and ``info`` with the subject's ``phase``, the mean HU drawn
        for each tissue (``hu``), the slice thickness and the noise level.
    """
    if lesions not in LESIONS:
        raise ValueError(f"unknown kind of liver lesions '{lesions}'; choose one of {sorted(LESIONS)}.")
    rng = np.random.default_rng(seed)
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    canvas = _Canvas(shape, spacing, rng)
    u = rng.uniform
    phase = PHASES[int(rng.integers(2))]
    hu = {tissue: float(u(*ranges[PHASES.index(phase)])) for tissue, ranges in HU_RANGES.items()}
    extent = np.array(shape) * np.array(spacing)
    ez = extent[2]

    # body wall: skin-line fat, muscle, then the abdominal cavity (visceral fat)
    ax, ay = u(0.42, 0.47) * extent[0], u(0.36, 0.42) * extent[1]
    body_coords = _warp(canvas, 0.8 * ax, 0.03 * ax)
    back = np.where(body_coords[1] < 0, u(0.85, 0.95) * ay, ay)  # the back is flatter than the front
    rho = np.sqrt((body_coords[0] / ax) ** 2 + (body_coords[1] / back) ** 2 + 0 * canvas.z)
    fat, wall = u(0.05, 0.12), u(0.05, 0.08)
    canvas.paint(rho <= 1.0, hu["fat"], texture=TEXTURE["fat"])
    canvas.paint(rho <= 1.0 - fat, hu["muscle"], texture=TEXTURE["muscle"])
    cavity = rho <= 1.0 - fat - wall
    canvas.paint(cavity, hu["fat"] + u(0, 15), texture=TEXTURE["fat"])
    cx, cy = ax * (1.0 - fat - wall), ay * (1.0 - fat - wall)  # the cavity's half-axes, the anatomy's unit

    def within_cavity(mask):
        return mask & cavity

    # bowel loops in the lower and anterior abdomen: walls, then air in front and fluid behind
    for _ in range(int(rng.integers(8, 13))):
        start = np.array([u(-0.6, 0.6) * cx, u(-0.1, 0.6) * cy, u(-0.55, 0.05) * ez])
        steps = rng.normal(0, 1, (int(rng.integers(5, 9)), 3)) * np.array([0.25 * cx, 0.2 * cy, 0.12 * ez])
        path = np.clip(start + np.cumsum(steps, axis=0), [-0.7 * cx, -0.2 * cy, -0.5 * ez],
                       [0.7 * cx, 0.75 * cy, 0.1 * ez])
        path = _curve(np.vstack([start, path])[[0, len(path) // 3, 2 * len(path) // 3, -1]], 12)
        r = u(0.08, 0.14) * cx
        loop = within_cavity(_tube(canvas, path, r))
        canvas.paint(loop, hu["gut_wall"], 16, TEXTURE["gut_wall"])
        lumen = within_cavity(_tube(canvas, path, max(r - 3.0, 0.5 * r)))
        content = hu["fluid"] if rng.random() < 0.5 else u(-150, 40)  # fluid, or faeces mixed with gas
        canvas.paint(lumen, content, 16, TEXTURE["fluid"] * 3)
        air_level = float(np.percentile(path[:, 1], 60)) + u(-0.2, 0.2) * r
        canvas.paint(lumen & (canvas.y > air_level), u(-1000, -850), 16)

    # stomach: a J-shaped tube from the gastro-oesophageal junction through the fundus to the antrum
    gej = np.array([u(0.15, 0.25) * cx, u(-0.15, 0.0) * cy, u(0.30, 0.40) * ez])
    stomach_path = _curve(np.stack([
        gej, [u(0.45, 0.55) * cx, u(-0.2, 0.0) * cy, u(0.30, 0.40) * ez],
        [u(0.35, 0.50) * cx, u(0.30, 0.45) * cy, u(0.0, 0.15) * ez],
        [u(-0.25, -0.1) * cx, u(0.40, 0.55) * cy, u(0.0, 0.12) * ez],
    ]), 16)
    stomach_r = np.linspace(u(0.22, 0.30), u(0.12, 0.16), len(stomach_path)) * cx
    stomach = within_cavity(_tube(canvas, stomach_path, stomach_r))
    canvas.paint(stomach, hu["gut_wall"] + 10, 7, TEXTURE["gut_wall"])
    stomach_lumen = within_cavity(_tube(canvas, stomach_path, np.maximum(stomach_r - 4.0, 0.5 * stomach_r)))
    canvas.paint(stomach_lumen, u(5, 35), 7, TEXTURE["fluid"] * 2)
    canvas.paint(stomach_lumen & (canvas.y > u(0.1, 0.35) * cy), u(-1000, -900), 7)

    # pancreas: from the head by the duodenum to the tail at the splenic hilum, lobulated
    pancreas_path = _curve(np.stack([
        [u(-0.25, -0.1) * cx, u(0.0, 0.1) * cy, u(-0.08, 0.0) * ez],
        [u(0.0, 0.15) * cx, u(-0.05, 0.1) * cy, u(0.0, 0.08) * ez],
        [u(0.45, 0.55) * cx, u(-0.25, -0.15) * cy, u(0.08, 0.15) * ez],
    ]), 12)
    pancreas_r = np.linspace(u(0.12, 0.15), u(0.06, 0.08), len(pancreas_path)) * cx
    lobules = _warp(canvas, 0.15 * cx, 0.02 * cx)
    lobulated = np.sin(lobules[0] / 3.0) * np.sin(lobules[1] / 3.0) > -0.7
    pancreas = within_cavity(_tube(canvas, pancreas_path, pancreas_r)) & lobulated
    canvas.paint(pancreas, hu["pancreas"], 11, TEXTURE["pancreas"])

    # liver: the right lobe and the left lobe across the midline; touches the right kidney from above
    liver_centre = np.array([-u(0.40, 0.50) * cx, u(0.0, 0.1) * cy, u(0.18, 0.28) * ez])
    liver_radii = np.array([u(0.50, 0.60) * cx, u(0.70, 0.80) * cy, u(0.32, 0.40) * ez])
    liver = _organ(canvas, liver_centre, liver_radii, u(-0.2, 0.2), u(-0.1, 0.1))
    liver |= _organ(canvas, [u(0.0, 0.15) * cx, u(0.30, 0.40) * cy, u(0.25, 0.35) * ez],
                    [u(0.30, 0.40) * cx, u(0.25, 0.32) * cy, u(0.15, 0.20) * ez], u(-0.3, 0.3))
    liver = within_cavity(liver)
    canvas.paint(liver, hu["liver"], 6, TEXTURE["liver"])

    # spleen: a crescent behind the stomach, overlapping it so that they touch
    spleen_centre = np.array([u(0.55, 0.65) * cx, -u(0.25, 0.40) * cy, u(0.18, 0.30) * ez])
    spleen_radii = np.array([u(0.15, 0.20) * cx, u(0.35, 0.45) * cy, u(0.22, 0.28) * ez])
    spleen_angle = -u(0.4, 0.8)

    def spleen_at(centre):
        mask = _organ(canvas, centre, spleen_radii, spleen_angle)
        mask &= _ellipsoid((canvas.x, canvas.y, canvas.z), centre + [-0.9 * spleen_radii[0], 0.3 * spleen_radii[1], 0],
                           spleen_radii * [0.7, 0.8, 1.1], spleen_angle) > 1.0
        return within_cavity(mask)

    spleen_centre, spleen = _until_touching(spleen_at, spleen_centre, stomach_path[3], canvas.label == 7)
    canvas.paint(spleen, hu["spleen"], 1, TEXTURE["spleen"])

    # kidneys (the left higher), cortex and medulla, with a notch at the hilum; adrenals above them
    for index, side, adrenal_index in ((2, -1, 12), (3, 1, 13)):
        centre = np.array([side * u(0.42, 0.50) * cx, -u(0.45, 0.55) * cy,
                           (u(-0.28, -0.18) if side < 0 else u(-0.2, -0.1)) * ez])
        radii = np.array([u(0.14, 0.18) * cx, u(0.20, 0.26) * cy, u(0.22, 0.28) * ez])
        angle = side * u(0.3, 0.6)
        coords = _warp(canvas, 2.5 * radii.mean(), 0.08 * radii.mean())
        f = _ellipsoid(coords, centre, radii, angle)
        hilum_centre = centre - np.array([side * 0.8 * radii[0], -0.3 * radii[1], 0])
        notch = _ellipsoid(coords, hilum_centre, radii * [0.45, 0.35, 0.45], angle) <= 1
        kidney = within_cavity((f <= 1.0) & ~notch)
        if side < 0:  # the right kidney lies against the liver's under-surface
            def kidney_at(c, f=f, notch=notch, centre=centre):
                shift = [float(v) for v in np.asarray(c) - centre]
                voxels = [v / sp for v, sp in zip(shift, spacing)]
                moved = ndimage.shift(((f <= 1.0) & ~notch).astype(np.uint8), voxels, order=0) > 0
                return within_cavity(moved)
            centre, kidney = _until_touching(kidney_at, centre, liver_centre, canvas.label == 6)
        canvas.paint(kidney, hu["kidney"], index, TEXTURE["kidney"])
        medulla = kidney & (_ellipsoid(coords, centre, radii, angle) <= 0.45)
        darker = u(10, 30) if phase == "portal_venous" else u(0, 8)
        canvas.paint(medulla, hu["kidney"] - darker, index, TEXTURE["kidney"])
        adrenal_centre = centre + np.array([-side * 0.3 * radii[0], u(0.1, 0.3) * radii[1],
                                            radii[2] + u(0.02, 0.06) * ez])
        for limb in (-1, 1):
            adrenal = _organ(canvas, adrenal_centre + [0, limb * 0.06 * cy, 0], [0.05 * cx, 0.12 * cy, 0.07 * ez],
                             angle=limb * 0.6, warp=0.05)
            canvas.paint(within_cavity(adrenal) & (canvas.label != index), hu["adrenal"], adrenal_index,
                         TEXTURE["muscle"])

    # gallbladder in the fossa under the liver, and lesions in the liver
    fossa = liver_centre + [u(0.15, 0.3) * cx, u(0.30, 0.40) * cy, -u(0.25, 0.35) * liver_radii[2]]
    gallbladder = _organ(canvas, fossa,
                         [u(0.08, 0.11) * cx, u(0.14, 0.18) * cy, u(0.10, 0.14) * ez], u(-0.5, 0.5), warp=0.08)
    canvas.paint(within_cavity(gallbladder), hu["gallbladder"], 4, TEXTURE["fluid"])
    liver_voxels = np.argwhere(canvas.label == 6)
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        if len(liver_voxels) == 0:
            break
        centre = np.array([canvas.axes[i][liver_voxels[rng.integers(len(liver_voxels))][i]] for i in range(3)])
        lesion = _organ(canvas, centre, [u(*LESIONS[lesions]["radius"]) * cx] * 3, warp=0.15) & (canvas.label == 6)
        canvas.paint(lesion, hu["liver"] + u(*LESIONS[lesions]["contrast"]), 14, TEXTURE["liver"] * 1.5)

    # vessels: aorta and vena cava in front of the spine, portal and splenic veins, and branches in liver and spleen
    spine_y, vertebra_r = -u(0.70, 0.78) * cy, u(0.16, 0.20) * cx
    zs = np.linspace(-0.55 * ez, 0.55 * ez, 12)
    wobble = lambda amplitude: amplitude * np.sin(zs / ez * np.pi * u(0.5, 1.5) + u(0, 2 * np.pi))  # noqa: E731
    aorta_r = u(0.09, 0.11) * cx
    aorta_x = u(0.05, 0.12) * cx + wobble(0.03 * cx)
    aorta_path = np.stack([aorta_x, np.full_like(zs, spine_y + vertebra_r + aorta_r * 1.1), zs], 1)
    canvas.paint(within_cavity(_tube(canvas, aorta_path, aorta_r)), hu["aorta"], 8, 3.0)
    ivc_r = u(0.08, 0.11) * cx
    ivc_x = -u(0.12, 0.2) * cx + wobble(0.03 * cx)
    ivc_path = np.stack([ivc_x, np.full_like(zs, spine_y + vertebra_r + ivc_r * 0.8), zs], 1)
    canvas.paint(within_cavity(_tube(canvas, ivc_path, ivc_r, scale=(1.0, 0.7, 1.0))), hu["vena_cava"], 9, 3.0)
    confluence = np.array([u(-0.12, 0.0) * cx, pancreas_path[4, 1] - 0.1 * cy, pancreas_path[4, 2]])
    hilum = liver_centre + [u(0.35, 0.45) * liver_radii[0], u(-0.05, 0.1) * cy, -u(0.1, 0.2) * liver_radii[2]]
    splenic_hilum = spleen_centre + [-0.6 * spleen_radii[0], 0.25 * spleen_radii[1], 0]
    splenic_vein = np.vstack([confluence, pancreas_path[5:] + [0, -0.9 * pancreas_r[-1], 0], splenic_hilum])
    portal = _curve(np.stack([confluence, (confluence + hilum) / 2 + [0, 0.05 * cy, 0.05 * ez], hilum]), 6)
    for path, r in ((portal, u(0.05, 0.07) * cx), (splenic_vein, u(0.035, 0.05) * cx)):
        canvas.paint(within_cavity(_tube(canvas, path, r)), hu["portal_vein"], 10, 3.0)
    # intrahepatic and intrasplenic branches keep the organ's label: BTCV's organ labels include their vessels
    for root, centre, organ_label, count, reach in ((hilum, liver_centre, 6, 8, 0.9 * liver_radii.mean()),
                                                    (splenic_hilum, spleen_centre, 1, 4, 0.8 * spleen_radii.mean())):
        for path, radii in _branches(canvas, root, centre, reach, count, u(0.035, 0.05) * cx):
            vessel = _tube(canvas, path, radii) & (canvas.label == organ_label)
            canvas.paint(vessel, hu["portal_vein"], organ_label, 3.0)
    top = np.array([ivc_path[-1, 0], ivc_path[-1, 1], liver_centre[2] + 0.5 * liver_radii[2]])
    for path, radii in _branches(canvas, top, liver_centre + [0, 0, -0.3 * liver_radii[2]], 0.8 * liver_radii.mean(), 3,
                                 u(0.04, 0.06) * cx):  # hepatic veins, towards the vena cava
        canvas.paint(_tube(canvas, path, radii) & (canvas.label == 6), hu["vena_cava"], 6, 3.0)

    # oesophagus: above the stomach, in front of the aorta, to the junction
    esophagus_path = _curve(np.stack([[0.0, spine_y + vertebra_r + 2.2 * aorta_r, 0.6 * ez],
                                      [0.05 * cx, spine_y + vertebra_r + 2.0 * aorta_r, 0.45 * ez], gej]), 6)
    esophagus = within_cavity(_tube(canvas, esophagus_path, u(0.05, 0.07) * cx))
    canvas.paint(esophagus, hu["gut_wall"], 5, TEXTURE["gut_wall"])

    # spine (vertebral bodies and discs, cortical rim, spinous process), psoas, ribs
    period, disc = u(26, 32), u(5, 8)
    level = np.mod(canvas.z + u(0, period), period) > disc
    body = _ellipsoid((canvas.x, canvas.y, canvas.z), (0, spine_y, 0), (vertebra_r, 0.85 * vertebra_r, 1e6))
    canvas.paint((body <= 1.0) & ~level, hu["disc"], 15, 5.0)
    canvas.paint((body <= 1.0) & level, hu["cortical_bone"], 15, TEXTURE["cortical_bone"])
    canvas.paint((body <= 0.75) & level, hu["cancellous_bone"], 15, TEXTURE["cancellous_bone"])
    behind_body = canvas.y < spine_y - 0.8 * vertebra_r
    spinous = (np.abs(canvas.x) < 0.25 * vertebra_r) & behind_body & (rho <= 1.0 - 0.5 * fat) & level
    canvas.paint(spinous, hu["cortical_bone"] * 0.8, 15, TEXTURE["cortical_bone"])
    for side in (-1, 1):
        psoas_r = (u(0.12, 0.16) * cx * (1.2 - 0.5 * canvas.z / ez), u(0.14, 0.18) * cy)
        psoas = ((canvas.x - side * 1.6 * vertebra_r) / psoas_r[0]) ** 2 + ((canvas.y - spine_y) / psoas_r[1]) ** 2
        psoas = psoas <= 1.0
        canvas.paint(psoas & (canvas.z < 0.2 * ez) & (canvas.label == 0), hu["muscle"], None, TEXTURE["muscle"])
    theta = np.arctan2(body_coords[1] / back, body_coords[0] / ax)  # 0 at the patient's left, pi/2 anterior
    rib_rho, rib_half = 1.0 - fat - 0.5 * wall, max(3.0, 0.04 * cx) / ax
    for z_rib in np.arange(u(-0.05, 0.05) * ez, 0.6 * ez, u(22, 28)):
        height = z_rib - u(0.05, 0.1) * ez * (1 + np.sin(theta))  # ribs run down towards the front
        rib = (np.abs(rho - rib_rho) < rib_half) & (np.abs(canvas.z - height) < u(3.5, 5.0))
        rib &= np.abs(theta - np.pi / 2) > 0.7  # no ribs in front: the costal cartilage is left out
        canvas.paint(rib, hu["cortical_bone"] * u(0.6, 0.9), 15, TEXTURE["cortical_bone"])

    # correlated texture, slice profile, correlated noise
    pattern = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5 / np.asarray(spacing) * 1.0)
    pattern /= pattern.std() + 1e-6
    image = canvas.mean + canvas.texture * pattern
    thickness = float(u(1.0, 2.0) * spacing[2])
    image = ndimage.gaussian_filter(image, (0.5, 0.5, thickness / 2.355 / spacing[2]))
    noise_sd = float(u(10, 25))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 0.7, 0.0))
    image += noise * (noise_sd / (noise.std() + 1e-6))
    image = np.clip(image, -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    info = {"phase": phase, "hu": hu, "slice_thickness_mm": thickness, "noise_sd": noise_sd}
    return image, canvas.label, affine, info
