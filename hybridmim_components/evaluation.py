"""Evaluation as the field reports it: HD95 in millimetres, and a JSON report next to MONAI's CSVs.

MONAI's ``HausdorffDistance`` handler passes no spacing to its metric, so it measures in voxels of whatever grid
it is given; ``PhysicalHausdorffDistance`` takes each case's spacing from its affine. ``MetricsSaver`` writes the
per-case and summary CSVs; ``write_metrics_json`` adds a JSON report with the class names, so that results read
without knowing which column is which organ.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence

import torch
from ignite.metrics.metric import reinit__is_reduced

from monai.data.utils import affine_to_spacing
from monai.handlers import HausdorffDistance

__all__ = ["PhysicalHausdorffDistance", "write_metrics_json"]


class PhysicalHausdorffDistance(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler, in the units of the images' affines (millimetres for NIfTI).

    Each case is measured with the voxel spacing of its label's affine, so the same handler gives millimetres on
    the resampled grid of validation during training and on the original grid of ``evaluate.json`` (after
    ``Invertd``). The arguments are those of ``monai.handlers.HausdorffDistance``.
    """

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        """``output``: ``[y_pred, y]``, each a list of channel-first one-hot ``MetaTensor`` (C, H, W, D) or a
        batch (B, C, H, W, D) of them; ``y`` must carry its affine."""
        if len(output) != 2:
            raise ValueError(f"output must be [y_pred, y], got {len(output)} items.")
        for y_pred, y in zip(*output):
            affine = getattr(y, "affine", None)
            if affine is None:
                raise TypeError(
                    "PhysicalHausdorffDistance needs labels that carry their affine (MetaTensor, e.g. from "
                    f"LoadImaged); got {type(y).__name__}. Use MONAI's HausdorffDistance for distances in voxels."
                )
            spacing = affine_to_spacing(torch.as_tensor(affine), r=y.ndim - 1).tolist()
            self.metric_fn(y_pred[None], y[None], spacing=spacing)


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_metrics_json(eval_dir: str, class_names: Sequence[str], include_background: bool = False) -> str:
    """Turn the ``<metric>_raw.csv`` and ``<metric>_summary.csv`` files of ``MetricsSaver`` into ``metrics.json``.

    Args:
        eval_dir: the ``save_dir`` of ``MetricsSaver`` (run with ``metric_details`` and ``summary_ops``).
        class_names: the names of the network's output channels, background first.
        include_background: whether the metrics were computed with the background channel.

    Returns the path of ``metrics.json``: ``{metric: {"summary": {class: {op: value}}, "cases": [{"filename":
    ..., class: value, "mean": value}]}}``, with ``NaN`` for classes absent from a case.
    """
    names = list(class_names if include_background else class_names[1:])
    rename = {f"class{i}": name for i, name in enumerate(names)}
    report = {}
    for raw in sorted(glob.glob(os.path.join(eval_dir, "*_raw.csv"))):
        metric = os.path.basename(raw)[: -len("_raw.csv")]
        cases = [{rename.get(k, k): (v if k == "filename" else float(v)) for k, v in row.items()} for row in _read_csv(raw)]
        summary_file = os.path.join(eval_dir, f"{metric}_summary.csv")
        summary = {}
        if os.path.isfile(summary_file):
            for row in _read_csv(summary_file):
                name = rename.get(row.pop("class"), "mean")
                summary[name] = {op: float(v) for op, v in row.items()}
        report[metric] = {"summary": summary, "cases": cases}
    if not report:
        raise FileNotFoundError(f"no *_raw.csv in {eval_dir}: run MetricsSaver with metric_details first.")
    path = os.path.join(eval_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    return path
