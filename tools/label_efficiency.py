"""Does pre-training help on my data? The label-efficiency protocol, every choice fixed before the final runs.

    python tools/label_efficiency.py --output_dir runs/label_efficiency              # on phantoms
    python tools/label_efficiency.py --output_dir runs/mine --labelled /data/pool --development /data/dev \\
        --test /data/test --corpus /data/unlabelled --protocol my_protocol.json     # on your data

The protocol (``PROTOCOL``, or a JSON file of the same keys that overrides it) is written to
``<output_dir>/protocol.json`` at the first call; a later call with another protocol stops, so nothing can be
changed once runs have been seen. The stages, each resumable (a finished run leaves its ``result.json``, and a
rerun skips it; a stopped pre-training resumes from its last checkpoint):

1. **Data**: four disjoint sets. A pre-training corpus (unlabelled; a folder, datalist or preprocessed corpus),
   a labelled pool for fine-tuning, a development set for choosing the recipe, and a test set scored once per
   run. Without paths: realistic abdominal CT phantoms of disjoint subjects (``PHANTOM_SEEDS``).
2. **Corpus**: preprocessed once into a manifest (``hybridmim_components.preprocess``, the path for 10k+
   volumes); pre-training reads crops from it.
3. **Pre-training**: each method of ``methods`` (``METHODS``: HybridMIM and its ablations on the protocol's
   ``pretrain_bundle``, and Models Genesis on its own bundle; all pre-train the fine-tuning bundle's UNet), until
   its probe plateaus (``probe.StopAtProbePlateau``: no gain above ``min_gain`` in ``patience`` probes) or
   ``max_epochs``. ``pretraining.overrides`` go to every method's bundle; an id a bundle lacks is not used.
4. **Recipe choice on the development set**: every candidate recipe of ``recipes`` (scratch's for scratch, the
   pre-trained ones for each pre-training) fine-tunes ``development.budget`` labelled volumes with each of the
   ``development.seeds``, for the fixed step budget ``steps`` (or the candidate's own ``steps``: the step budget
   is then chosen with the rest of the recipe); the candidate with the highest mean final Dice on the development
   set wins (ties within ``tie`` go to the one listed first). The test set is not read.
5. **Final runs**: scratch and each pre-training with its chosen recipe, at each of ``budgets`` labelled volumes
   and each of ``seeds``; a seed fixes the subset (nested: a smaller budget's volumes are among a larger one's)
   and the crops, for every initialisation. Each run trains its recipe's step budget and is scored at its end,
   once, with the bundle's own ``evaluate.json`` on the test set (original space, Dice per class and case).
6. **The frozen encoder's linear head**: the pre-training bundle's segmentation probe, fitted on the whole
   labelled pool and scored on the test set, for each pre-trained encoder and for the random one it started
   from. Where pre-training does not help fine-tuning, this says which part failed: an encoder whose features
   separate the organs no better than random ones learned nothing that fine-tuning could use.
7. **Report** (``results.md``, ``results.json``, ``results.png``: Dice against budget, probe curves): mean test Dice
   per budget; the difference to scratch paired by seed and test case with a 95 % bootstrap interval (seeds and
   cases resampled); Dice per organ; the probe's ranking of the pre-trainings against the fine-tuning ranking;
   the linear heads; the development choice; the cost in CPU-hours.

``--report_only True`` runs nothing and reports what is finished, listing what is not; before every candidate
of an initialisation has run on the development set, its finished candidates are shown and none is chosen.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import fire
import numpy as np
import torch
from ignite.engine import Events

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from monai.utils import set_determinism

from hybridmim_components.checkpoints import latest_checkpoint
from hybridmim_components.data import load_datalist, write_datalist
from hybridmim_components.dataset_check import require_valid_dataset
from hybridmim_components.phantoms import write_brain_phantoms, write_ct_phantoms
from hybridmim_components.preprocess import preprocess
from hybridmim_components.probe import StopAtProbePlateau, read_probe_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM_TASKS = {"msd_spleen_segmentation": "spleen", "msd_liver_segmentation": "liver",
                 "btcv_multiorgan_segmentation": "btcv"}
# first subject seed of each phantom set: disjoint subjects (the probe's own phantoms are seeds 900-903)
PHANTOM_SEEDS = {"pool": 0, "development": 2000, "test": 3000, "corpus": 10000}
NO_TERMS = {"count_weight": 0, "location_weight": 0, "consistency_weight": 0}
# a method: the pre-training bundle it runs (None: the protocol's pretrain_bundle) and that bundle's overrides.
# Every bundle here pre-trains a BasicUNet of the same features and loading chain (the pre-training family's
# configs share them), so that one corpus manifest and one scratch baseline serve all of them.
METHODS = {
    "hybridmim": (None, {}),
    "reconstruction_only": (None, {f"loss#{k}": v for k, v in {**NO_TERMS, "contrastive_weight": 0}.items()}),
    "contrastive_only": (None, {f"loss#{k}": v for k, v in {**NO_TERMS, "reconstruction_weight": 0}.items()}),
    "modelsgenesis": ("modelsgenesis_unet_pretrain", {}),
}
PROTOCOL = {
    "bundle": "btcv_multiorgan_segmentation",
    "pretrain_bundle": "hybridmim_unet_pretrain",
    "methods": ["hybridmim", "reconstruction_only", "contrastive_only"],
    "data": {"corpus": 200, "pool": 20, "development": 4, "test": 16, "phantom_shape": [144, 112, 80]},
    "pretraining": {"probe_interval": 2, "min_gain": 0.005, "patience": 3, "max_epochs": 60, "epoch_length": 25,
                    "overrides": {}},
    "steps": 300,
    "budgets": [1, 2, 5, 20],
    "seeds": [0, 1, 2],
    "development": {"budget": 2, "seeds": [100, 101], "tie": 0.005,
                    "criterion": "mean over the development seeds of the final mean Dice on the development set"},
    # warmup_fraction and frozen_fraction are fractions of the run's epochs, so that the recipe means the same at
    # every budget; a recipe's "steps" replaces the step budget above for its runs; the rest are the fine-tuning
    # bundle's own settings
    "recipes": {
        "scratch": {
            "lr 1e-3": {"learning_rate": 1e-3},
            "lr 3e-4": {"learning_rate": 3e-4},
        },
        "pretrained": {
            "all, lr 1e-3": {"transfer": "all", "pretrained_learning_rate": 1e-3},
            "all, lr 1e-4, warm-up": {"transfer": "all", "pretrained_learning_rate": 1e-4, "warmup_fraction": 0.1},
            "encoder, lr 1e-3": {"transfer": "encoder", "pretrained_learning_rate": 1e-3},
            "encoder, lr 1e-4, warm-up": {"transfer": "encoder", "pretrained_learning_rate": 1e-4,
                                          "warmup_fraction": 0.1},
            "encoder, frozen, then lr 1e-4": {"transfer": "encoder", "pretrained_learning_rate": 1e-4,
                                              "warmup_fraction": 0.1, "frozen_fraction": 0.1},
        },
    },
    "finetune_overrides": {"num_workers": 0},
}


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, nested dicts merged (a protocol file names only what differs);
    ``recipes`` are replaced whole, so that a user's candidate list is exactly theirs."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "recipes":
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fixed_protocol(output_dir: str, protocol: str | dict | None) -> dict:
    """The study's protocol: written to ``protocol.json`` at the first call, and refused when it differs later."""
    if isinstance(protocol, str):
        with open(protocol) as f:
            protocol = json.load(f)
    wanted = merged(PROTOCOL, protocol or {})
    unknown = [m for m in wanted["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown} in the protocol; choose among {sorted(METHODS)}.")
    path = os.path.join(output_dir, "protocol.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
            raise ValueError(f"{path} fixes this study's protocol, and the one given differs in {changed}. A protocol "
                             "is fixed before its runs are seen: use another --output_dir for another protocol.")
        return recorded
    write_json(path, wanted)
    return wanted


def write_json(path: str, content) -> None:
    """Write to a temporary name, then rename: a run stopped while writing leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---- 1, 2: data ----------------------------------------------------------------------------------------------
def phantom_set(output_dir: str, name: str, protocol: dict) -> str:
    folder = os.path.join(output_dir, "data", name)
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        count, shape, bundle = protocol["data"][name], protocol["data"]["phantom_shape"], protocol["bundle"]
        if bundle.startswith("brats"):
            write_brain_phantoms(folder, num_subjects=count, seed=PHANTOM_SEEDS[name], shape=shape)
        else:
            task = "organs" if name == "corpus" else PHANTOM_TASKS[bundle]
            write_ct_phantoms(folder, num_subjects=count, seed=PHANTOM_SEEDS[name], shape=shape, task=task)
    return folder


def study_data(output_dir: str, protocol: dict, labelled, development, test) -> dict:
    """The labelled sets' items: ``pool``, ``development`` and ``test``. The corpus is the fourth
    (``corpus_manifest``), made only while a pre-training has not finished."""
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundles", protocol["bundle"], "configs", "train.json"))
    parser.update(protocol["finetune_overrides"])
    labels, channels = parser.get_parsed_content("label_values"), parser.get_parsed_content("in_channels")
    sources = {"pool": labelled, "development": development, "test": test}
    sets = {}
    for name, source in sources.items():
        # checked once here, as the bundle would: the runs' own datalists then only list these items again
        source = require_valid_dataset(source or phantom_set(output_dir, name, protocol), labels, channels)
        sets[name] = load_datalist(source)
    images = {name: {json.dumps(item["image"]) for item in items} for name, items in sets.items()}
    for a, b in (("pool", "development"), ("pool", "test"), ("development", "test")):
        if images[a] & images[b]:
            raise ValueError(f"the {a} and {b} sets share {len(images[a] & images[b])} images; they must be disjoint.")
    return sets


def corpus_manifest(output_dir: str, protocol: dict, corpus: str) -> str:
    """A preprocessed corpus (a folder holding ``manifest/``) as it is; any other source preprocessed once, through
    the pre-training bundle's loading chain, into ``<output_dir>/corpus``."""
    if os.path.isdir(os.path.join(corpus, "manifest")):
        return corpus
    target = os.path.join(output_dir, "corpus")
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundles", protocol["pretrain_bundle"], "configs", "train.json"))
    parser.update(protocol["pretraining"]["overrides"])
    preprocess([corpus], target, Compose(parser.get_parsed_content("load_and_scale")), quiet=True)
    return target


def subset(items: list, count: int, seed: int) -> list:
    """``count`` items of a seeded permutation: a smaller count's items are among a larger one's."""
    if count > len(items):
        raise ValueError(f"a budget of {count} labelled volumes needs a pool of at least {count}; it has {len(items)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:count]]


# ---- 3: pre-training -----------------------------------------------------------------------------------------
def pretraining_bundle(protocol: dict, method: str) -> tuple[str, dict]:
    """The ``train.json`` that pre-trains ``method`` and its overrides: the protocol's, then the method's."""
    bundle, method_overrides = METHODS[method]
    config_file = os.path.join(REPO, "bundles", bundle or protocol["pretrain_bundle"], "configs", "train.json")
    return config_file, {"seed": 0, "num_workers": 0, **protocol["pretraining"]["overrides"], **method_overrides}


def pretrain(output_dir: str, protocol: dict, method: str, manifest: str) -> dict:
    """Pre-train ``method`` until its probe plateaus; its ``result.json``: checkpoint, probe curve, steps, cost."""
    path = pretraining_result(output_dir, method)
    root = os.path.dirname(path)
    if os.path.isfile(path):
        return read_json(path)
    settings = protocol["pretraining"]
    config_file, overrides = pretraining_bundle(protocol, method)
    overrides = {"manifest": manifest, "max_epochs": settings["max_epochs"], "epoch_length": settings["epoch_length"],
                 "probe_interval": settings["probe_interval"], **overrides}
    resume = resumable(root)
    print(f"=== pre-training {method}" + (" (resumed)" if resume else ""), flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    workflow = ConfigWorkflow(config_file=config_file, workflow_type="train", bundle_root=root, resume=resume,
                              **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    probe_log = os.path.join(root, "runs", "probe.jsonl")
    StopAtProbePlateau(probe_log, settings["min_gain"], settings["patience"]).attach(trainer)
    workflow.run()
    workflow.finalize()
    result = {"steps": trainer.state.iteration,
              "epochs": trainer.state.epoch, "probe": [(r["epoch"], r["dice"]) for r in read_probe_log(probe_log)],
              "cpu_seconds": time.process_time() - cpu, "seconds": time.perf_counter() - start}
    write_json(path, result)
    return result


def pretraining_result(output_dir: str, method: str) -> str:
    return os.path.join(output_dir, "pretrain", method, "result.json")


# ---- 4, 5: fine-tuning ---------------------------------------------------------------------------------------
def recipe_overrides(recipe: dict, max_epochs: int) -> dict:
    """A recipe as the bundle's settings: the warm-up and frozen fractions in epochs of this run (its ``steps``
    is the run's length, not a bundle setting)."""
    settings = {k: v for k, v in recipe.items() if k not in ("warmup_fraction", "frozen_fraction", "steps")}
    if recipe.get("warmup_fraction"):
        settings["pretrained_warmup_epochs"] = max(1, round(recipe["warmup_fraction"] * max_epochs))
    if recipe.get("frozen_fraction"):
        settings["frozen_epochs"] = max(1, round(recipe["frozen_fraction"] * max_epochs))
    return settings


def finetune(root: str, protocol: dict, train: list, validation: list, recipe: dict, seed: int,
             pretrained: str = "", test: list | None = None) -> dict:
    """One fine-tuning run on ``train`` for the recipe's ``steps`` (the protocol's ``steps`` where the recipe names
    none), validated once at its end on ``validation``; with ``test``, the final model is then scored by the
    bundle's ``evaluate.json``."""
    path = os.path.join(root, "result.json")
    if os.path.isfile(path):
        return read_json(path)
    bundle = protocol["bundle"]
    overrides = dict(protocol["finetune_overrides"])
    per_epoch = math.ceil(len(train) / overrides.get("batch_size", 1))
    max_epochs = math.ceil(recipe.get("steps", protocol["steps"]) / per_epoch)
    datalist = write_datalist(os.path.join(root, "datalist.json"), train, validation)
    overrides.update(dataset_dir=datalist, dataset_check="off", label_fraction=1.0, seed=seed, pretrained=pretrained,
                     max_epochs=max_epochs, val_interval=max_epochs, **recipe_overrides(recipe, max_epochs))
    configs = os.path.join(REPO, "bundles", bundle, "configs")
    start, cpu = time.perf_counter(), time.process_time()
    workflow = ConfigWorkflow(config_file=os.path.join(configs, "train.json"), workflow_type="train",
                              bundle_root=root, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    history, crops = [], []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED,
                                lambda e: history.append(float(e.state.metrics["val_mean_dice"])))
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: crops.append(float(e.state.batch["image"].double().sum())))
    workflow.run()
    workflow.finalize()
    result = {"train": [json.dumps(item["image"]) for item in train], "steps": trainer.state.iteration,
              "epochs": max_epochs, "validation_dice": history[-1], "crops": crops,
              "cpu_seconds": time.process_time() - cpu, "seconds": time.perf_counter() - start}
    if test is not None:
        start, cpu = time.perf_counter(), time.process_time()
        tested = write_datalist(os.path.join(root, "test_datalist.json"), test, test)
        network = {k: v for k, v in overrides.items() if k not in ("pretrained", "dataset_dir")}
        workflow = ConfigWorkflow(config_file=[os.path.join(configs, "train.json"), os.path.join(configs, "evaluate.json")],
                                  workflow_type=None, bundle_root=root, **{**network, "dataset_dir": tested})
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        metrics = read_json(os.path.join(root, "eval", "metrics.json"))["val_mean_dice"]
        result["test"] = metrics["cases"]
        result["test_cpu_seconds"] = time.process_time() - cpu
    write_json(path, result)
    return result


def choose_recipes(output_dir: str, protocol: dict, inits: list[str], sets: dict, checkpoints: dict) -> dict:
    """Run every candidate on the development set and choose one per initialisation (the protocol's criterion)."""
    dev = protocol["development"]
    for init in inits:
        for name, recipe in candidates_of(protocol, init).items():
            for seed in dev["seeds"]:
                root = development_root(output_dir, init, name, seed)
                if not os.path.isfile(os.path.join(root, "result.json")):
                    print(f"=== development: {init}, {name}, seed {seed}", flush=True)
                finetune(root, protocol, subset(sets["pool"], dev["budget"], seed), sets["development"], recipe,
                         seed, checkpoints.get(init, ""))
    choice = development_choice(output_dir, protocol, inits)
    write_json(os.path.join(output_dir, "choice.json"), choice)
    return choice


def development_choice(output_dir: str, protocol: dict, inits: list[str]) -> dict:
    """Per initialisation, the development scores of the candidates whose runs have all finished and, once every
    candidate has, the chosen one (the best mean, a tie within ``tie`` to the one listed first). Before that,
    ``chosen`` is ``None``: a choice among the finished candidates alone could differ from the final one."""
    dev = protocol["development"]
    choice: dict = {}
    for init in inits:
        candidates, scores = candidates_of(protocol, init), {}
        for name in candidates:
            paths = [os.path.join(development_root(output_dir, init, name, seed), "result.json") for seed in dev["seeds"]]
            if all(os.path.isfile(p) for p in paths):
                runs = [read_json(p) for p in paths]
                scores[name] = {"dice": float(np.mean([r["validation_dice"] for r in runs])),
                                "per_seed": [r["validation_dice"] for r in runs],
                                "cpu_seconds": sum(r["cpu_seconds"] for r in runs)}
        chosen = None
        if len(scores) == len(candidates):
            best = max(s["dice"] for s in scores.values())
            chosen = next(name for name, s in scores.items() if s["dice"] >= best - dev["tie"])
        choice[init] = {"chosen": chosen, "recipe": candidates[chosen] if chosen else None, "scores": scores,
                        "candidates": len(candidates)}
    return choice


def candidates_of(protocol: dict, init: str) -> dict:
    return protocol["recipes"]["scratch" if init == "scratch" else "pretrained"]


def development_root(output_dir: str, init: str, name: str, seed: int) -> str:
    return os.path.join(output_dir, "development", init, folder_name(name), f"seed_{seed}")


def folder_name(name: str) -> str:
    """``name`` (a recipe's, a row's or a task's) as a folder name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def resumable(root: str) -> bool:
    """Whether the bundle run in ``root`` left an intact checkpoint in ``models`` to resume from."""
    try:
        latest_checkpoint(os.path.join(root, "models"))
    except FileNotFoundError:
        return False
    return True


# ---- 6: the frozen encoder's linear head ---------------------------------------------------------------------
RANDOM = "random encoder"


def linear_head(output_dir: str, protocol: dict, encoder: str, sets: dict) -> dict | None:
    """The segmentation probe of the pre-training bundle (``probe.SegmentationProbe``: a linear head on the frozen
    encoder's features) fitted on every volume of the labelled pool and scored on the test set, for the encoder
    that the method ``encoder`` pre-trained, or for ``RANDOM``: the first method's network at the initialisation
    its pre-training started from (the same seed). ``None`` for a task whose labels are not the classes 0..K-1
    (BraTS's 0, 1, 2, 4), which the probe does not map."""
    path = linear_head_result(output_dir, encoder)
    root = os.path.dirname(path)
    if os.path.isfile(path):
        return read_json(path)
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundles", protocol["bundle"], "configs", "train.json"))
    values, names = parser.get_parsed_content("label_values"), parser.get_parsed_content("class_names")
    if values != list(range(len(values))):
        return None
    print(f"=== linear head on the frozen encoder: {encoder}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    config_file, overrides = pretraining_bundle(protocol, protocol["methods"][0] if encoder == RANDOM else encoder)
    fit_and_test = write_datalist(os.path.join(root, "datalist.json"), sets["pool"] + sets["test"])
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({**overrides, "bundle_root": root, "probe_datalist": fit_and_test, "probe_num_classes": len(values),
                   "probe_class_names": names[1:] if len(names) == len(values) else None,
                   "probe#handler#held_out": len(sets["test"]), "probe#handler#log_file": None})
    set_determinism(seed=overrides["seed"])  # as the pre-training's initialize does, before its network is built
    backbone = parser.get_parsed_content("backbone")
    if encoder != RANDOM:
        weights = os.path.join(output_dir, "pretrain", encoder, "models", "model.pt")
        backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    result = parser.get_parsed_content("probe#handler").measure()
    result.update(fitted_on=len(sets["pool"]), scored_on=len(sets["test"]), cpu_seconds=time.process_time() - cpu,
                  seconds=time.perf_counter() - start)
    write_json(path, result)
    return result


def linear_head_result(output_dir: str, encoder: str) -> str:
    return os.path.join(output_dir, "linear_head", folder_name(encoder), "result.json")


# ---- 7: report -----------------------------------------------------------------------------------------------
def case_dice(run: dict) -> dict[str, float]:
    """Each test case's mean Dice over the classes it holds, by file name (runs made in another checkout pair too)."""
    return {os.path.basename(case["filename"]): float(case["mean"]) for case in run["test"]}


def paired_difference(pre: dict, scratch: dict, repeats: int = 2000, seed: int = 0) -> dict:
    """Pre-trained minus scratch test Dice, paired by seed and test case: the mean and a 95 % bootstrap interval
    that resamples seeds and cases (a crossed design: every seed is scored on every case)."""
    seeds = sorted(set(pre) & set(scratch))
    cases = sorted(set.intersection(*(set(case_dice(pre[s])) & set(case_dice(scratch[s])) for s in seeds)))
    d = np.array([[case_dice(pre[s])[c] - case_dice(scratch[s])[c] for c in cases] for s in seeds])
    rng = np.random.default_rng(seed)
    means = [d[np.ix_(rng.integers(0, len(seeds), len(seeds)), rng.integers(0, len(cases), len(cases)))].mean()
             for _ in range(repeats)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "seeds": len(seeds), "cases": len(cases)}


def per_organ(runs: dict) -> dict[str, float]:
    """Mean test Dice of each class over the runs and their cases (classes absent from a case left out)."""
    values: dict[str, list[float]] = {}
    for run in runs.values():
        for case in run["test"]:
            for name, value in case.items():
                if name not in ("filename", "mean") and not math.isnan(value):
                    values.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in values.items()}


def _ranks(values: dict[str, float]) -> dict[str, int]:
    return {name: rank for rank, name in enumerate(sorted(values, key=values.get, reverse=True), 1)}


def summarise(protocol: dict, pretrainings: dict, choice: dict, finals: dict) -> dict:
    inits = ["scratch", *protocol["methods"]]
    summary: dict = {"dice": {}, "vs_scratch": {}, "organs": {}}
    for budget in map(str, protocol["budgets"]):
        row, diff, organs = {}, {}, {}
        for init in inits:
            runs = finals.get(init, {}).get(budget, {})
            if not runs:
                continue
            per_seed = [float(np.mean(list(case_dice(r).values()))) for r in runs.values()]
            row[init] = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1
                         else 0.0, "n": len(per_seed)}
            organs[init] = per_organ(runs)
            scratch = finals.get("scratch", {}).get(budget, {})
            if init != "scratch" and set(runs) & set(scratch):
                diff[init] = paired_difference(runs, scratch)
        summary["dice"][budget], summary["vs_scratch"][budget], summary["organs"][budget] = row, diff, organs
    probe = {m: pretrainings[m]["probe"][-1][1] for m in protocol["methods"] if m in pretrainings}
    tuned = {m: float(np.mean([summary["dice"][b][m]["mean"] for b in summary["dice"] if m in summary["dice"][b]]))
             for m in probe if any(m in summary["dice"][b] for b in summary["dice"])}
    summary["ranking"] = {m: {"probe": probe[m], "probe_rank": _ranks(probe)[m], "finetuned": tuned.get(m),
                              "finetuned_rank": _ranks(tuned).get(m)} for m in probe}
    cost = {"pretraining": sum(p["cpu_seconds"] for p in pretrainings.values()),
            "development": sum(s["cpu_seconds"] for c in choice.values() for s in c["scores"].values()),
            "final": sum(r["cpu_seconds"] + r.get("test_cpu_seconds", 0) for i in finals.values()
                         for b in i.values() for r in b.values())}
    summary["cpu_hours"] = {k: v / 3600 for k, v in cost.items()}
    return summary


def table(protocol: dict, summary: dict, choice: dict, pretrainings: dict, heads: dict) -> str:
    inits = ["scratch", *protocol["methods"]]
    header = lambda names: ["| labelled volumes | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]  # noqa: E731
    lines = ["## Test Dice", "", *header(inits)]
    for budget, row in summary["dice"].items():
        lines.append(f"| {budget} | " + " | ".join(f"{row[i]['mean']:.3f} ± {row[i]['std']:.3f} (n={row[i]['n']})"
                                                    if i in row else "–" for i in inits) + " |")
    lines += ["", "Mean test Dice over the foreground classes and test cases, mean ± sample standard deviation over "
              "seeds (n), each run scored once at the end of its step budget.", "",
              "## Difference to scratch, paired by seed and test case", "", *header(inits[1:])]
    for budget, row in summary["vs_scratch"].items():
        lines.append(f"| {budget} | " + " | ".join(
            f"{row[i]['mean']:+.3f} [{row[i]['low']:+.3f}, {row[i]['high']:+.3f}]" if i in row else "–"
            for i in inits[1:]) + " |")
    lines += ["", "Pre-trained minus scratch test Dice, mean over seeds × test cases, with a 95 % bootstrap interval "
              "(seeds and cases resampled).", "", "## Dice per organ", ""]
    for budget, organs in summary["organs"].items():
        names = sorted({o for per in organs.values() for o in per})
        present = [i for i in inits if i in organs]
        lines += [f"{budget} labelled volumes:", "", "| organ | " + " | ".join(present) + " |",
                  "| --- |" + " --- |" * len(present)]
        lines += [f"| {o} | " + " | ".join(f"{organs[i].get(o, float('nan')):.3f}" for i in present) + " |"
                  for o in names]
        lines.append("")
    lines += ["## The probe's ranking against fine-tuning", "",
              "| pre-training | steps | final probe Dice (rank) | mean test Dice over budgets (rank) |",
              "| --- | --- | --- | --- |"]
    for method, r in summary["ranking"].items():
        tuned = f"{r['finetuned']:.3f} ({r['finetuned_rank']})" if r["finetuned"] is not None else "–"
        lines.append(f"| {method} | {pretrainings[method]['steps']} | {r['probe']:.3f} ({r['probe_rank']}) | {tuned} |")
    if heads:
        lines += ["", "## The frozen encoder's linear head, on the test set", "",
                  "| encoder | test Dice of the linear head | against the random encoder |", "| --- | --- | --- |"]
        for encoder, head in heads.items():
            against = f"{head['dice'] - heads[RANDOM]['dice']:+.3f}" if RANDOM in heads and encoder != RANDOM else "–"
            lines.append(f"| {encoder} | {head['dice']:.3f} | {against} |")
        fitted = next(iter(heads.values()))
        lines += ["", f"The segmentation probe of the pre-training bundle, fitted on the {fitted['fitted_on']} volumes "
                  f"of the labelled pool and scored on the {fitted['scored_on']} test volumes (mean over the classes of "
                  "the Dice pooled over their crops); the random encoder is the initialisation the pre-trainings "
                  "started from."]
    lines += ["", "## The recipe chosen on the development set", "",
              f"Criterion, fixed before the runs: {protocol['development']['criterion']}, at "
              f"{protocol['development']['budget']} labelled volumes, seeds {protocol['development']['seeds']}, "
              f"{protocol['steps']} steps unless a candidate names its own; ties within {protocol['development']['tie']} "
              "go to the candidate listed first.",
              "", "| initialisation | candidate | development Dice | chosen |", "| --- | --- | --- | --- |"]
    for init, c in choice.items():
        for name, s in c["scores"].items():
            lines.append(f"| {init} | {name} | {s['dice']:.3f} | {'yes' if name == c['chosen'] else ''} |")
        if c["chosen"] is None:
            lines.append(f"| {init} | ({c.get('candidates', '?')} candidates; {len(c['scores'])} finished) | | "
                         "pending |")
    hours = summary["cpu_hours"]
    lines += ["", "## Cost", "", f"CPU-hours: pre-training {hours['pretraining']:.2f}, development {hours['development']:.2f}, "
              f"final runs and their tests {hours['final']:.2f}, in all {sum(hours.values()):.2f}.", ""]
    return "\n".join(lines)


def plot(protocol: dict, summary: dict, pretrainings: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for init in ["scratch", *protocol["methods"]]:
        points = [(int(b), row[init]) for b, row in summary["dice"].items() if init in row]
        if points:
            left.errorbar([b for b, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                          marker="o", capsize=3, label=init)
    left.set_xscale("log")
    left.set_xlabel("labelled volumes")
    left.set_ylabel("test Dice (mean ± std over seeds)")
    left.legend(fontsize=8)
    for method, result in pretrainings.items():
        right.plot([e for e, _ in result["probe"]], [d for _, d in result["probe"]], marker=".", label=method)
    right.set_xlabel("pre-training epoch")
    right.set_ylabel("probe Dice")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "results.png"), dpi=100)
    plt.close(fig)


def main(output_dir: str = "runs/label_efficiency", protocol: str | dict | None = None, labelled: str | None = None,
         development: str | None = None, test: str | None = None, corpus: str | None = None,
         report_only: bool = False) -> dict:
    """Run (or, with ``report_only``, only report) the protocol's stages; return ``results.json``'s content."""
    started = time.perf_counter()
    protocol = fixed_protocol(output_dir, protocol)
    inits = ["scratch", *protocol["methods"]]
    pretrainings, finals, missing = {}, {}, []
    choice = read_json(os.path.join(output_dir, "choice.json")) if os.path.isfile(os.path.join(output_dir, "choice.json")) else {}
    if not report_only:
        sets = study_data(output_dir, protocol, labelled, development, test)
        # a study resumed in a fresh checkout (the data is not committed) needs no corpus once its pre-trainings ran
        manifest = ""
        if not all(os.path.isfile(pretraining_result(output_dir, m)) for m in protocol["methods"]):
            manifest = corpus_manifest(output_dir, protocol, corpus or phantom_set(output_dir, "corpus", protocol))
        for method in protocol["methods"]:
            pretrainings[method] = pretrain(output_dir, protocol, method, manifest)
        checkpoints = {m: os.path.join(output_dir, "pretrain", m, "models", "model.pt") for m in pretrainings}
        for encoder in (RANDOM, *protocol["methods"]):
            linear_head(output_dir, protocol, encoder, sets)
        choice = choice or choose_recipes(output_dir, protocol, inits, sets, checkpoints)
    elif not choice:  # the development stage has not finished: its finished runs, nothing chosen yet
        choice = development_choice(output_dir, protocol, inits)
    for seed in protocol["seeds"]:
        for budget in protocol["budgets"]:
            for init in inits:
                root = os.path.join(output_dir, "final", init, f"budget_{budget}", f"seed_{seed}")
                if os.path.isfile(os.path.join(root, "result.json")):
                    result = read_json(os.path.join(root, "result.json"))
                elif report_only:
                    missing.append(f"{init}, {budget} labelled, seed {seed}")
                    continue
                else:
                    print(f"=== final: {init}, {budget} labelled, seed {seed}", flush=True)
                    result = finetune(root, protocol, subset(sets["pool"], budget, seed), sets["development"],
                                      choice[init]["recipe"], seed, checkpoints.get(init, ""), sets["test"])
                finals.setdefault(init, {}).setdefault(str(budget), {})[str(seed)] = result
    for method in protocol["methods"]:
        path = pretraining_result(output_dir, method)
        if method not in pretrainings and os.path.isfile(path):
            pretrainings[method] = read_json(path)
    heads = {e: read_json(linear_head_result(output_dir, e)) for e in (RANDOM, *protocol["methods"])
             if os.path.isfile(linear_head_result(output_dir, e))}
    summary = summarise(protocol, pretrainings, choice, finals)
    report = {"protocol": protocol, "pretrainings": pretrainings, "choice": choice, "finals": finals,
              "linear_heads": heads, "summary": summary}
    write_json(os.path.join(output_dir, "results.json"), report)
    markdown = table(protocol, summary, choice, pretrainings, heads)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    if finals:
        plot(protocol, summary, pretrainings, output_dir)
    print(markdown)
    if missing:
        print(f"{len(missing)} final runs not done yet:", *missing, sep="\n  ", flush=True)
    print(f"this call: {time.perf_counter() - started:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
