"""The paper's comparison as one table, every cell a real bundle run (``hybridmim_studies.comparison``).

    python tools/compare_methods.py --recipe docs/comparison/demo.json --output_dir runs/compare   # phantoms
    python tools/compare_methods.py --recipe docs/comparison/paper_table1_btcv.json --output_dir runs/table1 \\
        --corpus /data/unlabelled_ct --data "{BTCV: /data/BTCV}"                                 # your data
"""

import fire

from hybridmim_studies.comparison import main

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
