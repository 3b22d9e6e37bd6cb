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

import os

import numpy as np

from hybridmim_studies import reports
from hybridmim_studies.runs import (bundle_configs, check_bundle, cost, finished, folder_name, parsed, read_json,
                                    result_path, resumable, run_workflow, score, write_json)
from hybridmim_studies.study_data import is_preprocessed, phantom_set

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
        recipe = read_json(recipe)
    if set(recipe) - RECIPE_KEYS:
        raise ValueError(f"{where}: unknown keys {sorted(set(recipe) - RECIPE_KEYS)}; a recipe has {sorted(RECIPE_KEYS)}.")
    for section in ("tasks", "rows"):
        if not isinstance(recipe.get(section), dict) or not recipe[section]:
            raise ValueError(f"{where} needs a non-empty {section!r} object ({{name: settings}}).")
    for name, task in recipe["tasks"].items():
        if set(task) - TASK_KEYS or "bundle" not in task:
            raise ValueError(f"{where}: tasks.{name} needs 'bundle' and may have {sorted(TASK_KEYS - {'bundle'})}; "
                             f"got {sorted(task)}.")
        check_bundle(task["bundle"], task.get("config_files"), where, f"tasks.{name}")
    for name, row in recipe["rows"].items():
        if set(row) - ROW_KEYS:
            raise ValueError(f"{where}: rows.{name} may have {sorted(ROW_KEYS)}; got {sorted(row)}.")
        pre = row.get("pretrain")
        if pre is not None:
            if set(pre) - PRETRAIN_KEYS or "bundle" not in pre or pre.get("corpus", "generic") not in ("generic", "task"):
                raise ValueError(f"{where}: rows.{name}.pretrain needs 'bundle', may have 'config_files', 'overrides' "
                                 f"and 'corpus' ('generic' or 'task'); got {pre}.")
            check_bundle(pre["bundle"], pre.get("config_files"), where, f"rows.{name}.pretrain")
        clash = [other for other in recipe["rows"] if other != name and folder_name(other) == folder_name(name)]
        if clash:
            raise ValueError(f"{where}: rows {name!r} and {clash[0]!r} would share the folder {folder_name(name)!r}; rename one.")
        unknown = set(row.get("paper", {})) - set(recipe["tasks"])
        if unknown:
            raise ValueError(f"{where}: rows.{name}.paper names tasks {sorted(unknown)} that 'tasks' lacks.")
    return recipe


def configs_of(part: dict) -> list[str]:
    """The configs of a recipe's task or pre-training: the bundle's ``train.json`` and its ``config_files``."""
    return bundle_configs(part["bundle"], *part.get("config_files", None) or [])


def finetune_root(output_dir: str, row_name: str, task_name: str, fold: int) -> str:
    """Where the fine-tuning of one cell (row, task, fold) runs."""
    return os.path.join(output_dir, "finetune", folder_name(task_name), folder_name(row_name), f"fold_{fold}")


def pretrain(root: str, pre: dict, source: dict, common: dict) -> str:
    """Pre-train once into ``root`` (resuming a stopped run); the path of its ``model.pt``."""
    weights = os.path.join(root, "models", "model.pt")
    if finished(root) is not None and os.path.isfile(weights):
        return weights  # (a checkout may hold the result without the weights: then it pre-trains again)
    resume = resumable(root)
    print(f"=== pre-training {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    with cost() as spent:
        run_workflow(configs_of(pre), root, "train", resume=resume, **{**common, **pre.get("overrides", {}), **source})
    write_json(result_path(root), {"cpu_seconds": spent["cpu_seconds"], "seconds": spent["seconds"]})
    return weights


def finetune_network(weights: str) -> dict:
    """The fine-tuning bundles' settings of the network ``weights`` were saved for, from the ``plan.json`` beside
    them: ``network_def`` and the widths (e.g. ``swin_feature_size`` 12 for the Swin demos' weights)."""
    network = read_json(os.path.join(os.path.dirname(weights), "plan.json"))["network"]
    if network["class"] not in NETWORKS:
        raise ValueError(f"{weights} holds a {network['class']}; the fine-tuning bundles take {sorted(NETWORKS)}.")
    network_def, widths = NETWORKS[network["class"]]
    return {"network_def": network_def, **{ours: network[theirs] for theirs, ours in widths.items() if theirs in network}}


def finetune(root: str, task: dict, overrides: dict, pretrained: str) -> dict:
    """Fine-tune one fold into ``root`` (resuming a stopped run), then score it with ``evaluate.json``."""
    done = finished(root)
    if done is not None:
        return done
    resume = resumable(root)
    print(f"=== fine-tuning {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    with cost() as training:
        run_workflow(configs_of(task), root, "train", pretrained=pretrained, resume=resume, **overrides)
    # evaluate.json loads the fine-tuned model.pt and the plan.json the training copied beside it
    with cost() as scoring:
        metrics = score(task["bundle"], root, task.get("config_files") or (), **overrides)
    result = {"dice": reports.mean_of_cases(metrics["val_mean_dice"]["cases"]),
              "hd95": reports.mean_of_cases(metrics["val_hd95"]["cases"]),
              "classes": {name: s["mean"] for name, s in metrics["val_mean_dice"]["summary"].items() if name != "mean"},
              "cases": len(metrics["val_mean_dice"]["cases"]), "seconds": training["seconds"],
              "cpu_seconds": training["cpu_seconds"], "eval_cpu_seconds": scoring["cpu_seconds"]}
    write_json(result_path(root), result)
    return result


def corpus_source(output_dir: str, recipe: dict, corpus: str | None) -> dict:
    """The generic pre-training corpus as pre-training bundle settings: a preprocessed corpus (a folder holding
    ``manifest/``), a folder or datalist of volumes, or, without ``--corpus``, CT phantoms of other subjects."""
    if is_preprocessed(corpus):
        return {"manifest": corpus}
    if corpus:
        return {"dataset_dir": corpus}
    folder = os.path.join(output_dir, "data", "corpus")
    return {"dataset_dir": phantom_set(folder, "corpus", recipe.get("corpus_phantoms", 12))}


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
    return finetune(finetune_root(output_dir, row_name, task_name, fold), task, overrides, pretrained)


def _phantoms_of(output_dir: str, task_name: str, task: dict) -> str:
    """The task's embedded phantoms (written by the fine-tuning bundle's own ``dataset`` expression)."""
    phantoms = {"phantom_dir": os.path.join(output_dir, "data", folder_name(task_name))}
    return parsed(configs_of(task), {**task.get("overrides", {}), **phantoms}).get_parsed_content("dataset")


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


def table(recipe: dict, summary: dict, spent: float) -> str:
    tasks = list(recipe["tasks"])
    lines = [f"# {recipe.get('title', 'Comparison')}", "", *reports.table_header("method", tasks)]
    for row_name, row in recipe["rows"].items():
        out = []
        for task_name in tasks:
            cell = summary.get(task_name, {}).get(row_name)
            ours = f"{cell['dice']:.3f} / {cell['hd95']:.1f} (folds {cell['folds']})" if cell else "–"
            paper = row.get("paper", {}).get(task_name)
            if paper:
                ours += " [paper " + " / ".join(f"{paper[k]}" for k in ("dice", "hd95") if k in paper) + "]"
            out.append(ours)
        lines.append(reports.table_row(row_name, out))
    lines += ["", "Mean Dice over the foreground classes / mean HD95 in mm, each the mean over cases of the bundle's "
              "`evaluate.json` (original image space), then over the folds that have run; the paper's Dice in % and "
              "HD95 in brackets.", ""]
    for task_name in tasks:
        rows = summary.get(task_name, {})
        if not rows:
            continue
        classes = sorted({c for r in rows.values() for c in r["classes"]})
        lines += [f"## {task_name}: Dice per class", "", *reports.table_header("method", classes)]
        lines += [reports.table_row(name, [f"{rows[name]['classes'].get(c, float('nan')):.3f}" for c in classes])
                  for name in recipe["rows"] if name in rows]
        lines.append("")
    lines += [f"CPU-hours of the finished runs (pre-training, fine-tuning and evaluation): {spent / 3600:.2f}.", ""]
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
        result = finished(finetune_root(output_dir, *cell))
        if result is not None:
            results[cell] = result
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
    spent = sum(r["cpu_seconds"] + r["eval_cpu_seconds"] for r in results.values())
    for root, _, files in os.walk(os.path.join(output_dir, "pretrain")):
        if "result.json" in files:
            spent += read_json(os.path.join(root, "result.json"))["cpu_seconds"]
    summary = summarise(recipe, results)
    markdown = table(recipe, summary, spent)
    content = {"recipe": recipe, "summary": summary, "runs": {f"{r} | {t} | fold {k}": v for (r, t, k), v in results.items()},
               "cpu_hours": spent / 3600, "markdown": markdown}
    write_json(os.path.join(output_dir, "results.json"), content)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    return content
