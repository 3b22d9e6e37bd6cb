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
import os
from collections.abc import Callable

import numpy as np

from hybridmim_components.data import write_datalist
from hybridmim_components.plan import unetr_refusal

from hybridmim_studies import curves, reports
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
RECIPE_KEYS = {"title", "note", "tasks", "rows", "pretraining_overrides", "finetune_overrides", "corpus_phantoms",
               "reference_rows"}
TASK_KEYS = {"bundle", "config_files", "overrides", "folds", "spacing", "window"}
# a task's preprocessing, as the recipe states it, and the bundles' ids that hold it (fine-tuning and pre-training)
PREPROCESSING = {"spacing": "pixdim", "window": "intensity_range"}
CONTRASTIVE_BUNDLE = "contrastive_swinunetr_pretrain"
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
    for role, name in recipe.get("reference_rows", {}).items():
        if role not in ("scratch", "contrastive") or name not in recipe["rows"]:
            raise ValueError(f"{where}: reference_rows.{role} must name a row ('scratch' or 'contrastive' -> a row of "
                             f"'rows'); got {name!r}.")
    table_preprocessing(recipe, where)
    return recipe


def table_preprocessing(recipe: dict, where: str = "the recipe") -> dict[str, dict]:
    """Per task, the bundle settings of its one preprocessing (``{"pixdim": ..., "intensity_range": ...}``): every
    row of the task fine-tunes at them and every pre-training for it runs at them, so that a table compares
    initialisations, not preprocessings. They are the task's ``spacing`` and ``window`` where the recipe states
    them, else its fine-tuning bundle's (with its ``config_files`` and ``overrides``). A recipe whose rows would
    differ (an override of either setting in ``finetune_overrides``, ``pretraining_overrides``, a task's or a
    row's overrides, that is not the task's value) is refused, naming the row and the setting."""
    table = {}
    for task_name, task in recipe["tasks"].items():
        bundle = parsed(configs_of(task), task.get("overrides", {}))
        settings = {}
        for key, bundle_id in PREPROCESSING.items():
            if bundle_id not in bundle:
                if key in task:
                    raise ValueError(f"{where}: tasks.{task_name}.{key}: {task['bundle']} has no {bundle_id} (its "
                                     "intensities are normalised per channel); remove it.")
                continue
            settings[bundle_id] = [float(v) for v in (task[key] if key in task
                                                      else bundle.get_parsed_content(bundle_id))]
        sources = [("finetune_overrides", recipe.get("finetune_overrides", {})),
                   (f"tasks.{task_name}.overrides", task.get("overrides", {})),
                   ("pretraining_overrides", recipe.get("pretraining_overrides", {}))]
        for name, row in recipe["rows"].items():
            sources.append((f"rows.{name}.overrides", row.get("overrides", {})))
            if row.get("pretrain"):
                sources.append((f"rows.{name}.pretrain.overrides", row["pretrain"].get("overrides", {})))
        for source, overrides in sources:
            for key, bundle_id in PREPROCESSING.items():
                value = settings.get(bundle_id)
                if value is not None and bundle_id in overrides and [float(v) for v in overrides[bundle_id]] != value:
                    raise ValueError(
                        f"{where}: {source} sets {bundle_id} {overrides[bundle_id]}, but every row of task "
                        f"{task_name} runs at {key} {value}: one preprocessing per table. Remove the override, or "
                        f"state the task's {key} for every row.")
        table[task_name] = settings
    return table


def reference_rows(recipe: dict) -> dict[str, str | None]:
    """The rows the convergence columns compare with: ``scratch`` (the recipe's ``reference_rows``, else its first
    row without pre-training) and ``contrastive`` (else its first row pre-trained by the naive contrastive bundle)."""
    given = recipe.get("reference_rows", {})
    rows = recipe["rows"]
    scratch = given.get("scratch") or next((n for n, r in rows.items() if not r.get("pretrain")), None)
    contrastive = given.get("contrastive") or next(
        (n for n, r in rows.items() if (r.get("pretrain") or {}).get("bundle") == CONTRASTIVE_BUNDLE), None)
    return {"scratch": scratch, "contrastive": contrastive}


def configs_of(part: dict) -> list[str]:
    """The configs of a recipe's task or pre-training: the bundle's ``train.json`` and its ``config_files``."""
    return bundle_configs(part["bundle"], *part.get("config_files", None) or [])


def finetune_root(output_dir: str, row_name: str, task_name: str, fold: int) -> str:
    """Where the fine-tuning of one cell (row, task, fold) runs."""
    return os.path.join(output_dir, "finetune", folder_name(task_name), folder_name(row_name), f"fold_{fold}")


def pretrain(root: str, pre: dict, source: Callable[[], dict], common: dict) -> str:
    """Pre-train once into ``root`` (resuming a stopped run) on the data settings ``source()`` gives, asked for only
    when the pre-training has to run; the path of its ``model.pt``."""
    weights = os.path.join(root, "models", "model.pt")
    if finished(root) is not None and os.path.isfile(weights):
        return weights  # (a checkout may hold the result without the weights: then it pre-trains again)
    resume = resumable(root)
    print(f"=== pre-training {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    with cost() as spent:
        run_workflow(configs_of(pre), root, "train", resume=resume, **{**common, **pre.get("overrides", {}), **source()})
    write_json(result_path(root), {"cpu_seconds": spent["cpu_seconds"], "seconds": spent["seconds"]})
    return weights


def finetune_network(weights: str) -> dict:
    """The fine-tuning bundles' settings of the network ``weights`` were saved for, from the ``plan.json`` beside
    them: ``network_def`` and the widths (e.g. ``swin_feature_size`` 12 for the Swin demos' weights)."""
    network = read_json(os.path.join(os.path.dirname(weights), "plan.json"))["network"]
    if network["class"] not in NETWORKS:
        raise ValueError(f"{weights} holds a {network['class']}; the fine-tuning bundles take {sorted(NETWORKS)}.")
    network_def, widths = NETWORKS[network["class"]]
    unetr_refusal(network, "UNETR" if network_def == "@unetr_def" else network["class"])
    return {"network_def": network_def, **{ours: network[theirs] for theirs, ours in widths.items() if theirs in network}}


def finetune(root: str, task: dict, overrides: dict, pretrained: str) -> dict:
    """Fine-tune one fold into ``root`` (resuming a stopped run), then score it with ``evaluate.json``."""
    done = finished(root)
    if done is not None:
        return done
    resume = resumable(root)
    print(f"=== fine-tuning {os.path.relpath(root)}" + (" (resumed)" if resume else ""), flush=True)
    with cost() as training:
        run_workflow(configs_of(task), root, "train", before_run=curves.add_learning_curve,
                     pretrained=pretrained, resume=resume, **overrides)
    # evaluate.json loads the fine-tuned model.pt and the plan.json the training copied beside it
    with cost() as scoring:
        metrics = score(task["bundle"], root, task.get("config_files") or (), **overrides)
    result = {"dice": reports.mean_of_cases(metrics["val_mean_dice"]["cases"]),
              "hd95": reports.mean_of_cases(metrics["val_hd95"]["cases"]),
              "classes": {name: s["mean"] for name, s in metrics["val_mean_dice"]["summary"].items() if name != "mean"},
              "cases": len(metrics["val_mean_dice"]["cases"]), "seconds": training["seconds"],
              "cpu_seconds": training["cpu_seconds"], "eval_cpu_seconds": scoring["cpu_seconds"],
              "curve": curves.read_curve(root)}
    write_json(result_path(root), result)
    return result


def corpus_source(output_dir: str, recipe: dict, corpus: str | None) -> dict:
    """The generic pre-training corpus as pre-training bundle settings: a preprocessed corpus (a folder holding
    ``manifest/``), a folder or datalist of volumes, or, without ``--corpus``, phantoms of other subjects: brain
    MRI where every task is BraTS (its four channels), CT otherwise."""
    if is_preprocessed(corpus):
        return {"manifest": corpus}
    if corpus:
        return {"dataset_dir": corpus}
    folder = os.path.join(output_dir, "data", "corpus")
    bundles = {task["bundle"] for task in recipe["tasks"].values()}
    brain = next(iter(bundles)) if len(bundles) == 1 and next(iter(bundles)).startswith("brats") else ""
    return {"dataset_dir": phantom_set(folder, "corpus", recipe.get("corpus_phantoms", 12), bundle=brain)}


def cells(recipe: dict):
    """Every (row, task, fold) of the table."""
    for task_name, task in recipe["tasks"].items():
        for row_name in recipe["rows"]:
            for fold in task.get("folds", [0]):
                yield row_name, task_name, fold


def pretraining_root(output_dir: str, recipe: dict, table: dict, row_name: str, task_name: str, fold: int) -> str:
    """Where a row's pre-training for one cell runs: a task-specific row pre-trains per task and fold (on that fold's
    training cases only); a generic row once, or once per preprocessing where the tasks' (``table``) differ. Rows
    whose ``pretrain`` is the same (a label-fraction sweep's) share the pre-training of the first of them."""
    row = recipe["rows"][row_name]
    same = json.dumps(row["pretrain"], sort_keys=True)
    first = next(name for name, r in recipe["rows"].items()
                 if r.get("pretrain") and json.dumps(r["pretrain"], sort_keys=True) == same)
    root = os.path.join(output_dir, "pretrain", folder_name(first))
    if row["pretrain"].get("corpus", "generic") == "task":
        return os.path.join(root, folder_name(task_name), f"fold_{fold}")
    if len({json.dumps(s, sort_keys=True) for s in table.values()}) > 1:
        return os.path.join(root, folder_name("_".join(f"{k} {v}" for k, v in sorted(table[task_name].items()))))
    return root


def fold_training_images(root: str, task: dict, overrides: dict) -> str:
    """A datalist of the images of the fold's training cases (every one, whatever the label fraction), as the
    fine-tuning bundle itself splits them, written to ``<root>/datalist.json``: a task-specific pre-training reads
    these and nothing that the fold validates or scores."""
    split = parsed(configs_of(task), {**overrides, "label_fraction": 1.0, "dataset_check": "off"})
    training = [{"image": item["image"]} for item in split.get_parsed_content("split")[0]]
    return write_datalist(os.path.join(root, "datalist.json"), training)


def run_cell(output_dir: str, recipe: dict, table: dict, row_name: str, task_name: str, fold: int, data: dict,
             corpus: dict) -> dict:
    """One cell: its row's pre-training where it has one, then the fine-tuning, both at the task's one
    preprocessing (``table``, from ``table_preprocessing``)."""
    row, task = recipe["rows"][row_name], recipe["tasks"][task_name]
    preprocessing = table[task_name]
    # without data the task's embedded phantoms, written once for all of its runs
    task_data = {"dataset_dir": data[task_name]} if task_name in data else \
        {"phantom_dir": os.path.join(output_dir, "data", folder_name(task_name))}
    overrides = {**recipe.get("finetune_overrides", {}), **task.get("overrides", {}), **task_data, "fold": fold}
    pretrained = ""
    if row.get("pretrain"):
        pre = row["pretrain"]
        root = pretraining_root(output_dir, recipe, table, row_name, task_name, fold)

        def source() -> dict:
            if pre.get("corpus", "generic") != "task":
                return {**corpus, **preprocessing}
            # the datalist lists the task's own files where they are, outside its folder, which the dataset check
            # refuses for a user's datalist; the task's fine-tuning runs check these images
            images = fold_training_images(root, task, overrides)
            return {"dataset_dir": images, "dataset_check": "off", **preprocessing}

        pretrained = pretrain(root, pre, source, recipe.get("pretraining_overrides", {}))
        overrides.update(finetune_network(pretrained))
    overrides.update({**row.get("overrides", {}), **preprocessing})
    return finetune(finetune_root(output_dir, row_name, task_name, fold), task, overrides, pretrained)


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
            if all(r.get("curve") for r in runs):  # runs made before the tool kept curves have none
                summary[task_name][row_name]["curve"] = curves.mean_curve([r["curve"] for r in runs])
    return summary


def convergence(recipe: dict, summary: dict) -> dict:
    """Per task: the target (90 % of the scratch row's final validation Dice), and per row with a curve the
    epochs to reach it and the speed-up against the scratch and the contrastive rows (``reference_rows``), as the
    WACV study measures convergence."""
    refs = reference_rows(recipe)
    found = {}
    for task_name, rows in summary.items():
        scratch = rows.get(refs["scratch"], {}).get("curve")
        if not scratch:
            continue
        target = 0.9 * scratch[-1][1]
        reach = {name: curves.epochs_to_reach(r["curve"], target) for name, r in rows.items() if r.get("curve")}
        found[task_name] = {"target": target, **refs, "rows": {
            name: {"epochs": epochs, "vs_scratch": curves.speed_up(reach[refs["scratch"]], epochs),
                   "vs_contrastive": curves.speed_up(reach[refs["contrastive"]], epochs)
                   if refs["contrastive"] in reach else None}
            for name, epochs in reach.items()}}
    return found


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def curves_table(recipe: dict, summary: dict, found: dict) -> list[str]:
    """Per task: each row's validation Dice at the curve's epochs, and the convergence columns."""
    lines = []
    for task_name, rows in summary.items():
        with_curve = [name for name in recipe["rows"] if rows.get(name, {}).get("curve")]
        if not with_curve:
            continue
        epochs = sorted({e for name in with_curve for e, _ in rows[name]["curve"]})
        conv = found.get(task_name)
        extra = ["epochs to target", "speed-up vs scratch", "vs contrastive"] if conv else []
        lines += [f"## {task_name}: learning curves", "", *reports.table_header(
            "method", [f"epoch {e}" for e in epochs] + extra)]
        for name in with_curve:
            curve = dict(map(tuple, rows[name]["curve"]))
            cells = [f"{curve[e]:.3f}" if e in curve else "–" for e in epochs]
            if conv:
                c = conv["rows"][name]
                cells += [str(c["epochs"]) if c["epochs"] is not None else "not reached", _times(c["vs_scratch"]),
                          _times(c["vs_contrastive"])]
            lines.append(reports.table_row(name, cells))
        lines.append("")
        if conv:
            against = conv["scratch"] + (f" and {conv['contrastive']}" if conv["contrastive"] else "")
            lines += [f"Validation Dice at the same epochs of every run (mean over folds). Target: 90 % of the final "
                      f"Dice of {conv['scratch']} ({conv['target']:.3f}). A speed-up is the epochs the reference row "
                      f"({against}) needs to reach the target divided by this row's.", ""]
    return lines


def plot_curves(path: str, recipe: dict, summary: dict) -> bool:
    """One panel per task: every row's learning curve. ``False`` (nothing drawn) when no run has a curve."""
    panels = []
    for task_name, rows in summary.items():
        series = [(name, [e for e, _ in rows[name]["curve"]], [d for _, d in rows[name]["curve"]], None)
                  for name in recipe["rows"] if rows.get(name, {}).get("curve")]
        if series:
            panels.append({"series": series, "xlabel": f"{task_name}: fine-tuning epoch",
                           "ylabel": "validation Dice", "marker": "."})
    if panels:
        reports.curves_figure(path, panels)
    return bool(panels)


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
    lines += curves_table(recipe, summary, convergence(recipe, summary))
    lines += [f"CPU-hours of the finished runs (pre-training, fine-tuning and evaluation): {spent / 3600:.2f}.", ""]
    return "\n".join(lines)


def main(recipe: str, output_dir: str = "runs/compare", corpus: str | None = None, data: dict | None = None,
         report_only: bool = False) -> dict:
    """Run the recipe's table (or, with ``report_only``, only report what is finished); return ``results.json``.

    Args:
        recipe: a recipe JSON file (``docs/comparison/``).
        output_dir: where every run, ``results.md`` and ``results.json`` go.
        corpus: the unlabelled volumes of generic pre-training: a folder, a datalist, or a corpus that
            ``tools/preprocess.py`` wrote; without it, phantoms of subjects the tasks do not hold (brain MRI for a
            BraTS-only recipe, CT otherwise).
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
    table = table_preprocessing(recipe)
    results, missing = {}, []
    for cell in cells(recipe):
        result = finished(finetune_root(output_dir, *cell))
        if result is not None:
            results[cell] = result
        elif report_only:
            missing.append(cell)
            continue
        else:
            results[cell] = run_cell(output_dir, recipe, table, *cell, data, source)
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
    content = {"recipe": recipe, "summary": summary, "convergence": convergence(recipe, summary),
               "runs": {f"{r} | {t} | fold {k}": v for (r, t, k), v in results.items()},
               "cpu_hours": spent / 3600, "markdown": markdown}
    plot_curves(os.path.join(output_dir, "curves.png"), recipe, summary)
    write_json(os.path.join(output_dir, "results.json"), content)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    return content
