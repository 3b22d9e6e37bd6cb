"""Write synthetic abdominal CT phantoms in the Medical Segmentation Decathlon layout.

    python tools/make_phantoms.py --output_dir data/phantoms_ct --num_subjects 12 --seed 0

Each subject is deterministic by its seed (seed, seed + 1, ...); see hybridmim_components.data.
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
) -> str:
    """Write ``num_subjects`` phantoms to ``output_dir`` (imagesTr/, labelsTr/, dataset.json)."""
    path = write_ct_phantoms(output_dir, num_subjects=num_subjects, seed=seed, shape=shape, spacing=spacing)
    print(f"wrote {num_subjects} CT phantoms to {path}")
    return path


if __name__ == "__main__":
    fire.Fire(main)
