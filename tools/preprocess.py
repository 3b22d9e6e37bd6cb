"""Preprocess an unlabelled corpus once, in parts, for pre-training in constant memory.

    python tools/preprocess.py /data/ct_a /data/ct_b --output_dir /corpus --num_workers 8
    python tools/preprocess.py /data/openmind --output_dir /corpus --part $SLURM_ARRAY_TASK_ID --num_parts 64 \\
        --modalities "[T1w,T2w,FLAIR]" --min_size 64 --spacing_range "[0.3,3.0]"
    python -m monai.bundle run training --config_file bundles/hybridmim_unet_pretrain/configs/train.json \\
        --manifest /corpus

Sources are folders (searched recursively for NIfTI files) or datalist JSON files. Each volume goes through the
bundle's own loading chain (``load_and_scale``, with the overrides given here, e.g. ``--pixdim "[1,1,1]"``), so
the corpus holds exactly what the bundle would have cached in memory. For 10k+ volumes, ``--storage blosc2 --dtype
float16`` stores about a sixth of the bytes (``pip install blosc2``; measured in ``docs/performance.md``). Rerun a part to finish it after a stop;
the rejected volumes are listed with their reasons in ``<output_dir>/manifest/rejected-*.jsonl``. The same is
the bundle workflow ``preprocess``: ``python -m monai.bundle run preprocess --config_file .../train.json
--dataset_dir /data --preprocessed_dir /corpus``.
"""

from __future__ import annotations

import os
import sys

import fire
from monai.bundle import ConfigParser
from monai.transforms import Compose

from hybridmim_components.preprocess import preprocess

BUNDLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")


def main(*sources: str, output_dir: str, bundle: str = "hybridmim_unet_pretrain", part: int = 0,
         num_parts: int = 1, num_workers: int = 1, default_modality: str = "CT",
         modalities: tuple[str, ...] | None = None, min_size: int = 0,
         spacing_range: tuple[float, float] = (0.0, float("inf")), dtype: str = "float32", storage: str = "npy",
         **overrides) -> int:
    """Preprocess part ``part`` of ``num_parts`` of ``sources`` into ``output_dir``; 0 when done (rejections
    included), 1 when no volume of this part could be processed."""
    if not sources:
        raise ValueError("give at least one source folder or datalist JSON, e.g. `tools/preprocess.py /data/ct ...`.")
    config = os.path.join(BUNDLES, bundle, "configs", "train.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no bundle {bundle!r} (no {config}); the bundles are {sorted(os.listdir(BUNDLES))}.")
    parser = ConfigParser()
    parser.read_config(config)
    parser.update(overrides)
    transform = Compose(parser.get_parsed_content("load_and_scale"))
    summary = preprocess(list(sources), output_dir, transform, part=part, num_parts=num_parts,
                         num_workers=num_workers, default_modality=default_modality,
                         modalities=list(modalities) if modalities else None, min_size=min_size,
                         spacing_range=spacing_range, dtype=dtype, storage=storage)
    return 1 if summary["volumes"] and not summary["accepted"] and not summary["done_before"] else 0


if __name__ == "__main__":
    sys.exit(fire.Fire(main, serialize=lambda result: None))
