"""What the studies report: Markdown tables, means over cases, the paired bootstrap, and figures of curves.

Every number a study prints comes from the per-case metrics that a bundle's ``evaluate.json`` wrote
(``eval/metrics.json``: ``{"cases": [{"filename", "mean", <class>: dice, ...}], "summary": ...}``).
"""

from __future__ import annotations

import math
import os

import numpy as np


def table_header(first: str, names: list[str]) -> list[str]:
    """The two header lines of a Markdown table whose first column is ``first`` and the others ``names``."""
    return [f"| {first} | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]


def table_row(first, cells: list[str]) -> str:
    return f"| {first} | " + " | ".join(cells) + " |"


def mean_of_cases(cases: list[dict]) -> float:
    """The mean over cases of each case's mean over its classes (``NaN`` cases, e.g. HD95 of an empty
    prediction, left out)."""
    values = [c["mean"] for c in cases if not math.isnan(c["mean"])]
    return float(np.mean(values)) if values else float("nan")


def case_dice(cases: list[dict]) -> dict[str, float]:
    """Each case's mean Dice over the classes it holds, by file name (runs made in another checkout pair too)."""
    return {os.path.basename(case["filename"]): float(case["mean"]) for case in cases}


def per_class(runs, skip=("filename", "mean")) -> dict[str, float]:
    """Mean Dice of each class over the runs (each a list of cases) and their cases, classes absent from a case
    (``NaN``) left out."""
    values: dict[str, list[float]] = {}
    for cases in runs:
        for case in cases:
            for name, value in case.items():
                if name not in skip and not math.isnan(value):
                    values.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in values.items()}


def dice_summary(cases: list[dict], threshold: float = 0.5) -> dict:
    """Mean Dice over ``cases``, each class's mean Dice and how many classes are above ``threshold``: the
    studies' measure of whether a fine-tuning learned its task, not only its largest class."""
    classes = per_class([cases])
    return {"dice": mean_of_cases(cases), "classes": classes,
            "above_half": sum(v > threshold for v in classes.values())}


def paired_difference(pre: dict[str, list[dict]], scratch: dict[str, list[dict]], repeats: int = 2000,
                      seed: int = 0) -> dict:
    """Pre-trained minus scratch Dice, paired by seed and case (``{seed: cases}`` each): the mean and a 95 %
    bootstrap interval that resamples seeds and cases (a crossed design: every seed is scored on every case)."""
    seeds = sorted(set(pre) & set(scratch))
    cases = sorted(set.intersection(*(set(case_dice(pre[s])) & set(case_dice(scratch[s])) for s in seeds)))
    d = np.array([[case_dice(pre[s])[c] - case_dice(scratch[s])[c] for c in cases] for s in seeds])
    rng = np.random.default_rng(seed)
    means = [d[np.ix_(rng.integers(0, len(seeds), len(seeds)), rng.integers(0, len(cases), len(cases)))].mean()
             for _ in range(repeats)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "seeds": len(seeds), "cases": len(cases)}


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 for the highest value, 2 for the next, ..."""
    return {name: rank for rank, name in enumerate(sorted(values, key=values.get, reverse=True), 1)}


def curves_figure(path: str, panels: list[dict]) -> None:
    """Panels of curves side by side, saved as ``path``. Each panel: ``xlabel``, ``ylabel``, optional ``xscale``,
    ``marker`` (default ``"o"``), and ``series``: ``[(label, xs, ys, errors or None)]``; a series with errors is
    drawn with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, panel in zip(np.atleast_1d(axes), panels):
        for label, xs, ys, errors in panel["series"]:
            if errors is None:
                ax.plot(xs, ys, marker=panel.get("marker", "o"), label=label)
            else:
                ax.errorbar(xs, ys, yerr=errors, marker=panel.get("marker", "o"), capsize=3, label=label)
        if panel.get("xscale"):
            ax.set_xscale(panel["xscale"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
