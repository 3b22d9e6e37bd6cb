"""Learning curves of fine-tuning runs: the validation Dice at fixed points of a run, measured without touching
the run, and what the WACV study reads from them (the epochs to reach a Dice, the speed-up of one start over
another).

The points are measured by an evaluator of the curve's own, built from the bundle's validation loader, inferer,
postprocessing and a fresh copy of its key metric, with none of the bundle's validation handlers: the run's own
validations, and the best model it keeps, are those of a run without a curve. The curve is one more training
handler of the bundle, resolved in the bundle's order, so a run with a curve trains exactly as one without
(``tests/test_curves.py``).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from ignite.engine import Events

from monai.engines import SupervisedEvaluator

CURVE_FILE = "curve.jsonl"


def curve_points(max_epochs: int, count: int = 10) -> list[int]:
    """``count`` epochs spread evenly over a run of ``max_epochs`` (every 10 % by default), the last one included."""
    if max_epochs < 1 or count < 1:
        raise ValueError(f"a curve needs max_epochs >= 1 and count >= 1, got {max_epochs} and {count}.")
    return sorted({max(1, round(max_epochs * k / count)) for k in range(1, count + 1)})


class LearningCurve:
    """A trainer handler that records a fine-tuning run's validation Dice at ``points`` (epochs) into
    ``<root>/curve.jsonl``, with an evaluator of its own (built at the first point, so that building it changes
    nothing of the run) and a fresh ``key_metric``.

    Add it with ``add_learning_curve``: the bundle's own objects are then resolved in the bundle's own order.
    """

    def __init__(self, root: str, max_epochs: int, device, data_loader, network, inferer, postprocessing,
                 key_metric: dict, points: list[int] | None = None) -> None:
        self.points = set(points or curve_points(max_epochs))
        self.path = os.path.join(root, CURVE_FILE)
        self.parts = {"device": device, "val_data_loader": data_loader, "network": network, "inferer": inferer,
                      "postprocessing": postprocessing, "key_val_metric": key_metric}
        self.metric_name = next(iter(key_metric))
        self.evaluator: SupervisedEvaluator | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch in self.points),
                                 self.measure)

    def measure(self, engine) -> None:
        self.evaluator = self.evaluator or SupervisedEvaluator(**self.parts)
        self.evaluator.run()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            dice = float(self.evaluator.state.metrics[self.metric_name])
            f.write(json.dumps({"epoch": engine.state.epoch, "dice": dice}) + "\n")


def add_learning_curve(workflow, points: list[int] | None = None) -> None:
    """Append a ``LearningCurve`` to the ``train#handlers`` of an initialised fine-tuning bundle workflow, before
    it runs. Its arguments are ids the bundle's validation resolves anyway, so that it creates no object out of
    the bundle's order (a data loader built earlier than usual reseeds torch before the network is initialised)."""
    handlers = list(workflow.parser.get("train#handlers"))
    handlers.append({
        "_target_": "hybridmim_studies.curves.LearningCurve", "root": "@bundle_root",
        "max_epochs": "@train#trainer#max_epochs", "device": "@device", "data_loader": "@validate#dataloader",
        "network": "@network", "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
        "key_metric": "%validate#key_metric", "points": points,
    })
    workflow.parser["train#handlers"] = handlers


def read_curve(root: str) -> list[list]:
    """``[[epoch, dice], ...]`` of the run in ``root``, by epoch; a point measured twice (a run resumed from an
    earlier checkpoint) keeps its last value."""
    path = os.path.join(root, CURVE_FILE)
    if not os.path.isfile(path):
        return []
    points = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            points[record["epoch"]] = record["dice"]
    return [[epoch, points[epoch]] for epoch in sorted(points)]


def mean_curve(curves: list[list[list]]) -> list[list]:
    """The mean over runs (e.g. folds) at the epochs every run has measured."""
    if not curves:
        return []
    shared = sorted(set.intersection(*({e for e, _ in c} for c in curves)))
    by_run = [dict(map(tuple, c)) for c in curves]
    return [[e, float(np.mean([run[e] for run in by_run]))] for e in shared]


def epochs_to_reach(curve: list[list], target: float) -> int | None:
    """The first measured epoch whose Dice reaches ``target``; ``None`` if the curve never does."""
    return next((int(e) for e, dice in curve if dice >= target), None)


def speed_up(reference: int | None, other: int | None) -> float | None:
    """How many times fewer epochs ``other`` needs than ``reference`` to reach the same Dice (``None`` when either
    never reaches it)."""
    if reference is None or other is None:
        return None
    return reference / other if other > 0 else math.inf
