"""The realistic abdominal CT phantom: deterministic, labels that match the image, organs that touch, and
intensities that overlap so that segmenting needs context."""

import numpy as np
import pytest
from scipy import ndimage

from hybridmim_components.abdomen import ABDOMEN_LABELS, HU_RANGES, PHASES, make_abdominal_ct

# its module fixtures are built once: every test of the file in one pytest-xdist process
pytestmark = pytest.mark.xdist_group("test_abdomen")

SEEDS = (0, 1, 2, 3)
# structure label -> the tissue whose documented range its interior's median HU must fall in
TISSUE_OF = {6: "liver", 1: "spleen", 2: "kidney", 3: "kidney", 11: "pancreas", 4: "gallbladder", 8: "aorta"}


@pytest.fixture(scope="module")
def subjects():
    return {seed: make_abdominal_ct(seed) for seed in SEEDS}


def test_deterministic_by_seed():
    first, again, other = make_abdominal_ct(7, (64, 56, 40)), make_abdominal_ct(7, (64, 56, 40)), make_abdominal_ct(8, (64, 56, 40))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[3] == again[3]
    assert not np.array_equal(first[0], other[0])


def test_every_btcv_structure_is_there(subjects):
    for image, label, affine, info in subjects.values():
        present = set(np.unique(label).tolist())
        assert set(range(1, 14)) <= present, sorted(set(range(1, 14)) - present)
        assert image.dtype == np.int16 and set(present) <= set(ABDOMEN_LABELS)


def test_each_organ_has_the_hu_of_its_tissue_in_its_phase(subjects):
    """The median over the organ's interior (two voxels in from its edge) lies in the literature range of its
    tissue for the subject's phase, within 15 HU: the slice profile mixes in the neighbours' values, and the
    kidney's medulla is darker than its cortex."""
    phases = set()
    for image, label, affine, info in subjects.values():
        phases.add(info["phase"])
        for structure, tissue in TISSUE_OF.items():
            interior = ndimage.binary_erosion(label == structure, iterations=2)
            if interior.sum() < 20:
                interior = label == structure
            low, high = HU_RANGES[tissue][PHASES.index(info["phase"])]
            median = float(np.median(image[interior]))
            assert low - 15 <= median <= high + 15, (ABDOMEN_LABELS[structure], info["phase"], median, (low, high))
    assert phases == set(PHASES)  # both phases among four subjects


@pytest.mark.parametrize("a,b", [(6, 2), (6, 4), (1, 7), (11, 10)],
                         ids=["liver-right_kidney", "liver-gallbladder", "spleen-stomach", "pancreas-splenic_vein"])
def test_organs_touch(subjects, a, b):
    """Shape only: the organ, grown by one voxel, meets its neighbour in every subject."""
    for seed, (image, label, affine, info) in subjects.items():
        assert (ndimage.binary_dilation(label == a) & (label == b)).any(), (seed, ABDOMEN_LABELS[a], ABDOMEN_LABELS[b])


def test_no_intensity_window_segments_an_organ(subjects):
    """Of the voxels whose HU lies in an organ's own 10th-90th percentile window, most are other tissue: a
    threshold does not segment spleen, pancreas or kidney, nor (the largest organ) the liver alone; a network must
    use shape and position."""
    for image, label, affine, info in subjects.values():
        for structure, most in ((1, 0.3), (11, 0.3), (2, 0.3), (6, 0.8)):
            low, high = np.percentile(image[label == structure], [10, 90])
            window = (image >= low) & (image <= high)
            precision = (window & (label == structure)).sum() / window.sum()
            assert precision < most, (ABDOMEN_LABELS[structure], info["phase"], precision)
