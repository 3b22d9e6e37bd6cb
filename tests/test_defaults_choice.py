"""Choosing a fine-tuning bundle's demo defaults on development phantoms (``hybridmim_studies.defaults_choice``)."""

import json
import os

import pytest

from conftest import TINY_UNET

from hybridmim_studies import defaults_choice as dc

RECIPE = {"bundle": "msd_spleen_segmentation", "development": 1, "criterion": "test", "max_minutes": 10, "tie": 0.02}


def summary(dice, above, minutes):
    return {"dice": dice, "above_half": above, "minutes": minutes, "classes": {}, "steps": 1}


def test_the_criterion_best_dice_then_more_classes_then_faster_among_the_eligible():
    recipe = {**RECIPE, "candidates": {"a": {}, "b": {}, "c": {}}}
    assert dc.choose(recipe, {"a": summary(0.5, 3, 1), "b": summary(0.6, 3, 1), "c": summary(0.2, 1, 1)}) == "b"
    # within the tie, more classes above 0.5 win, then fewer minutes
    assert dc.choose(recipe, {"a": summary(0.59, 4, 5), "b": summary(0.6, 3, 1), "c": summary(0.595, 4, 2)}) == "c"
    # a better candidate over the time limit is not eligible (the control: without the limit it wins)
    slow = {"a": summary(0.5, 3, 1), "b": summary(0.9, 9, 11), "c": summary(0.2, 1, 1)}
    assert dc.choose(recipe, slow) == "a" and dc.choose({**recipe, "max_minutes": 20}, slow) == "b"
    assert dc.choose(recipe, {"a": summary(0.5, 3, 1)}) is None  # not every candidate has run


@pytest.mark.parametrize("change,message", [
    ({"candidates": {}}, "'candidates' is empty"),
    ({"candidates": {"a": {}}, "max_minute": 3}, r"unknown keys \['max_minute'\]"),
    ({"candidates": {"a": {}}, "bundle": "no_such_bundle"}, "is not a bundle of this collection"),
])
def test_a_bad_recipe_is_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        dc.read_recipe({**RECIPE, **change})


@pytest.mark.slow
def test_candidates_run_as_the_demo_are_scored_per_class_chosen_and_not_run_again(tiny_task_phantoms, tmp_path,
                                                                                  capsys):
    recipe = {**RECIPE, "tie": 0.0, "common": {"dataset_dir": tiny_task_phantoms["msd_spleen_segmentation"],
                                   "features": json.loads(TINY_UNET), "roi_size": [32, 32, 32], "num_folds": 2,
                                   "num_workers": 0, "max_epochs": 2, "val_interval": 2},
              "candidates": {"frozen": {"learning_rate": 0.0}, "trained": {"learning_rate": 0.01}}}
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--only names \['other'\]"):
        dc.main(recipe, out, only=["other"])
    results = dc.main(recipe, out)
    for name in ("frozen", "trained"):
        done = json.load(open(os.path.join(out, name, "result.json")))
        assert done["steps"] == 4 and len(done["cases"]) == 1  # 2 epochs of 2 volumes, scored on 1 development phantom
        assert set(results["summaries"][name]["classes"]) == {"spleen"}
    best = max(results["summaries"], key=lambda n: results["summaries"][n]["dice"])
    assert results["chosen"] == best and "Chosen: **" in open(os.path.join(out, "results.md")).read()
    capsys.readouterr()
    assert dc.main(recipe, out)["summaries"] == results["summaries"] and "===" not in capsys.readouterr().out
    # a stop while scoring: the training is kept (trained.json) and only the scoring runs again
    os.remove(os.path.join(out, "trained", "result.json"))
    dc.main(recipe, out, only=["trained"])
    assert "Epoch: 1/2" not in capsys.readouterr().out
