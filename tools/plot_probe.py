"""Draw the segmentation probe's curve of a pre-training run: the held-out Dice of a linear head on the frozen
encoder, epoch by epoch, from epoch 0 (the random encoder) on (needs matplotlib: pip install -e ".[tools]").

    python tools/plot_probe.py bundles/hybridmim_unet_pretrain/runs/probe.jsonl --output probe.png
"""

from __future__ import annotations

import fire

from hybridmim_components.probe import read_probe_log


def main(log_file: str, output: str = "probe.png", classes: tuple[str, ...] = ("liver", "spleen", "left_kidney"),
         title: str = "Segmentation probe during pre-training") -> str:
    """Plot the mean Dice and the Dice of ``classes`` (those the log has) against the epoch; returns ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_probe_log(log_file)
    if not records:
        raise ValueError(f"{log_file} holds no probe record; was the run started with --probe_interval > 0?")
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(epochs, [r["dice"] for r in records], "o-", color="black", label="mean over classes")
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
