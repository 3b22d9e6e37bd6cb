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


def _lesion_conspicuity(image: np.ndarray, label: np.ndarray) -> tuple[float, int]:
    """The fraction of lesion voxels in lesions darker than the liver by more than the liver's own spread (texture
    and noise, one standard deviation), and the size of the largest lesion, in voxels."""
    liver = ndimage.binary_erosion(label == 6, iterations=1)
    spread, level = float(image[liver].std()), float(np.median(image[liver]))
    components, count = ndimage.label(label == 14)
    sizes = ndimage.sum(np.ones_like(label), components, range(1, count + 1))
    means = ndimage.mean(image, components, range(1, count + 1))
    visible = sum(size for size, mean in zip(sizes, means) if mean < level - spread)
    return float(visible / max(sizes.sum(), 1)), int(max(sizes, default=0))


def test_tumour_lesions_are_there_to_be_found(subjects):
    """MSD Liver's phantoms draw tumours that a segmentation can learn: in every subject, at least 90 % of the
    lesion voxels lie in lesions darker than the liver by more than its spread, and the largest lesion holds 500
    voxels or more (over 60 at the demo's 3 x 3 x 4 mm). Control: the incidental lesions of the same subjects fail
    it (faint or a few voxels), which is why the liver demo's tumour Dice was 0.00 with them."""
    incidental = [_lesion_conspicuity(image, label) for image, label, _, _ in subjects.values()]
    assert any(visible < 0.9 or largest < 500 for visible, largest in incidental), incidental
    for seed in SEEDS:
        image, label, _, _ = make_abdominal_ct(seed, lesions="tumour")
        visible, largest = _lesion_conspicuity(image, label)
        assert visible >= 0.9 and largest >= 500, (seed, visible, largest)
        # the same subject: the kind of lesion changes the liver and its lesions, nothing else
        other = subjects[seed][1]
        outside = ~np.isin(label, (6, 14)) & ~np.isin(other, (6, 14))
        assert np.array_equal(label[outside], other[outside]), seed


def test_an_unknown_kind_of_lesion_is_refused():
    with pytest.raises(ValueError, match="unknown kind of liver lesions 'cyst'.*incidental"):
        make_abdominal_ct(0, (32, 32, 16), lesions="cyst")
