"""hybridmim_studies.curves: the learning curve of a fine-tuning run, measured without touching the run."""

import json
import os

import pytest
import torch
from ignite.engine import Events

from hybridmim_studies import curves
from hybridmim_studies.runs import bundle_configs, run_workflow

BUNDLE = "msd_spleen_segmentation"
TINY = {"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32], "num_workers": 0, "max_epochs": 3,
        "val_interval": 3, "num_folds": 2, "seed": 3}


def test_curve_points_spread_over_the_run_and_end_at_its_last_epoch():
    assert curves.curve_points(30) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert curves.curve_points(4) == [1, 2, 3, 4] and curves.curve_points(1) == [1]
    with pytest.raises(ValueError, match="max_epochs >= 1"):
        curves.curve_points(0)


def test_epochs_to_a_target_and_the_speed_up():
    scratch = [[10, 0.2], [20, 0.56], [30, 0.6]]
    faster = [[10, 0.55], [20, 0.6], [30, 0.62]]
    target = 0.9 * scratch[-1][1]
    assert curves.epochs_to_reach(scratch, target) == 20 and curves.epochs_to_reach(faster, target) == 10
    assert curves.speed_up(20, 10) == 2.0 and curves.speed_up(20, None) is None
    assert curves.mean_curve([scratch, faster]) == [[10, pytest.approx(0.375)], [20, pytest.approx(0.58)], [30, pytest.approx(0.61)]]
    assert curves.mean_curve([scratch, faster[:2]]) == [[10, pytest.approx(0.375)], [20, pytest.approx(0.58)]]  # shared epochs


def _fine_tune(root: str, data: str, curve: bool, **overrides) -> dict:
    run_workflow(bundle_configs(BUNDLE), root, "train", before_run=curves.add_learning_curve if curve else None,
                 dataset_dir=data, **{**TINY, **overrides})
    return torch.load(os.path.join(root, "models", "checkpoint_epoch=3.pt"), weights_only=False)["model"]


@pytest.mark.slow
def test_a_run_with_a_curve_trains_exactly_as_one_without(tiny_task_phantoms, tmp_path):
    data = tiny_task_phantoms[BUNDLE]
    plain = _fine_tune(str(tmp_path / "plain"), data, curve=False)
    measured = _fine_tune(str(tmp_path / "curve"), data, curve=True)
    assert [e for e, _ in curves.read_curve(str(tmp_path / "curve"))] == [1, 2, 3]
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    # the control: the weights do depend on the run's random stream, so the equality above says something
    other = _fine_tune(str(tmp_path / "other"), data, curve=True, seed=4)
    assert not all(torch.equal(plain[k], other[k]) for k in plain)


@pytest.mark.slow
def test_the_curve_measures_what_the_bundle_validates(tiny_task_phantoms, tmp_path):
    """At an epoch where the bundle validates too, the curve's Dice is the bundle's own validation Dice."""
    root = str(tmp_path / "run")
    found = {}

    def attach(workflow):
        curves.add_learning_curve(workflow)
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: found.update(dice=e.state.metrics["val_mean_dice"]))

    run_workflow(bundle_configs(BUNDLE), root, "train", before_run=attach, dataset_dir=tiny_task_phantoms[BUNDLE], **TINY)
    assert curves.read_curve(root)[-1] == [3, pytest.approx(found["dice"])]
    with open(os.path.join(root, curves.CURVE_FILE)) as f:
        assert len([json.loads(line) for line in f]) == 3
