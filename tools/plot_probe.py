"""Draw the segmentation probe's curve of a pre-training run: the held-out Dice of a linear head on the frozen
encoder, epoch by epoch, from epoch 0 (the random encoder) on (needs matplotlib: pip install -e ".[tools]").

    python tools/plot_probe.py bundles/hybridmim_unet_pretrain/runs/probe.jsonl --output probe.png
    python tools/plot_probe.py runs/a/probe.jsonl runs/b/probe.jsonl --labels "[a,b]" --output compare.png

One log: its mean Dice and the Dice of a few organs. Several: the mean Dice of each, to compare runs.
"""

from __future__ import annotations

import fire

from hybridmim_components.probe import read_probe_log


def main(*log_files: str, output: str = "probe.png", labels: tuple[str, ...] = (),
         classes: tuple[str, ...] = ("liver", "spleen", "left_kidney"),
         title: str = "Segmentation probe during pre-training") -> str:
    """Plot the probe's Dice against the epoch; returns ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_files:
        raise ValueError("give at least one probe log, e.g. <bundle_root>/runs/probe.jsonl.")
    if labels and len(labels) != len(log_files):
        raise ValueError(f"--labels names {len(labels)} runs, but {len(log_files)} logs were given.")
    runs = {}
    for i, path in enumerate(log_files):
        records = read_probe_log(path)
        if not records:
            raise ValueError(f"{path} holds no probe record; was the run started with --probe_interval > 0?")
        runs[labels[i] if labels else path] = records
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, records in runs.items():
        epochs = [r["epoch"] for r in records]
        ax.plot(epochs, [r["dice"] for r in records], "o-", label="mean over classes" if len(runs) == 1 else name,
                color="black" if len(runs) == 1 else None)
    if len(runs) == 1:
        for name in classes:
            values = [r["dice_per_class"].get(name) for r in records]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], "--", label=name)
    ax.set_xlabel("pre-training epoch (0: the random encoder)")
    ax.set_ylabel("held-out Dice of the linear head")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
