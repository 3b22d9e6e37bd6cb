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
2. **Gate**: before any pre-training, scratch fine-tunes ``gate.budget`` labelled volumes with the gate's recipe and is
   scored per class on the development set; below ``min_dice`` or with fewer than ``min_classes_above_half``
   classes above 0.5, the study stops: a study whose baseline does not learn measures nothing.
3. **Corpus**: preprocessed once into a manifest (``hybridmim_components.preprocess``, the path for 10k+
   volumes); pre-training reads crops from it.
4. **Pre-training**: each method of ``methods`` (``METHODS``: HybridMIM and its ablations on the protocol's
   ``pretrain_bundle``, and Models Genesis on its own bundle; all pre-train the fine-tuning bundle's UNet), until
   its probe plateaus (``probe.StopAtProbePlateau``: no gain above ``min_gain`` in ``patience`` probes) or
   ``max_epochs``. ``pretraining.overrides`` go to every method's bundle; an id a bundle lacks is not used.
5. **Recipe choice on the development set**: every candidate recipe of ``recipes`` (scratch's for scratch, the
   pre-trained ones for each pre-training) fine-tunes ``development.budget`` labelled volumes with each of the
   ``development.seeds``, for the fixed step budget ``steps`` (or the candidate's own ``steps``: the step budget
   is then chosen with the rest of the recipe); the candidate with the highest mean final Dice on the development
   set wins (ties within ``tie`` go to the one listed first). The test set is not read.
6. **Final runs**: scratch and each pre-training with its chosen recipe, at each of ``budgets`` labelled volumes
   and each of ``seeds``; a seed fixes the subset (nested: a smaller budget's volumes are among a larger one's)
   and the crops, for every initialisation. Each run trains its recipe's step budget and is scored at its end,
   once, with the bundle's own ``evaluate.json`` on the test set (original space, Dice per class and case), and
   records its development Dice at every 10 % of its steps (a learning curve).
7. **The frozen encoder's linear head**: the pre-training bundle's segmentation probe, fitted on the whole
   labelled pool and scored on the test set, for each pre-trained encoder and for the random one it started
   from. Where pre-training does not help fine-tuning, this says which part failed: an encoder whose features
   separate the organs no better than random ones learned nothing that fine-tuning could use.
8. **Report** (``results.md``, ``results.json``, ``results.png``: Dice against budget, probe curves): the gate; mean
   test Dice per budget; the steps each initialisation needs to reach 90 % of scratch's final development Dice and
   the speed-up over scratch; the difference to scratch paired by seed and test case with a 95 % bootstrap interval (seeds and
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

import numpy as np
import torch
from ignite.engine import Events

from monai.transforms import Compose
from monai.utils import set_determinism

from hybridmim_components.data import load_datalist, write_datalist
from hybridmim_components.dataset_check import require_valid_dataset
from hybridmim_components.preprocess import preprocess
from hybridmim_components.probe import StopAtProbePlateau, read_probe_log
from hybridmim_studies import curves, reports
from hybridmim_studies.runs import (bundle_configs, cost, finished, folder_name, parsed, read_json, result_path,
                                    resumable, run_workflow, score, write_json)
from hybridmim_studies.study_data import is_preprocessed, phantom_set

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
# the study resolution and widths (issue 35): at 3 x 3 x 4 mm a 64^3 crop holds most of an abdomen, and a BasicUNet
# of widths 16-128 learns most organs in a few hundred CPU steps; widths 8-64 did not (docs/defaults/)
STUDY_SPACING = [3.0, 3.0, 4.0]
STUDY_FEATURES = [16, 16, 32, 64, 128, 16]
PROTOCOL = {
    "bundle": "btcv_multiorgan_segmentation",
    "pretrain_bundle": "hybridmim_unet_pretrain",
    "methods": ["hybridmim", "reconstruction_only", "contrastive_only", "modelsgenesis"],
    "data": {"corpus": 200, "pool": 20, "development": 4, "test": 16, "phantom_shape": [144, 112, 80]},
    "pretraining": {"probe_interval": 2, "min_gain": 0.005, "patience": 3, "max_epochs": 60, "epoch_length": 25,
                    "overrides": {"pixdim": STUDY_SPACING, "features": STUDY_FEATURES, "roi_size": [64, 64, 64],
                                  "reconstruction_roi": [32, 32, 32]}},
    "steps": 600,
    "budgets": [1, 2, 5, 20],
    "seeds": [0, 1, 2],
    # before any pre-training: scratch must learn the task at the largest budget on the development set, or the
    # study stops (a study whose baseline does not learn measures nothing)
    "gate": {"budget": 20, "seed": 100, "recipe": {"learning_rate": 1e-2, "steps": 600}, "min_dice": 0.6,
             "min_classes_above_half": 9},
    "development": {"budget": 2, "seeds": [100, 101], "tie": 0.005,
                    "criterion": "mean over the development seeds of the final mean Dice on the development set"},
    # warmup_fraction and frozen_fraction are fractions of the run's epochs, so that the recipe means the same at
    # every budget; a recipe's "steps" replaces the step budget above for its runs (the step budget is chosen with
    # the rest of the recipe); the rest are the fine-tuning bundle's own settings. The learning rates are those the
    # BTCV demo's defaults were chosen among (docs/defaults/btcv_demo.json: 1e-2 learned 10 organs in 540 steps,
    # 3e-3 8)
    "recipes": {
        "scratch": {
            "lr 1e-2, 600 steps": {"learning_rate": 1e-2, "steps": 600},
            "lr 3e-3, 600 steps": {"learning_rate": 3e-3, "steps": 600},
            "lr 1e-2, 300 steps": {"learning_rate": 1e-2, "steps": 300},
        },
        "pretrained": {
            "all, lr 1e-2, 600 steps": {"transfer": "all", "learning_rate": 1e-2, "pretrained_learning_rate": 1e-2,
                                        "steps": 600},
            "all, lr 1e-2, 300 steps": {"transfer": "all", "learning_rate": 1e-2, "pretrained_learning_rate": 1e-2,
                                        "steps": 300},
            "decoder, lr 1e-2, 600 steps": {"transfer": "decoder", "learning_rate": 1e-2,
                                            "pretrained_learning_rate": 1e-2, "steps": 600},
            "linear, lr 1e-2, 300 steps": {"transfer": "linear", "learning_rate": 1e-2, "steps": 300},
        },
    },
    "finetune_overrides": {"num_workers": 0, "target_spacing": STUDY_SPACING, "features": STUDY_FEATURES,
                           "flip_axes": [], "rotate90_prob": 0.0},
}
RANDOM = "random encoder"


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
    """The study's protocol: written to ``protocol.json`` at the first call, and refused when it differs later.
    Without ``protocol``, a folder that has one keeps it (a study of an earlier default protocol still reports)."""
    path = os.path.join(output_dir, "protocol.json")
    if protocol is None and os.path.isfile(path):
        return read_json(path)
    if isinstance(protocol, str):
        protocol = read_json(protocol)
    wanted = merged(PROTOCOL, protocol or {})
    unknown = [m for m in wanted["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown} in the protocol; choose among {sorted(METHODS)}.")
    if os.path.isfile(path):
        recorded = read_json(path)
        if recorded != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
            raise ValueError(f"{path} fixes this study's protocol, and the one given differs in {changed}. A protocol "
                             "is fixed before its runs are seen: use another --output_dir for another protocol.")
        return recorded
    write_json(path, wanted)
    return wanted


def subset(items: list, count: int, seed: int) -> list:
    """``count`` items of a seeded permutation: a smaller count's items are among a larger one's."""
    if count > len(items):
        raise ValueError(f"a budget of {count} labelled volumes needs a pool of at least {count}; it has {len(items)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:count]]


def recipe_overrides(recipe: dict, max_epochs: int) -> dict:
    """A recipe as the bundle's settings: the warm-up and frozen fractions in epochs of this run (its ``steps``
    is the run's length, not a bundle setting)."""
    settings = {k: v for k, v in recipe.items() if k not in ("warmup_fraction", "frozen_fraction", "steps")}
    if recipe.get("warmup_fraction"):
        settings["pretrained_warmup_epochs"] = max(1, round(recipe["warmup_fraction"] * max_epochs))
    if recipe.get("frozen_fraction"):
        settings["frozen_epochs"] = max(1, round(recipe["frozen_fraction"] * max_epochs))
    return settings


class LabelEfficiencyStudy:
    """One study: its folder and the protocol fixed there; each stage a method, each run resumable."""

    def __init__(self, output_dir: str, protocol: str | dict | None = None):
        self.output_dir = output_dir
        self.protocol = fixed_protocol(output_dir, protocol)
        self.inits = ["scratch", *self.protocol["methods"]]

    # ---- where each run lives ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    def pretraining_root(self, method: str) -> str:
        return self.path("pretrain", method)

    def pretrained_weights(self, method: str) -> str:
        return self.path("pretrain", method, "models", "model.pt")

    def linear_head_root(self, encoder: str) -> str:
        return self.path("linear_head", folder_name(encoder))

    def development_root(self, init: str, name: str, seed: int) -> str:
        return self.path("development", init, folder_name(name), f"seed_{seed}")

    def final_root(self, init: str, budget: int, seed: int) -> str:
        return self.path("final", init, f"budget_{budget}", f"seed_{seed}")

    # ---- 1, 2: data -----------------------------------------------------------------------------------------
    def phantoms(self, name: str) -> str:
        data = self.protocol["data"]
        return phantom_set(self.path("data", name), name, data[name], self.protocol["bundle"], data["phantom_shape"])

    def data(self, labelled=None, development=None, test=None) -> dict:
        """The labelled sets' items: ``pool``, ``development`` and ``test``. The corpus is the fourth
        (``corpus_manifest``), made only while a pre-training has not finished."""
        parser = parsed(bundle_configs(self.protocol["bundle"]), self.protocol["finetune_overrides"])
        labels, channels = parser.get_parsed_content("label_values"), parser.get_parsed_content("in_channels")
        sources = {"pool": labelled, "development": development, "test": test}
        sets = {}
        for name, source in sources.items():
            # checked once here, as the bundle would: the runs' own datalists then only list these items again
            source = require_valid_dataset(source or self.phantoms(name), labels, channels)
            sets[name] = load_datalist(source)
        images = {name: {json.dumps(item["image"]) for item in items} for name, items in sets.items()}
        for a, b in (("pool", "development"), ("pool", "test"), ("development", "test")):
            if images[a] & images[b]:
                raise ValueError(f"the {a} and {b} sets share {len(images[a] & images[b])} images; they must be "
                                 "disjoint.")
        return sets

    def corpus_manifest(self, corpus: str) -> str:
        """A preprocessed corpus as it is; any other source preprocessed once, through the pre-training bundle's
        loading chain, into ``<output_dir>/corpus``."""
        if is_preprocessed(corpus):
            return corpus
        target = self.path("corpus")
        parser = parsed(bundle_configs(self.protocol["pretrain_bundle"]), self.protocol["pretraining"]["overrides"])
        preprocess([corpus], target, Compose(parser.get_parsed_content("load_and_scale")), quiet=True)
        return target

    # ---- 2b: does scratch learn? ----------------------------------------------------------------------------
    def check_gate(self, sets: dict) -> dict | None:
        """Before any pre-training: scratch, with the gate's recipe, at the gate's budget, scored per class on the
        development set. Raises when it stays below the protocol's ``min_dice`` or segments fewer than
        ``min_classes_above_half`` classes above 0.5: fix fine-tuning first. ``None`` for a protocol without gate."""
        gate = self.protocol.get("gate")
        if not gate:
            return None
        root = self.path("gate")
        if finished(root) is None:
            print(f"=== gate: scratch, {gate['budget']} labelled, on the development set", flush=True)
        result = self.finetune(root, subset(sets["pool"], gate["budget"], gate["seed"]), sets["development"],
                               gate["recipe"], gate["seed"], "", test=sets["development"])
        verdict = gate_verdict(gate, result["test"])
        if not verdict["passed"]:
            raise RuntimeError(
                f"the gate failed: scratch at {gate['budget']} labelled volumes reaches {verdict['dice']:.3f} mean "
                f"Dice on the development set with {verdict['above_half']} classes above 0.5 (needed: "
                f"{gate['min_dice']} and {gate['min_classes_above_half']}); per class: "
                + ", ".join(f"{k} {v:.2f}" for k, v in verdict["classes"].items())
                + f". A study whose baseline does not learn measures nothing: fix the fine-tuning recipe first (its run "
                f"is in {root}).")
        return verdict

    # ---- 3: pre-training ------------------------------------------------------------------------------------
    def pretraining_bundle(self, method: str) -> tuple[list[str], dict]:
        """The configs that pre-train ``method`` and their overrides: the protocol's, then the method's."""
        bundle, method_overrides = METHODS[method]
        configs = bundle_configs(bundle or self.protocol["pretrain_bundle"])
        return configs, {"seed": 0, "num_workers": 0, **self.protocol["pretraining"]["overrides"], **method_overrides}

    def pretrain(self, method: str, manifest: str) -> dict:
        """Pre-train ``method`` until its probe plateaus; its ``result.json``: checkpoint, probe curve, steps, cost."""
        root = self.pretraining_root(method)
        done = finished(root)
        if done is not None:
            return done
        settings = self.protocol["pretraining"]
        configs, overrides = self.pretraining_bundle(method)
        overrides = {"manifest": manifest, "max_epochs": settings["max_epochs"],
                     "epoch_length": settings["epoch_length"], "probe_interval": settings["probe_interval"], **overrides}
        resume = resumable(root)
        print(f"=== pre-training {method}" + (" (resumed)" if resume else ""), flush=True)
        probe_log = os.path.join(root, "runs", "probe.jsonl")

        def stop_at_plateau(workflow):
            trainer = workflow.parser.get_parsed_content("train#trainer")
            StopAtProbePlateau(probe_log, settings["min_gain"], settings["patience"]).attach(trainer)

        with cost() as spent:
            workflow = run_workflow(configs, root, "train", before_run=stop_at_plateau, resume=resume, **overrides)
        state = workflow.parser.get_parsed_content("train#trainer").state
        result = {"steps": state.iteration, "epochs": state.epoch,
                  "probe": [(r["epoch"], r["dice"]) for r in read_probe_log(probe_log)], **spent}
        write_json(result_path(root), result)
        return result

    # ---- 4, 5: fine-tuning ----------------------------------------------------------------------------------
    def finetune(self, root: str, train: list, validation: list, recipe: dict, seed: int, pretrained: str = "",
                 test: list | None = None) -> dict:
        """One fine-tuning run on ``train`` for the recipe's ``steps`` (the protocol's ``steps`` where the recipe
        names none), validated once at its end on ``validation``; with ``test``, the final model is then scored by
        the bundle's ``evaluate.json``."""
        done = finished(root)
        if done is not None:
            return done
        bundle = self.protocol["bundle"]
        overrides = dict(self.protocol["finetune_overrides"])
        per_epoch = math.ceil(len(train) / overrides.get("batch_size", 1))
        max_epochs = math.ceil(recipe.get("steps", self.protocol["steps"]) / per_epoch)
        datalist = write_datalist(os.path.join(root, "datalist.json"), train, validation)
        overrides.update(dataset_dir=datalist, dataset_check="off", label_fraction=1.0, seed=seed,
                         pretrained=pretrained, max_epochs=max_epochs, val_interval=max_epochs,
                         **recipe_overrides(recipe, max_epochs))
        history, crops = [], []

        def record(workflow):
            curves.add_learning_curve(workflow)  # first: nothing of the trainer may be resolved before it
            trainer = workflow.parser.get_parsed_content("train#trainer")
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
            evaluator.add_event_handler(Events.EPOCH_COMPLETED,
                                        lambda e: history.append(float(e.state.metrics["val_mean_dice"])))
            trainer.add_event_handler(Events.ITERATION_STARTED,
                                      lambda e: crops.append(float(e.state.batch["image"].double().sum())))

        with cost() as spent:
            workflow = run_workflow(bundle_configs(bundle), root, "train", before_run=record, **overrides)
        result = {"train": [json.dumps(item["image"]) for item in train],
                  "steps": workflow.parser.get_parsed_content("train#trainer").state.iteration,
                  "epochs": max_epochs, "validation_dice": history[-1], "crops": crops, **spent,
                  # the development Dice at every 10 % of the run, by steps
                  "curve": [[epoch * per_epoch, dice] for epoch, dice in curves.read_curve(root)]}
        if test is not None:
            tested = write_datalist(os.path.join(root, "test_datalist.json"), test, test)
            network = {k: v for k, v in overrides.items() if k not in ("pretrained", "dataset_dir")}
            with cost() as spent:
                result["test"] = score(bundle, root, **network, dataset_dir=tested)["val_mean_dice"]["cases"]
            result["test_cpu_seconds"] = spent["cpu_seconds"]
        write_json(result_path(root), result)
        return result

    def candidates(self, init: str) -> dict:
        return self.protocol["recipes"]["scratch" if init == "scratch" else "pretrained"]

    def choose_recipes(self, sets: dict) -> dict:
        """Run every candidate on the development set and choose one per initialisation (the protocol's criterion)."""
        dev = self.protocol["development"]
        for init in self.inits:
            for name, recipe in self.candidates(init).items():
                for seed in dev["seeds"]:
                    root = self.development_root(init, name, seed)
                    if finished(root) is None:
                        print(f"=== development: {init}, {name}, seed {seed}", flush=True)
                    self.finetune(root, subset(sets["pool"], dev["budget"], seed), sets["development"], recipe, seed,
                                  self.checkpoint(init))
        choice = self.development_choice()
        write_json(self.path("choice.json"), choice)
        return choice

    def checkpoint(self, init: str) -> str:
        """The weights an initialisation fine-tunes from: none for scratch."""
        return "" if init == "scratch" else self.pretrained_weights(init)

    def development_choice(self) -> dict:
        """Per initialisation, the development scores of the candidates whose runs have all finished and, once
        every candidate has, the chosen one (the best mean, a tie within ``tie`` to the one listed first). Before
        that, ``chosen`` is ``None``: a choice among the finished candidates alone could differ from the final one."""
        dev = self.protocol["development"]
        choice: dict = {}
        for init in self.inits:
            candidates, scores = self.candidates(init), {}
            for name in candidates:
                runs = [finished(self.development_root(init, name, seed)) for seed in dev["seeds"]]
                if all(run is not None for run in runs):
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

    # ---- 6: the frozen encoder's linear head ----------------------------------------------------------------
    def linear_head(self, encoder: str, sets: dict) -> dict | None:
        """The segmentation probe of the pre-training bundle (``probe.SegmentationProbe``: a linear head on the
        frozen encoder's features) fitted on every volume of the labelled pool and scored on the test set, for the
        encoder that the method ``encoder`` pre-trained, or for ``RANDOM``: the first method's network at the
        initialisation its pre-training started from (the same seed). ``None`` for a task whose labels are not the
        classes 0..K-1 (BraTS's 0, 1, 2, 4), which the probe does not map."""
        root = self.linear_head_root(encoder)
        done = finished(root)
        if done is not None:
            return done
        task = parsed(bundle_configs(self.protocol["bundle"]))
        values, names = task.get_parsed_content("label_values"), task.get_parsed_content("class_names")
        if values != list(range(len(values))):
            return None
        print(f"=== linear head on the frozen encoder: {encoder}", flush=True)
        with cost() as spent:
            configs, overrides = self.pretraining_bundle(self.protocol["methods"][0] if encoder == RANDOM else encoder)
            fit_and_test = write_datalist(os.path.join(root, "datalist.json"), sets["pool"] + sets["test"])
            parser = parsed(configs, {**overrides, "bundle_root": root, "probe_datalist": fit_and_test,
                                      "probe_num_classes": len(values),
                                      "probe_class_names": names[1:] if len(names) == len(values) else None,
                                      "probe#handler#held_out": len(sets["test"]), "probe#handler#log_file": None})
            set_determinism(seed=overrides["seed"])  # as the pre-training's initialize does, before its network
            backbone = parser.get_parsed_content("backbone")
            if encoder != RANDOM:
                backbone.load_state_dict(torch.load(self.pretrained_weights(encoder), map_location="cpu",
                                                    weights_only=True))
            result = parser.get_parsed_content("probe#handler").measure()
        result.update(fitted_on=len(sets["pool"]), scored_on=len(sets["test"]), **spent)
        write_json(result_path(root), result)
        return result

    # ---- the whole protocol ---------------------------------------------------------------------------------
    def run(self, labelled=None, development=None, test=None, corpus=None, report_only: bool = False) -> dict:
        """Run (or, with ``report_only``, only report) the protocol's stages; return ``results.json``'s content."""
        started = time.perf_counter()
        pretrainings, finals, missing = {}, {}, []
        choice = read_json(self.path("choice.json")) if os.path.isfile(self.path("choice.json")) else {}
        if not report_only:
            sets = self.data(labelled, development, test)
            self.check_gate(sets)
            # a study resumed in a fresh checkout (the data is not committed) needs no corpus once its
            # pre-trainings ran
            manifest = ""
            if not all(finished(self.pretraining_root(m)) for m in self.protocol["methods"]):
                manifest = self.corpus_manifest(corpus or self.phantoms("corpus"))
            for method in self.protocol["methods"]:
                pretrainings[method] = self.pretrain(method, manifest)
            for encoder in (RANDOM, *self.protocol["methods"]):
                self.linear_head(encoder, sets)
            choice = choice or self.choose_recipes(sets)
        elif not choice:  # the development stage has not finished: its finished runs, nothing chosen yet
            choice = self.development_choice()
        for seed in self.protocol["seeds"]:
            for budget in self.protocol["budgets"]:
                for init in self.inits:
                    root = self.final_root(init, budget, seed)
                    result = finished(root)
                    if result is None and report_only:
                        missing.append(f"{init}, {budget} labelled, seed {seed}")
                        continue
                    if result is None:
                        print(f"=== final: {init}, {budget} labelled, seed {seed}", flush=True)
                        result = self.finetune(root, subset(sets["pool"], budget, seed), sets["development"],
                                               choice[init]["recipe"], seed, self.checkpoint(init), sets["test"])
                    finals.setdefault(init, {}).setdefault(str(budget), {})[str(seed)] = result
        for method in self.protocol["methods"]:
            if method not in pretrainings and (done := finished(self.pretraining_root(method))) is not None:
                pretrainings[method] = done
        heads = {e: head for e in (RANDOM, *self.protocol["methods"])
                 if (head := finished(self.linear_head_root(e))) is not None}
        report = self.report(pretrainings, choice, finals, heads)
        if missing:
            print(f"{len(missing)} final runs not done yet:", *missing, sep="\n  ", flush=True)
        print(f"this call: {time.perf_counter() - started:.0f} s", flush=True)
        return report

    # ---- 7: report ------------------------------------------------------------------------------------------
    def report(self, pretrainings: dict, choice: dict, finals: dict, heads: dict) -> dict:
        summary = summarise(self.protocol, pretrainings, choice, finals)
        gate_run = finished(self.path("gate"))
        if self.protocol.get("gate") and gate_run is not None:
            summary["gate"] = gate_verdict(self.protocol["gate"], gate_run["test"])
            summary["cpu_hours"]["gate"] = (gate_run["cpu_seconds"] + gate_run.get("test_cpu_seconds", 0)) / 3600
        report = {"protocol": self.protocol, "pretrainings": pretrainings, "choice": choice, "finals": finals,
                  "linear_heads": heads, "summary": summary}
        write_json(self.path("results.json"), report)
        markdown = table(self.protocol, summary, choice, pretrainings, heads)
        with open(self.path("results.md"), "w") as f:
            f.write(markdown)
        if finals:
            plot(self.protocol, summary, pretrainings, self.path("results.png"))
        print(markdown)
        return report


def summarise(protocol: dict, pretrainings: dict, choice: dict, finals: dict) -> dict:
    inits = ["scratch", *protocol["methods"]]
    summary: dict = {"dice": {}, "vs_scratch": {}, "organs": {}}
    for budget in map(str, protocol["budgets"]):
        row, diff, organs = {}, {}, {}
        for init in inits:
            runs = finals.get(init, {}).get(budget, {})
            if not runs:
                continue
            per_seed = [float(np.mean(list(reports.case_dice(r["test"]).values()))) for r in runs.values()]
            row[init] = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1
                         else 0.0, "n": len(per_seed)}
            organs[init] = reports.per_class(r["test"] for r in runs.values())
            scratch = finals.get("scratch", {}).get(budget, {})
            if init != "scratch" and set(runs) & set(scratch):
                diff[init] = reports.paired_difference({s: r["test"] for s, r in runs.items()},
                                                       {s: r["test"] for s, r in scratch.items()})
        summary["dice"][budget], summary["vs_scratch"][budget], summary["organs"][budget] = row, diff, organs
    summary["convergence"] = convergence(protocol, finals)
    probe = {m: pretrainings[m]["probe"][-1][1] for m in protocol["methods"] if m in pretrainings}
    tuned = {m: float(np.mean([summary["dice"][b][m]["mean"] for b in summary["dice"] if m in summary["dice"][b]]))
             for m in probe if any(m in summary["dice"][b] for b in summary["dice"])}
    probe_ranks, tuned_ranks = reports.ranks(probe), reports.ranks(tuned)
    summary["ranking"] = {m: {"probe": probe[m], "probe_rank": probe_ranks[m], "finetuned": tuned.get(m),
                              "finetuned_rank": tuned_ranks.get(m)} for m in probe}
    spent = {"pretraining": sum(p["cpu_seconds"] for p in pretrainings.values()),
             "development": sum(s["cpu_seconds"] for c in choice.values() for s in c["scores"].values()),
             "final": sum(r["cpu_seconds"] + r.get("test_cpu_seconds", 0) for i in finals.values()
                          for b in i.values() for r in b.values())}
    summary["cpu_hours"] = {k: v / 3600 for k, v in spent.items()}
    return summary


def gate_verdict(gate: dict, cases: list[dict]) -> dict:
    """The gate's numbers from the development cases: mean Dice, per class, classes above 0.5, passed or not."""
    summary = reports.dice_summary(cases)
    return {**summary, "passed": summary["dice"] >= gate["min_dice"]
            and summary["above_half"] >= gate["min_classes_above_half"]}


def convergence(protocol: dict, finals: dict) -> dict:
    """Per budget: the target (90 % of scratch's final development Dice, its curve's mean over seeds) and, per
    initialisation with curves, the steps its mean curve needs to reach it and the speed-up over scratch (the MIM
    study's convergence measure). Runs made before the tool kept curves have none and are left out."""
    out: dict = {}
    for budget in map(str, protocol["budgets"]):
        mean = {}
        for init, by_budget in finals.items():
            runs = list(by_budget.get(budget, {}).values())
            if runs and all(r.get("curve") for r in runs):
                mean[init] = curves.mean_curve([r["curve"] for r in runs])
        if not mean.get("scratch"):
            continue
        target = 0.9 * mean["scratch"][-1][1]
        reach = {init: curves.epochs_to_reach(curve, target) for init, curve in mean.items()}
        out[budget] = {"target": target, "curves": mean, "steps": reach,
                       "vs_scratch": {i: curves.speed_up(reach["scratch"], n) for i, n in reach.items()}}
    return out


def table(protocol: dict, summary: dict, choice: dict, pretrainings: dict, heads: dict) -> str:
    inits = ["scratch", *protocol["methods"]]
    lines = []
    if "gate" in summary:
        gate, verdict = protocol["gate"], summary["gate"]
        lines += ["## The gate: does scratch learn?", "",
                  f"Scratch at {gate['budget']} labelled volumes ({gate['recipe']}), scored on the development set "
                  f"before any pre-training: mean Dice {verdict['dice']:.3f}, {verdict['above_half']} classes above 0.5 "
                  f"(needed: {gate['min_dice']} and {gate['min_classes_above_half']}): "
                  + ("passed." if verdict["passed"] else "failed."), "",
                  *reports.table_header("class", ["development Dice"]),
                  *(reports.table_row(k, [f"{v:.3f}"]) for k, v in verdict["classes"].items()), ""]
    lines += ["## Test Dice", "", *reports.table_header("labelled volumes", inits)]
    for budget, row in summary["dice"].items():
        lines.append(reports.table_row(budget, [f"{row[i]['mean']:.3f} ± {row[i]['std']:.3f} (n={row[i]['n']})"
                                                if i in row else "–" for i in inits]))
    lines += ["", "Mean test Dice over the foreground classes and test cases, mean ± sample standard deviation over "
              "seeds (n), each run scored once at the end of its step budget.", "",
              "## Difference to scratch, paired by seed and test case", "",
              *reports.table_header("labelled volumes", inits[1:])]
    for budget, row in summary["vs_scratch"].items():
        lines.append(reports.table_row(budget, [
            f"{row[i]['mean']:+.3f} [{row[i]['low']:+.3f}, {row[i]['high']:+.3f}]" if i in row else "–"
            for i in inits[1:]]))
    lines += ["", "Pre-trained minus scratch test Dice, mean over seeds × test cases, with a 95 % bootstrap interval "
              "(seeds and cases resampled).", "", "## Dice per organ", ""]
    for budget, organs in summary["organs"].items():
        names = sorted({o for per in organs.values() for o in per})
        present = [i for i in inits if i in organs]
        lines += [f"{budget} labelled volumes:", "", *reports.table_header("organ", present)]
        lines += [reports.table_row(o, [f"{organs[i].get(o, float('nan')):.3f}" for i in present]) for o in names]
        lines.append("")
    if summary.get("convergence"):
        lines += ["## Convergence: steps to 90 % of scratch's final development Dice", "",
                  *reports.table_header("labelled volumes", ["target", *inits])]
        for budget, c in summary["convergence"].items():
            cells = []
            for init in inits:
                steps, faster = c["steps"].get(init), c["vs_scratch"].get(init)
                cells.append("–" if init not in c["steps"] else "not reached" if steps is None
                             else f"{steps} ({faster:.2f}×)" if faster is not None else str(steps))
            lines.append(reports.table_row(budget, [f"{c['target']:.3f}", *cells]))
        lines += ["", "Each run's development Dice at every 10 % of its step budget, averaged over seeds; the first "
                  "measured step at which the mean curve reaches the target, and in brackets the speed-up over "
                  "scratch (scratch's steps over the initialisation's; the MIM study reports 1.40× for masked image "
                  "modeling over naive contrastive learning). The measured points are 10 % of a budget apart: a "
                  "speed-up is known to that resolution.", ""]
    lines += ["## The probe's ranking against fine-tuning", "",
              *reports.table_header("pre-training", ["steps", "final probe Dice (rank)",
                                                     "mean test Dice over budgets (rank)"])]
    for method, r in summary["ranking"].items():
        tuned = f"{r['finetuned']:.3f} ({r['finetuned_rank']})" if r["finetuned"] is not None else "–"
        lines.append(reports.table_row(method, [str(pretrainings[method]["steps"]),
                                                f"{r['probe']:.3f} ({r['probe_rank']})", tuned]))
    if heads:
        lines += ["", "## The frozen encoder's linear head, on the test set", "",
                  *reports.table_header("encoder", ["test Dice of the linear head", "against the random encoder"])]
        for encoder, head in heads.items():
            against = f"{head['dice'] - heads[RANDOM]['dice']:+.3f}" if RANDOM in heads and encoder != RANDOM else "–"
            lines.append(reports.table_row(encoder, [f"{head['dice']:.3f}", against]))
        fitted = next(iter(heads.values()))
        lines += ["", f"The segmentation probe of the pre-training bundle, fitted on the {fitted['fitted_on']} volumes "
                  f"of the labelled pool and scored on the {fitted['scored_on']} test volumes (mean over the classes of "
                  "the Dice pooled over their crops); the random encoder is the initialisation the pre-trainings "
                  "started from."]
    dev = protocol["development"]
    lines += ["", "## The recipe chosen on the development set", "",
              f"Criterion, fixed before the runs: {dev['criterion']}, at {dev['budget']} labelled volumes, seeds "
              f"{dev['seeds']}, {protocol['steps']} steps unless a candidate names its own; ties within {dev['tie']} "
              "go to the candidate listed first.",
              "", *reports.table_header("initialisation", ["candidate", "development Dice", "chosen"])]
    for init, c in choice.items():
        for name, s in c["scores"].items():
            lines.append(reports.table_row(init, [name, f"{s['dice']:.3f}", "yes" if name == c["chosen"] else ""]))
        if c["chosen"] is None:
            lines.append(f"| {init} | ({c.get('candidates', '?')} candidates; {len(c['scores'])} finished) | | "
                         "pending |")
    hours = summary["cpu_hours"]
    lines += ["", "## Cost", "", "CPU-hours: " + (f"gate {hours['gate']:.2f}, " if "gate" in hours else "")
              + f"pre-training {hours['pretraining']:.2f}, development "
              f"{hours['development']:.2f}, final runs and their tests {hours['final']:.2f}, in all "
              f"{sum(hours.values()):.2f}.", ""]
    return "\n".join(lines)


def plot(protocol: dict, summary: dict, pretrainings: dict, path: str) -> None:
    """Test Dice against labelled volumes (mean ± std over seeds), and each pre-training's probe curve."""
    by_budget = []
    for init in ["scratch", *protocol["methods"]]:
        points = [(int(b), row[init]) for b, row in summary["dice"].items() if init in row]
        if points:
            by_budget.append((init, [b for b, _ in points], [s["mean"] for _, s in points],
                              [s["std"] for _, s in points]))
    probes = [(method, [e for e, _ in r["probe"]], [d for _, d in r["probe"]], None)
              for method, r in pretrainings.items()]
    reports.curves_figure(path, [
        {"series": by_budget, "xscale": "log", "xlabel": "labelled volumes",
         "ylabel": "test Dice (mean ± std over seeds)"},
        {"series": probes, "marker": ".", "xlabel": "pre-training epoch", "ylabel": "probe Dice"},
    ])


def main(output_dir: str = "runs/label_efficiency", protocol: str | dict | None = None, labelled: str | None = None,
         development: str | None = None, test: str | None = None, corpus: str | None = None,
         report_only: bool = False) -> dict:
    """Run (or, with ``report_only``, only report) the protocol's stages; return ``results.json``'s content."""
    study = LabelEfficiencyStudy(output_dir, protocol)
    return study.run(labelled, development, test, corpus, report_only)
