"""Time and peak memory of one HybridMIM training step, its configurations side by side
(``hybridmim_studies.step_benchmark``).

    python tools/benchmark_step.py                                    # demo settings, CPU
    python tools/benchmark_step.py --paper True                       # the paper's UNet settings (96^3, widths 64-512)
    python tools/benchmark_step.py --paper True --device cuda --batch 4 --swin_feature_size 48
"""

import fire

from hybridmim_studies.step_benchmark import main

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # main prints its own table
