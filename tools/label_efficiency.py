"""Label efficiency: pre-train once, then fine-tune from scratch and from the pre-trained weights at several
label fractions, and compare Dice and convergence.

    python tools/label_efficiency.py --output_dir runs/label_efficiency --fractions "[0.2,0.5,1.0]"

Each run is a bundle run (``ConfigWorkflow``), so it uses exactly the bundles' recipes; scratch and pre-trained
runs of one fraction share the seed, hence the split, the labelled subset and the crops. Writes, under
``output_dir``: ``results.json`` (every validation Dice of every run), ``results.md`` (the table),
``dice_vs_fraction.png`` and ``val_dice_vs_epoch.png``. ``--pretrained PATH`` skips the pre-training.

Unless ``pretrain_overrides`` names a ``dataset_dir``, pre-training runs on 12 CT phantoms of other subjects
(seeds from 1000) than the fine-tuning phantoms: the paper's "generic pre-training" mode, with no validation
case seen during pre-training.
"""

from __future__ import annotations

import json
import os

import fire
from ignite.engine import Events

from monai.bundle import ConfigWorkflow

from hybridmim_components.phantoms import write_ct_phantoms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_SEED = 1000  # first seed of the pre-training phantoms


def run_bundle(bundle: str, bundle_root: str, overrides: dict, record: str | None = None) -> list[tuple[int, float]]:
    """Run a bundle's training; return ``(epoch, metric)`` after every validation when ``record`` names a metric."""
    workflow = ConfigWorkflow(
        config_file=os.path.join(REPO, "bundles", bundle, "configs", "train.json"),
        workflow_type="train",
        bundle_root=bundle_root,
        **overrides,
    )
    workflow.initialize()
    history: list[tuple[int, float]] = []
    if record:
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        evaluator.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: history.append((trainer.state.epoch, float(e.state.metrics[record])))
        )
    workflow.run()
    workflow.finalize()
    return history


def epochs_to(history: list[tuple[int, float]], level: float) -> int | None:
    """First epoch whose validation metric reaches ``level``."""
    return next((epoch for epoch, value in history if value >= level), None)


def plot(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(results["runs"], key=float)
    fig, ax = plt.subplots(figsize=(5, 4))
    for init, style in (("scratch", "o--"), ("pretrained", "s-")):
        ax.plot([float(f) for f in fractions], [results["runs"][f][init]["best"] for f in fractions], style, label=init)
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("best validation Dice")
    ax.set_title(results["bundle"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "dice_vs_fraction.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.5), squeeze=False)
    for ax, f in zip(axes[0], fractions):
        for init, style in (("scratch", "--"), ("pretrained", "-")):
            history = results["runs"][f][init]["history"]
            ax.plot([e for e, _ in history], [v for _, v in history], style, label=init)
        ax.set_title(f"label fraction {f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "val_dice_vs_epoch.png"), dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    lines = [
        "| label fraction | scratch: best Dice | pre-trained: best Dice | scratch: epochs to 90 % | pre-trained: epochs to 90 % |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in sorted(results["runs"], key=float):
        run = results["runs"][f]
        level = 0.9 * max(run["scratch"]["best"], run["pretrained"]["best"])
        cells = [f"{run[i]['best']:.3f}" for i in ("scratch", "pretrained")]
        cells += [str(epochs_to(run[i]["history"], level) or "not reached") for i in ("scratch", "pretrained")]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n'epochs to 90 %': first epoch whose validation Dice reaches 90 % of the better of the two runs' best.\n"


def main(
    output_dir: str = "runs/label_efficiency",
    bundle: str = "msd_spleen_segmentation",
    fractions: tuple[float, ...] = (0.2, 0.5, 1.0),
    pretrained: str = "",
    pretrain_overrides: dict | None = None,
    finetune_overrides: dict | None = None,
    seed: int = 0,
) -> dict:
    """Pre-train (unless ``pretrained`` is given), fine-tune at each fraction, and report."""
    os.makedirs(output_dir, exist_ok=True)
    if not pretrained:
        pretrain_overrides = dict(pretrain_overrides or {})
        if "dataset_dir" not in pretrain_overrides:
            # other subjects than the fine-tuning phantoms (seeds 0..11), so no validation case is pre-trained on
            pretrain_overrides["dataset_dir"] = write_ct_phantoms(
                os.path.join(output_dir, "pretrain_data"), num_subjects=12, seed=PRETRAIN_SEED
            )
        run_bundle("hybridmim_unet_pretrain", os.path.join(output_dir, "pretrain"), {"seed": seed, **pretrain_overrides})
        pretrained = os.path.join(output_dir, "pretrain", "models", "model.pt")
    results = {"bundle": bundle, "pretrained": pretrained, "seed": seed, "runs": {}}
    for fraction in fractions:
        runs = {}
        for init, weights in (("scratch", ""), ("pretrained", pretrained)):
            print(f"=== {bundle}: label fraction {fraction}, {init}", flush=True)
            root = os.path.join(output_dir, f"{init}_{fraction}")
            overrides = {"seed": seed, "label_fraction": fraction, "pretrained": weights, **(finetune_overrides or {})}
            history = run_bundle(bundle, root, overrides, record="val_mean_dice")
            runs[init] = {"history": history, "best": max(v for _, v in history), "final": history[-1][1]}
        results["runs"][str(fraction)] = runs
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)  # after each fraction: a long run keeps what it finished
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table(results))
    plot(results, output_dir)
    print(table(results))
    return results


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
