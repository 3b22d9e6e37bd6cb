"""The label-efficiency study: does pre-training help with few labels, and does it speed up fine-tuning?

    python tools/label_efficiency.py --output_dir runs/label_efficiency \
        --methods "[hybridmim,reconstruction_only,contrastive_only]" --fractions "[0.1,0.2,0.5,1.0]" --seeds "[0,1,2]"

1. Pre-trains ``hybridmim_unet_pretrain`` once per method, on CT phantoms of other subjects (seeds from 1000)
   than the fine-tuning phantoms, so that no validation case is seen in pre-training:
   - ``hybridmim``: all five terms (the bundle's defaults);
   - ``reconstruction_only``: HybridMIM with only L_rec (plain masked reconstruction on the same UNet);
   - ``contrastive_only``: HybridMIM with only L_con (the dropout-view contrastive term on the same UNet).
2. Fine-tunes the bundle (default ``msd_spleen_segmentation``) from scratch and from each checkpoint, at each
   label fraction and seed. A seed fixes the split, the labelled subset and the crops, the same for every
   initialisation. Label fractions are nested: the cases of a smaller fraction are among those of a larger one.
3. Reports the mean and standard deviation over seeds of the final validation Dice, its difference to scratch
   paired by seed, the epochs to reach 90 % of a run's own final Dice, and the convergence speed-up against
   scratch (the WACV study's 1.40x claim).

Every run is a bundle run (``ConfigWorkflow``), so it follows exactly the bundles' recipes. Resumable: each
run writes ``result.json`` when it ends, and a rerun skips the runs that have one (and pre-trainings whose
``models/model.pt`` exists, which only a completed run writes). After each run the report is rewritten:
``results.json`` (every validation of every run), ``results.md`` (the tables), ``dice_vs_fraction.png`` and
``val_dice_vs_epoch.png``. ``--report_only True`` runs nothing: it reports the finished runs and lists the rest,
for a study spread over several sessions (or run a subset first, e.g. ``--fractions "[0.1,0.2]"``).
"""

from __future__ import annotations

import json
import os
import time

import fire
import numpy as np
from ignite.engine import Events

from monai.bundle import ConfigWorkflow

from hybridmim_components.phantoms import ensure_brain_phantoms, ensure_ct_phantoms, write_ct_phantoms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_SEED = 1000  # first seed of the pre-training phantoms
PHANTOM_TASKS = {"msd_spleen_segmentation": "spleen", "msd_liver_segmentation": "liver",
                 "btcv_multiorgan_segmentation": "btcv"}
NO_TERMS = {"count_weight": 0, "location_weight": 0, "consistency_weight": 0}
METHODS = {
    "hybridmim": {},
    "reconstruction_only": {f"loss#{k}": v for k, v in {**NO_TERMS, "contrastive_weight": 0}.items()},
    "contrastive_only": {f"loss#{k}": v for k, v in {**NO_TERMS, "reconstruction_weight": 0}.items()},
}


def run_bundle(bundle: str, bundle_root: str, overrides: dict, record: str | None = None) -> dict:
    """Run a bundle's training. When ``record`` names a metric, return its ``history``, ``(epoch, metric)`` after
    every validation, and ``crops``, a checksum of every training batch: runs of one seed must agree on these
    whatever their initialisation, which is what makes the comparison paired."""
    workflow = ConfigWorkflow(
        config_file=os.path.join(REPO, "bundles", bundle, "configs", "train.json"),
        workflow_type="train",
        bundle_root=bundle_root,
        **overrides,
    )
    workflow.initialize()
    history: list[tuple[int, float]] = []
    crops: list[float] = []
    if record:
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        evaluator.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: history.append((trainer.state.epoch, float(e.state.metrics[record])))
        )
        trainer.add_event_handler(
            Events.ITERATION_STARTED, lambda e: crops.append(float(e.state.batch["image"].double().sum()))
        )
    workflow.run()
    workflow.finalize()
    return {"history": history, "crops": crops}


def epochs_to(history: list, fraction_of_final: float = 0.9, final: float | None = None) -> int | None:
    """First epoch whose validation Dice reaches ``fraction_of_final`` of ``final`` (by default the run's own
    final Dice); None if it never does."""
    level = fraction_of_final * (history[-1][1] if final is None else final)
    return next((epoch for epoch, value in history if value >= level), None)


def _write_json(path: str, content) -> None:
    """Write to a temporary name, then rename: a run stopped while writing leaves no half file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single run, which has no spread to estimate."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: dict, inits: list[str], fractions: list[str]) -> dict:
    """Per fraction and initialisation: final Dice mean and std over seeds, epochs to 90 %, speed-up, and the
    difference to scratch paired by seed (a seed fixes the split, subset and crops, so pairing removes their
    share of the spread)."""
    summary = {}
    for fraction in fractions:
        row = {}
        for init in inits:
            done = runs.get(init, {}).get(fraction, {})
            if not done:
                continue
            finals = [r["final"] for r in done.values()]
            epochs = [epochs_to(r["history"]) for r in done.values()]
            row[init] = {"n": len(done), "final_mean": float(np.mean(finals)), "final_std": _std(finals),
                         "epochs_to_90": float(np.mean(epochs))}
        scratch = runs.get("scratch", {}).get(fraction, {})
        if "scratch" in row:  # every other initialisation against scratch; scratch against itself says nothing
            for init, stats in ((i, st) for i, st in row.items() if i != "scratch"):
                stats["speed_up"] = row["scratch"]["epochs_to_90"] / stats["epochs_to_90"]
                seeds = [seed for seed in runs[init][fraction] if seed in scratch]
                if seeds:
                    paired = [runs[init][fraction][seed]["final"] - scratch[seed]["final"] for seed in seeds]
                    # a lower plateau is reached sooner, so speed is also measured against scratch's own level
                    reach = [epochs_to(runs[init][fraction][seed]["history"], final=scratch[seed]["final"])
                             for seed in seeds]
                    reached = [e for e in reach if e is not None]
                    stats.update(vs_scratch_n=len(paired), vs_scratch_mean=float(np.mean(paired)),
                                 vs_scratch_std=_std(paired), reaches_scratch_90=len(reached),
                                 epochs_to_scratch_90=float(np.mean(reached)) if reached else None)
        summary[fraction] = row
    return summary


def _table(summary: dict, inits: list[str], needs: str, cell, caption: str) -> str:
    """One markdown table, a row per label fraction: ``cell(stats)`` for each initialisation whose stats have
    ``needs``, "–" for the others, with ``caption`` below it."""
    lines = ["| label fraction | " + " | ".join(inits) + " |", "| --- |" + " --- |" * len(inits)]
    for fraction, row in summary.items():
        cells = [cell(row[i]) if needs in row.get(i, {}) else "–" for i in inits]
        lines.append(f"| {fraction} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", caption])


def _reached(stats: dict) -> str:
    epochs = stats["epochs_to_scratch_90"]
    return f"{stats['reaches_scratch_90']}/{stats['vs_scratch_n']}" + (f", {epochs:.1f}" if epochs is not None else "")


def table(summary: dict, inits: list[str]) -> str:
    tables = [
        _table(summary, inits, "final_mean", lambda s: f"{s['final_mean']:.3f} ± {s['final_std']:.3f} (n={s['n']})",
               "Final validation Dice, mean ± sample standard deviation over seeds (n runs)."),
        _table(summary, inits, "epochs_to_90",
               lambda s: f"{s['epochs_to_90']:.1f}" + (f" ({s['speed_up']:.2f}×)" if "speed_up" in s else ""),
               "Epochs to reach 90 % of the run's own final Dice, mean over seeds (speed-up against scratch)."),
        _table(summary, inits[1:], "vs_scratch_n",
               lambda s: f"{s['vs_scratch_mean']:+.3f} ± {s['vs_scratch_std']:.3f} (n={s['vs_scratch_n']})",
               "Final Dice minus scratch's final Dice with the same seed, mean ± sample standard deviation "
               "over the seeds both have."),
        _table(summary, inits[1:], "vs_scratch_n", _reached,
               "Runs that reach 90 % of scratch's final Dice with the same seed, and their mean epochs to it."),
    ]
    return "\n\n".join(tables) + "\n"


def plot(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, inits, fractions = results["summary"], results["inits"], list(results["summary"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for init in inits:
        points = [(float(f), summary[f][init]) for f in fractions if init in summary[f]]
        if points:
            ax.errorbar([p for p, _ in points], [s["final_mean"] for _, s in points],
                        yerr=[s["final_std"] for _, s in points], marker="o", capsize=3, label=init)
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("final validation Dice (mean ± std over seeds)")
    ax.set_title(results["bundle"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "dice_vs_fraction.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.5), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        for init in inits:
            done = list(results["runs"].get(init, {}).get(fraction, {}).values())
            if done:
                epochs = [e for e, _ in done[0]["history"]]
                ax.plot(epochs, np.mean([[v for _, v in r["history"]] for r in done], axis=0), label=init)
        ax.set_title(f"label fraction {fraction}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "val_dice_vs_epoch.png"), dpi=100)
    plt.close(fig)


def write_report(output_dir: str, bundle: str, inits: list[str], seeds: list[int], fractions: list[str],
                 runs: dict) -> dict:
    """Rewrite ``results.json`` and ``results.md`` from the finished runs; return the report."""
    report = {"bundle": bundle, "inits": inits, "seeds": seeds, "runs": runs,
              "summary": summarise(runs, inits, fractions),
              "run_seconds": sum(r["seconds"] for f in runs.values() for s in f.values() for r in s.values())}
    _write_json(os.path.join(output_dir, "results.json"), report)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table(report["summary"], inits))
    return report


def main(
    output_dir: str = "runs/label_efficiency",
    bundle: str = "msd_spleen_segmentation",
    methods: tuple[str, ...] = ("hybridmim", "reconstruction_only", "contrastive_only"),
    fractions: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0),
    seeds: tuple[int, ...] = (0, 1, 2),
    pretrain_overrides: dict | None = None,
    finetune_overrides: dict | None = None,
    report_only: bool = False,
) -> dict:
    """Pre-train each method (unless done), fine-tune every (initialisation, fraction, seed) not yet done, and
    report; returns the report of ``results.json``. With ``report_only``, nothing runs: the report covers the
    finished runs, and the missing ones are listed (useful while a study is spread over several sessions)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose among {sorted(METHODS)}.")
    started = time.perf_counter()
    pretrain_overrides = dict(pretrain_overrides or {})
    if "dataset_dir" not in pretrain_overrides and not report_only:
        # other subjects than the fine-tuning phantoms (seeds 0..11), so no validation case is pre-trained on
        data = os.path.join(output_dir, "pretrain_data")
        if not os.path.isfile(os.path.join(data, "dataset.json")):
            write_ct_phantoms(data, num_subjects=12, seed=PRETRAIN_SEED)
        pretrain_overrides["dataset_dir"] = data
    checkpoints = {}
    for method in methods:
        root = os.path.join(output_dir, "pretrain", method)
        checkpoints[method] = os.path.join(root, "models", "model.pt")
        if os.path.isfile(checkpoints[method]):
            print(f"=== pre-training {method}: done, skipped", flush=True)
            continue
        if report_only:
            continue
        print(f"=== pre-training {method}", flush=True)
        run_bundle("hybridmim_unet_pretrain", root, {"seed": 0, **pretrain_overrides, **METHODS[method]})

    # validation every 2 epochs: the epochs to 90 % are counted at that grain
    finetune_overrides = {"val_interval": 2, **(finetune_overrides or {})}
    if "dataset_dir" not in finetune_overrides and not report_only:  # the bundle's own phantoms, for every run
        data = os.path.join(output_dir, "finetune_data")
        finetune_overrides["dataset_dir"] = (ensure_brain_phantoms(data) if bundle.startswith("brats")
                                             else ensure_ct_phantoms(data, task=PHANTOM_TASKS[bundle]))
    inits = ["scratch", *methods]
    keys = [str(f) for f in fractions]
    runs: dict = {}
    missing = []
    for seed in seeds:
        for fraction in fractions:
            for init in inits:
                path = os.path.join(output_dir, "finetune", init, f"fraction_{fraction}", f"seed_{seed}", "result.json")
                done = os.path.isfile(path)
                if done:
                    with open(path) as f:
                        result = json.load(f)
                    print(f"=== {init}, fraction {fraction}, seed {seed}: done, skipped", flush=True)
                elif report_only:
                    missing.append(f"{init}, fraction {fraction}, seed {seed}")
                    continue
                else:
                    print(f"=== {init}, fraction {fraction}, seed {seed}", flush=True)
                    start = time.perf_counter()
                    overrides = {"seed": seed, "label_fraction": fraction,
                                 "pretrained": checkpoints.get(init, ""), **finetune_overrides}
                    ran = run_bundle(bundle, os.path.dirname(path), overrides, record="val_mean_dice")
                    history = ran["history"]
                    result = {"history": history, "final": history[-1][1], "best": max(v for _, v in history),
                              "seconds": time.perf_counter() - start, "crops": ran["crops"]}
                    _write_json(path, result)
                runs.setdefault(init, {}).setdefault(str(fraction), {})[str(seed)] = result
                if not done:  # after each run, so that a stopped study keeps its tables
                    write_report(output_dir, bundle, inits, list(seeds), keys, runs)
    report = write_report(output_dir, bundle, inits, list(seeds), keys, runs)
    if runs:
        plot(report, output_dir)
    print(table(report["summary"], inits))
    if missing:
        print(f"{len(missing)} runs not done yet:", *missing, sep="\n  ", flush=True)
    print(f"this call: {time.perf_counter() - started:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
