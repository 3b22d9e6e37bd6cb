"""Write synthetic abdominal CT phantoms in the Medical Segmentation Decathlon layout.

    python tools/make_phantoms.py --output_dir data/phantoms_ct --num_subjects 12 --seed 0 [--task btcv]

Each subject is deterministic by its seed (seed, seed + 1, ...). ``--anatomy abdomen`` (default) draws the
realistic phantom of ``hybridmim_components.abdomen``, ``simple`` the first, fast one; ``--task`` picks the
labels (organs, btcv, spleen, liver); see ``hybridmim_components.phantoms``.
"""

from __future__ import annotations

import fire

from hybridmim_components.phantoms import write_ct_phantoms


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
    fire.Fire(main, serialize=lambda result: None)
