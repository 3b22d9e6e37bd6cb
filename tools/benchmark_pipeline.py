"""Crops/s of a bundle's pre-training pipeline, NIfTI to masked batch, for several loaders, beside a step's need
(``hybridmim_studies.pipeline_benchmark``).

    python tools/benchmark_pipeline.py                                  # hybridmim_unet_pretrain, phantoms, 96^3
    python tools/benchmark_pipeline.py --dataset_dir /data/ct --device cuda --batch_size 2 --step_seconds 0.25
"""

import fire

from hybridmim_studies.pipeline_benchmark import main

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
