"""The paper's comparison as one table: methods × tasks, Dice and HD95, every cell a real bundle run.

    python tools/compare_methods.py --recipe docs/comparison/demo.json --output_dir runs/compare   # phantoms
    python tools/compare_methods.py --recipe docs/comparison/paper_table1_btcv.json --output_dir runs/table1 \\
        --corpus /data/unlabelled_ct --data "{BTCV: /data/BTCV}"                                 # your data

A recipe (a JSON file, ``docs/comparison/*.json``) names:

- ``tasks``: ``{name: {"bundle": <fine-tuning bundle>, "config_files": [paths relative to its configs/],
  "overrides": {...}, "folds": [0, ...]}}``;
- ``rows``: ``{name: {"pretrain": {"bundle": <pre-training bundle>, "config_files": [...], "overrides": {...},
  "corpus": "generic" or "task"}, "overrides": {...}, "paper": {task: {"dice": ..., "hd95": ...}}}}``. A row
  without ``pretrain`` trains from scratch (its ``overrides`` choose the network, e.g. ``"network_def":
  "@segresnet_def"``). A pre-trained row fine-tunes the network its weights were saved for: the
  ``plan.json`` beside them names the class and widths (``finetune_network``), and the row's ``overrides`` come
  after. ``"corpus": "generic"`` pre-trains once on ``--corpus`` for every task (the paper's "generic" mode);
  ``"task"`` pre-trains on each task's own images (the paper's starred rows);
- optionally ``pretraining_overrides`` and ``finetune_overrides`` for every row, and ``corpus_phantoms``: the size
  of the phantom corpus written when ``--corpus`` is not given (subjects disjoint from the tasks' phantoms).

Each stage is resumable: a finished run leaves ``result.json`` and is skipped by a rerun; a stopped one resumes
from its last checkpoint. Fine-tuning runs every fold of ``folds`` and scores each with the bundle's own
``evaluate.json`` (original space, Dice and HD95 per class and case); the table gives the mean over folds of the
mean over cases, beside the paper's number where the recipe gives one. ``results.md`` and ``results.json`` are
rewritten after every run; ``--report_only True`` runs nothing and lists what is missing.
"""

from __future__ import annotations

import json
import math
import os
import time

import fire
import numpy as np

from monai.bundle import ConfigWorkflow

from hybridmim_components.phantoms import write_ct_phantoms
# the tool beside this one: the same phantom subjects, folder names and resume rule
from label_efficiency import PHANTOM_SEEDS, folder_name, resumable, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_SEED = PHANTOM_SEEDS["corpus"]  # the tasks' embedded phantoms are subjects 0-11: the corpus is of others
# the fine-tuning bundles' network for each class a pre-training saves, and their ids of its widths
NETWORKS = {
    "BasicUNet": ("@basicunet_def", {"features": "features"}),
    "SwinUNETR": ("@swinunetr_def", {"feature_size": "swin_feature_size"}),
    "ViT": ("@unetr_def", {"hidden_size": "unetr_hidden_size", "mlp_dim": "unetr_mlp_dim",
                           "num_heads": "unetr_num_heads"}),
}
RECIPE_KEYS = {"title", "note", "tasks", "rows", "pretraining_overrides", "finetune_overrides", "corpus_phantoms"}
TASK_KEYS = {"bundle", "config_files", "overrides", "folds"}
ROW_KEYS = {"pretrain", "overrides", "paper"}
PRETRAIN_KEYS = {"bundle", "config_files", "overrides", "corpus"}


def read_recipe(recipe: str | dict) -> dict:
    """The recipe, checked up front: every error names the key and says what was expected."""
    where = recipe if isinstance(recipe, str) else "the recipe"
    if isinstance(recipe, str):
        with open(recipe) as f:
            recipe = json.load(f)

    def bundle_configs(name: str, key: str, files) -> None:
        folder = os.path.join(REPO, "bundles", str(name), "configs")
        if not os.path.isfile(os.path.join(folder, "train.json")):
            bundles = sorted(os.listdir(os.path.join(REPO, "bundles")))
            raise ValueError(f"{where}: {key}.bundle {name!r} is not a bundle of this collection; choose among {bundles}.")
        missing = [f for f in files or [] if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ValueError(f"{where}: {key}.config_files {missing} are not in {folder}.")

    if set(recipe) - RECIPE_KEYS:
        raise ValueError(f"{where}: unknown keys {sorted(set(recipe) - RECIPE_KEYS)}; a recipe has {sorted(RECIPE_KEYS)}.")
    for section in ("tasks", "rows"):
        if not isinstance(recipe.get(section), dict) or not recipe[section]:
            raise ValueError(f"{where} needs a non-empty {section!r} object ({{name: settings}}).")
    for name, task in recipe["tasks"].items():
        if set(task) - TASK_KEYS or "bundle" not in task:
            raise ValueError(f"{where}: tasks.{name} needs 'bundle' and may have {sorted(TASK_KEYS - {'bundle'})}; "
                             f"got {sorted(task)}.")
        bundle_configs(task["bundle"], f"tasks.{name}", task.get("config_files"))
    for name, row in recipe["rows"].items():
        if set(row) - ROW_KEYS:
            raise ValueError(f"{where}: rows.{name} may have {sorted(ROW_KEYS)}; got {sorted(row)}.")
        pre = row.get("pretrain")
        if pre is not None:
            if set(pre) - PRETRAIN_KEYS or "bundle" not in pre or pre.get("corpus", "generic") not in ("generic", "task"):
                raise ValueError(f"{where}: rows.{name}.pretrain needs 'bundle', may have 'config_files', 'overrides' "
                                 f"and 'corpus' ('generic' or 'task'); got {pre}.")
            bundle_configs(pre["bundle"], f"rows.{name}.pretrain", pre.get("config_files"))
        clash = [other for other in recipe["rows"] if other != name and folder_name(other) == folder_name(name)]
        if clash:
            raise ValueError(f"{where}: rows {name!r} and {clash[0]!r} would share the folder {folder_name(name)!r}; rename one.")
        unknown = set(row.get("paper", {})) - set(recipe["tasks"])
        if unknown:
            raise ValueError(f"{where}: rows.{name}.paper names tasks {sorted(unknown)} that 'tasks' lacks.")
    return recipe


def _configs(bundle: str, files, last: tuple = ()) -> list[str]:
    folder = os.path.join(REPO, "bundles", bundle, "configs")
    return [os.path.join(folder, f) for f in ("train.json", *(files or []), *last)]


def finetune_root(output_dir: str, row_name: str, task_name: str, fold: int) -> str:
    """Where the fine-tuning of one cell (row, task, fold) runs."""
    return os.path.join(output_dir, "finetune", folder_name(task_name), folder_name(row_name), f"fold_{fold}")


def _run(config_files: list[str], root: str, workflow_type: str | None, **overrides) -> None:
    workflow = ConfigWorkflow(config_file=config_files, workflow_type=workflow_type, bundle_root=root, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def pretrain(root: str, pre: dict, source: dict, common: dict) -> str:
    """Pre-train once into ``root`` (resuming a stopped run); the path of its ``model.pt``."""
    weights = os.path.join(root, "models", "model.pt")
    if os.path.isfile(os.path.join(root, "result.json")) and os.path.isfile(weights):
        return weights  # (a checkout may hold the result without the weights: then it pre-trains again)
    resume = resumable(root)
    print(f"=== pre-training {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    _run(_configs(pre["bundle"], pre.get("config_files")), root, "train", resume=resume,
         **{**common, **pre.get("overrides", {}), **source})
    write_json(os.path.join(root, "result.json"), {"cpu_seconds": time.process_time() - cpu,
                                                   "seconds": time.perf_counter() - start})
    return weights


def finetune_network(weights: str) -> dict:
    """The fine-tuning bundles' settings of the network ``weights`` were saved for, from the ``plan.json`` beside
    them: ``network_def`` and the widths (e.g. ``swin_feature_size`` 12 for the Swin demos' weights)."""
    with open(os.path.join(os.path.dirname(weights), "plan.json")) as f:
        network = json.load(f)["network"]
    if network["class"] not in NETWORKS:
        raise ValueError(f"{weights} holds a {network['class']}; the fine-tuning bundles take {sorted(NETWORKS)}.")
    network_def, widths = NETWORKS[network["class"]]
    return {"network_def": network_def, **{ours: network[theirs] for theirs, ours in widths.items() if theirs in network}}


def finetune(root: str, task: dict, overrides: dict, pretrained: str) -> dict:
    """Fine-tune one fold into ``root`` (resuming a stopped run), then score it with ``evaluate.json``."""
    path = os.path.join(root, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    resume = resumable(root)
    print(f"=== fine-tuning {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    _run(_configs(task["bundle"], task.get("config_files")), root, "train", pretrained=pretrained, resume=resume,
         **overrides)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    # evaluate.json loads the fine-tuned model.pt and the plan.json the training copied beside it
    _run(_configs(task["bundle"], task.get("config_files"), ("evaluate.json",)), root, None, **overrides)
    with open(os.path.join(root, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    result = {"dice": _mean_of_cases(metrics["val_mean_dice"]["cases"]),
              "hd95": _mean_of_cases(metrics["val_hd95"]["cases"]),
              "classes": {name: s["mean"] for name, s in metrics["val_mean_dice"]["summary"].items() if name != "mean"},
              "cases": len(metrics["val_mean_dice"]["cases"]), "seconds": seconds, "cpu_seconds": cpu_seconds,
              "eval_cpu_seconds": time.process_time() - cpu - cpu_seconds}
    write_json(path, result)
    return result


def _mean_of_cases(cases: list[dict]) -> float:
    """The mean over cases of each case's mean over its classes (``NaN`` cases, e.g. HD95 of an empty
    prediction, left out)."""
    values = [c["mean"] for c in cases if not math.isnan(c["mean"])]
    return float(np.mean(values)) if values else float("nan")


def corpus_source(output_dir: str, recipe: dict, corpus: str | None) -> dict:
    """The generic pre-training corpus as pre-training bundle settings: a preprocessed corpus (a folder holding
    ``manifest/``), a folder or datalist of volumes, or, without ``--corpus``, CT phantoms of other subjects."""
    if corpus and os.path.isdir(os.path.join(corpus, "manifest")):
        return {"manifest": corpus}
    if corpus:
        return {"dataset_dir": corpus}
    folder = os.path.join(output_dir, "data", "corpus")
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        write_ct_phantoms(folder, num_subjects=recipe.get("corpus_phantoms", 12), seed=CORPUS_SEED, task="organs")
    return {"dataset_dir": folder}


def cells(recipe: dict):
    """Every (row, task, fold) of the table."""
    for task_name, task in recipe["tasks"].items():
        for row_name in recipe["rows"]:
            for fold in task.get("folds", [0]):
                yield row_name, task_name, fold


def run_cell(output_dir: str, recipe: dict, row_name: str, task_name: str, fold: int, data: dict, corpus: dict) -> dict:
    row, task = recipe["rows"][row_name], recipe["tasks"][task_name]
    # without data the task's embedded phantoms, written once for all of its runs
    task_data = {"dataset_dir": data[task_name]} if task_name in data else \
        {"phantom_dir": os.path.join(output_dir, "data", folder_name(task_name))}
    overrides = {**recipe.get("finetune_overrides", {}), **task.get("overrides", {}), **task_data, "fold": fold}
    pretrained = ""
    if row.get("pretrain"):
        pre = row["pretrain"]
        if pre.get("corpus", "generic") == "task":
            root, source = os.path.join(output_dir, "pretrain", folder_name(row_name), folder_name(task_name)), \
                {"dataset_dir": data.get(task_name) or _phantoms_of(output_dir, task_name, task)}
        else:
            root, source = os.path.join(output_dir, "pretrain", folder_name(row_name)), corpus
        pretrained = pretrain(root, pre, source, recipe.get("pretraining_overrides", {}))
        overrides.update(finetune_network(pretrained))
    overrides.update(row.get("overrides", {}))
    root = finetune_root(output_dir, row_name, task_name, fold)
    return finetune(root, task, overrides, pretrained)


def _phantoms_of(output_dir: str, task_name: str, task: dict) -> str:
    """The task's embedded phantoms (written by the fine-tuning bundle's own ``dataset`` expression)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(task["bundle"], task.get("config_files")))
    parser.update({**task.get("overrides", {}), "phantom_dir": os.path.join(output_dir, "data", folder_name(task_name))})
    return parser.get_parsed_content("dataset")


def summarise(recipe: dict, results: dict) -> dict:
    """``{task: {row: {"dice", "hd95", "folds", "classes"}}}``: means over the finished folds."""
    table: dict = {}
    for (row_name, task_name, _), result in results.items():
        table.setdefault(task_name, {}).setdefault(row_name, []).append(result)
    summary = {}
    for task_name, rows in table.items():
        summary[task_name] = {}
        for row_name, runs in rows.items():
            classes = sorted({c for r in runs for c in r["classes"]})
            summary[task_name][row_name] = {
                "dice": float(np.mean([r["dice"] for r in runs])), "hd95": float(np.nanmean([r["hd95"] for r in runs])),
                "folds": len(runs), "classes": {c: float(np.nanmean([r["classes"].get(c, np.nan) for r in runs]))
                                                for c in classes}}
    return summary


def table(recipe: dict, summary: dict, cost: float) -> str:
    tasks = list(recipe["tasks"])
    lines = [f"# {recipe.get('title', 'Comparison')}", "", "| method | " + " | ".join(tasks) + " |",
             "| --- |" + " --- |" * len(tasks)]
    for row_name, row in recipe["rows"].items():
        out = []
        for task_name in tasks:
            cell = summary.get(task_name, {}).get(row_name)
            ours = f"{cell['dice']:.3f} / {cell['hd95']:.1f} (folds {cell['folds']})" if cell else "–"
            paper = row.get("paper", {}).get(task_name)
            if paper:
                ours += " [paper " + " / ".join(f"{paper[k]}" for k in ("dice", "hd95") if k in paper) + "]"
            out.append(ours)
        lines.append(f"| {row_name} | " + " | ".join(out) + " |")
    lines += ["", "Mean Dice over the foreground classes / mean HD95 in mm, each the mean over cases of the bundle's "
              "`evaluate.json` (original image space), then over the folds that have run; the paper's Dice in % and "
              "HD95 in brackets.", ""]
    for task_name in tasks:
        rows = summary.get(task_name, {})
        if not rows:
            continue
        classes = sorted({c for r in rows.values() for c in r["classes"]})
        lines += [f"## {task_name}: Dice per class", "", "| method | " + " | ".join(classes) + " |",
                  "| --- |" + " --- |" * len(classes)]
        lines += [f"| {name} | " + " | ".join(f"{rows[name]['classes'].get(c, float('nan')):.3f}" for c in classes) + " |"
                  for name in recipe["rows"] if name in rows]
        lines.append("")
    lines += [f"CPU-hours of the finished runs (pre-training, fine-tuning and evaluation): {cost / 3600:.2f}.", ""]
    return "\n".join(lines)


def main(recipe: str, output_dir: str = "runs/compare", corpus: str | None = None, data: dict | None = None,
         report_only: bool = False) -> dict:
    """Run the recipe's table (or, with ``report_only``, only report what is finished); return ``results.json``.

    Args:
        recipe: a recipe JSON file (``docs/comparison/``).
        output_dir: where every run, ``results.md`` and ``results.json`` go.
        corpus: the unlabelled volumes of generic pre-training: a folder, a datalist, or a corpus that
            ``tools/preprocess.py`` wrote; without it, CT phantoms of subjects the tasks do not hold.
        data: ``{task name: dataset folder or datalist}`` in the layouts the fine-tuning bundles read; a task
            without one runs on its bundle's embedded phantoms.
    """
    recipe = read_recipe(recipe)
    data = dict(data or {})
    unknown = set(data) - set(recipe["tasks"])
    if unknown:
        raise ValueError(f"--data names tasks {sorted(unknown)}; the recipe's tasks are {list(recipe['tasks'])}.")
    for task_name in recipe["tasks"]:
        if task_name not in data and not report_only:
            print(f"task {task_name}: no --data given, so it runs on its bundle's embedded phantoms", flush=True)
    source = None if report_only else corpus_source(output_dir, recipe, corpus)
    results, missing = {}, []
    for cell in cells(recipe):
        path = os.path.join(finetune_root(output_dir, *cell), "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[cell] = json.load(f)
        elif report_only:
            missing.append(cell)
            continue
        else:
            results[cell] = run_cell(output_dir, recipe, *cell, data, source)
            report(output_dir, recipe, results)  # a table of what is finished, after every run
    content = report(output_dir, recipe, results)
    print(content["markdown"])
    if missing:
        print(f"{len(missing)} runs not done yet:", *(f"{r}, {t}, fold {k}" for r, t, k in missing), sep="\n  ")
    return content


def report(output_dir: str, recipe: dict, results: dict) -> dict:
    cost = sum(r["cpu_seconds"] + r["eval_cpu_seconds"] for r in results.values())
    for root, _, files in os.walk(os.path.join(output_dir, "pretrain")):
        if "result.json" in files:
            with open(os.path.join(root, "result.json")) as f:
                cost += json.load(f)["cpu_seconds"]
    summary = summarise(recipe, results)
    markdown = table(recipe, summary, cost)
    content = {"recipe": recipe, "summary": summary, "runs": {f"{r} | {t} | fold {k}": v for (r, t, k), v in results.items()},
               "cpu_hours": cost / 3600, "markdown": markdown}
    write_json(os.path.join(output_dir, "results.json"), content)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    return content


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
