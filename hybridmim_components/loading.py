"""What a volume's loading chain does to it, as the transforms themselves hold it: spacing, orientation and
intensity normalisation, as JSON.

Two records compare it with a run's own chain: the fine-tuning plan (``plan``), which a fine-tuning run checks
against the pre-training run's, and the manifest of a preprocessed corpus (``manifest``, ``preprocess``), which
training checks against the bundle's ``load_and_scale``. Both depend on this module, not on each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import NormalizeIntensityd, Orientationd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd, Spacingd

__all__ = ["describe_preprocessing"]


def describe_preprocessing(transforms: Sequence) -> dict:
    """Spacing, orientation and intensity normalisation as the transforms themselves hold them (an overlay that
    replaces a transform is described as it is, not as the configuration's names say)."""
    described: dict = {}
    for t in transforms:
        if isinstance(t, Spacingd):
            described["spacing"] = [float(v) for v in t.spacing_transform.pixdim]
        elif isinstance(t, Orientationd):
            described["orientation"] = t.ornt_transform.axcodes
        elif isinstance(t, ScaleIntensityRanged):
            s = t.scaler
            described["intensity"] = {"transform": "ScaleIntensityRanged", "window": [s.a_min, s.a_max],
                                      "scale": [s.b_min, s.b_max], "clip": s.clip}
        elif isinstance(t, ScaleIntensityRangePercentilesd):
            s = t.scaler
            described["intensity"] = {"transform": "ScaleIntensityRangePercentilesd", "percentiles": [s.lower, s.upper],
                                      "scale": [s.b_min, s.b_max], "clip": s.clip, "channel_wise": s.channel_wise}
        elif isinstance(t, NormalizeIntensityd):
            n = t.normalizer
            described["intensity"] = {"transform": "NormalizeIntensityd", "nonzero": n.nonzero,
                                      "channel_wise": n.channel_wise}
    return described
