"""Evaluation reports: MONAI's ``MetricsSaver`` writes the per-case and summary CSVs; this adds a JSON report
with the class names, so that results read without knowing which column is which organ."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence

__all__ = ["write_metrics_json"]


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
