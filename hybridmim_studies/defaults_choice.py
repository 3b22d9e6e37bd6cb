"""A fine-tuning bundle's demo defaults, chosen on development phantoms by a criterion written down first.

    python tools/choose_defaults.py --recipe docs/defaults/btcv_demo.json --output_dir runs/defaults_btcv
    python tools/choose_defaults.py ... --only "['lr 3e-3, 600 steps']"   # one candidate (two processes, two cores)

A recipe (JSON) names the ``bundle``, its ``candidates`` (overrides of the bundle's ``train.json``, each on top of
``common``), the number of ``development`` phantoms, the ``criterion`` in words and the numbers it uses:
``max_minutes`` (a candidate whose training takes longer on this machine is not eligible: the demo must finish in
a user's coffee break) and ``tie`` (within ``tie`` of the best mean Dice, more classes above 0.5 win, then the
faster). Each candidate is the bundle's demo as a user runs it (its embedded phantoms, its own split) with the
candidate's overrides, then scored once with the bundle's ``evaluate.json`` on development phantoms of other
subjects (``study_data.PHANTOM_SEEDS``), in the original image space, Dice per class and case. The report
(``results.md``, ``results.json``) lists every candidate per class, its time and the choice. A finished candidate
leaves its ``result.json`` and is not run again.
"""

from __future__ import annotations

import json
import os

from hybridmim_components.data import load_datalist, write_datalist
from hybridmim_studies import reports
from hybridmim_studies.runs import (bundle_configs, check_bundle, cost, finished, folder_name, read_json,
                                    result_path, run_workflow, score, write_json)
from hybridmim_studies.study_data import phantom_set

RECIPE_KEYS = {"bundle", "candidates", "development", "criterion", "max_minutes", "tie", "common"}


def read_recipe(recipe: str | dict) -> dict:
    """The recipe, checked: every key known, every required key present."""
    where = recipe if isinstance(recipe, str) else "the recipe"
    content = read_json(recipe) if isinstance(recipe, str) else dict(recipe)
    unknown = set(content) - RECIPE_KEYS
    missing = RECIPE_KEYS - {"common"} - set(content)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; a recipe has "
                         f"{sorted(RECIPE_KEYS)} ('common' optional).")
    check_bundle(content["bundle"], where=where, key="bundle")
    if not content["candidates"]:
        raise ValueError(f"{where}: 'candidates' is empty; name at least one set of overrides.")
    content.setdefault("common", {})
    return content


def run_candidate(recipe: dict, root: str, overrides: dict, development: str) -> dict:
    """The bundle's demo with ``overrides``, trained in ``root`` (its steps and time kept in ``trained.json``, so
    that a stop while scoring does not train again) and scored on the ``development`` datalist."""
    done = finished(root)
    if done is not None:
        return done
    settings = {**recipe["common"], **overrides}
    trained_path = os.path.join(root, "trained.json")
    if not os.path.isfile(trained_path):
        with cost() as spent:
            workflow = run_workflow(bundle_configs(recipe["bundle"]), root, "train", **settings)
        write_json(trained_path, {"steps": workflow.parser.get_parsed_content("train#trainer").state.iteration,
                                  "train_seconds": spent["seconds"], "train_cpu_seconds": spent["cpu_seconds"],
                                  "threads": os.environ.get("OMP_NUM_THREADS", "default")})
    # the development datalist lists its cases as training and validation alike, which the check refuses
    metrics = score(recipe["bundle"], root, **{**settings, "dataset_dir": development, "dataset_check": "off"})
    result = {"overrides": overrides, **read_json(trained_path), "cases": metrics["val_mean_dice"]["cases"]}
    write_json(result_path(root), result)
    return result


def summarise(result: dict) -> dict:
    """Mean Dice over the development cases, per class, and the classes above 0.5."""
    return {**reports.dice_summary(result["cases"]), "minutes": result["train_seconds"] / 60,
            "steps": result["steps"]}


def choose(recipe: dict, summaries: dict) -> str | None:
    """The recipe's criterion: among candidates trained within ``max_minutes``, the best mean Dice; within ``tie``
    of it, more classes above 0.5, then fewer minutes. ``None`` until every candidate has run."""
    if len(summaries) < len(recipe["candidates"]):
        return None
    eligible = {n: s for n, s in summaries.items() if s["minutes"] <= recipe["max_minutes"]}
    if not eligible:
        return None
    best = max(s["dice"] for s in eligible.values())
    close = [n for n, s in eligible.items() if s["dice"] >= best - recipe["tie"]]
    return min(close, key=lambda n: (-eligible[n]["above_half"], eligible[n]["minutes"]))


def table(recipe: dict, summaries: dict, chosen: str | None) -> str:
    names = list(summaries)
    classes = list(next(iter(summaries.values()))["classes"]) if summaries else []
    lines = [f"# Demo defaults of `{recipe['bundle']}`, chosen on {recipe['development']} development phantoms", "",
             f"Criterion (written before the runs): {recipe['criterion']}", "",
             f"Chosen: **{chosen}**" if chosen else "Chosen: none yet (not every candidate has run).", ""]
    lines += reports.table_header("candidate", ["mean Dice", "classes > 0.5", "steps", "train minutes"])
    for n in names:
        s = summaries[n]
        lines.append(reports.table_row(n, [f"{s['dice']:.3f}", str(s["above_half"]), str(s["steps"]),
                                           f"{s['minutes']:.1f}"]))
    lines += ["", "Dice per class on the development phantoms:", ""]
    lines += reports.table_header("candidate", classes)
    lines += [reports.table_row(n, [f"{summaries[n]['classes'][c]:.2f}" for c in classes]) for n in names]
    return "\n".join(lines) + "\n"


def main(recipe: str | dict, output_dir: str = "runs/defaults", only: list[str] | None = None,
         report_only: bool = False) -> dict:
    """Run the recipe's candidates (``only`` those named, when given), then report every finished one."""
    recipe = read_recipe(recipe)
    unknown = sorted(set(only or []) - set(recipe["candidates"]))
    if unknown:
        raise ValueError(f"--only names {unknown}, which are not candidates of the recipe: {list(recipe['candidates'])}.")
    if not report_only:
        folder = phantom_set(os.path.join(output_dir, "data", "development"), "development", recipe["development"],
                             recipe["bundle"])
        items = load_datalist(folder)
        development = write_datalist(os.path.join(output_dir, "data", "development.json"), items, items)
        for name, overrides in recipe["candidates"].items():
            root = os.path.join(output_dir, folder_name(name))
            if only is None or name in only:
                if finished(root) is None:
                    print(f"=== candidate: {name}", flush=True)
                run_candidate(recipe, root, overrides, development)
    summaries = {name: summarise(done) for name in recipe["candidates"]
                 if (done := finished(os.path.join(output_dir, folder_name(name)))) is not None}
    chosen = choose(recipe, summaries)
    results = {"recipe": recipe, "chosen": chosen, "summaries": summaries}
    write_json(os.path.join(output_dir, "results.json"), results)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table(recipe, summaries, chosen))
    print(table(recipe, summaries, chosen), flush=True)
    return results
