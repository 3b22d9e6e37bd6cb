"""Write synthetic abdominal CT phantoms in the Medical Segmentation Decathlon layout.

    python tools/make_phantoms.py write --output_dir data/phantoms_ct --num_subjects 12 --seed 0 [--task btcv]
    python tools/make_phantoms.py figure docs/phantom_slices.png

Each subject is deterministic by its seed (seed, seed + 1, ...). ``--anatomy abdomen`` (default) draws the
realistic phantom of ``hybridmim_components.abdomen``, ``simple`` the first, fast one; ``--task`` picks the
labels (organs, btcv, spleen, liver); see ``hybridmim_components.phantoms``.
"""

from __future__ import annotations

import fire

from hybridmim_components.abdomen import ABDOMEN_LABELS, make_abdominal_ct
from hybridmim_components.phantoms import write_ct_phantoms


def figure(path: str, seeds: tuple[int, ...] = (0, 1, 2, 3), window: tuple[int, int] = (-175, 250)) -> str:
    """A PNG of the realistic phantom: for each seed an axial slice through the liver and spleen, one through
    the kidneys and a coronal slice, each beside its labels (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(seeds), 6, figsize=(18, 3.2 * len(seeds)), squeeze=False)
    for row, seed in zip(axes, seeds):
        image, label, _, info = make_abdominal_ct(seed)
        z_upper = int(np.argmax([(label[:, :, k] == 1).sum() for k in range(label.shape[2])]))
        z_lower = int(np.argmax([(label[:, :, k] == 2).sum() for k in range(label.shape[2])]))
        y_mid = int(np.argmax([(label[:, k, :] == 6).sum() for k in range(label.shape[1])]))
        views = [(image[:, :, z_upper].T, label[:, :, z_upper].T, f"axial {z_upper}", 1.0),
                 (image[:, :, z_lower].T, label[:, :, z_lower].T, f"axial {z_lower}", 1.0),
                 (image[:, y_mid, :].T, label[:, y_mid, :].T, f"coronal {y_mid}", 2.0 / 1.5)]
        for k, (pixels, labels, name, aspect) in enumerate(views):
            row[2 * k].imshow(np.clip(pixels, *window), cmap="gray", origin="lower", aspect=aspect)
            row[2 * k].set_title(f"subject {seed}, {info['phase'].replace('_', '-')}, {name}", fontsize=9)
            row[2 * k + 1].imshow(np.ma.masked_equal(labels, 0), cmap="tab20", vmin=0, vmax=19, origin="lower",
                                  aspect=aspect, interpolation="nearest")
            row[2 * k + 1].set_title("labels (" + ", ".join(ABDOMEN_LABELS[v] for v in sorted(set(np.unique(labels)) - {0})[:4]) + ", ...)", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(
    output_dir: str,
    num_subjects: int = 12,
    seed: int = 0,
    shape: tuple[int, int, int] = (144, 112, 80),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    task: str = "organs",
    anatomy: str = "abdomen",
) -> str:
    """Write ``num_subjects`` phantoms to ``output_dir`` (imagesTr/, labelsTr/, dataset.json)."""
    path = write_ct_phantoms(output_dir, num_subjects=num_subjects, seed=seed, shape=shape, spacing=spacing,
                             task=task, anatomy=anatomy)
    print(f"wrote {num_subjects} CT phantoms to {path}")
    return path


if __name__ == "__main__":
    fire.Fire({"write": main, "figure": figure}, serialize=lambda result: None)
