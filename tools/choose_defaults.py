"""Choose a fine-tuning bundle's demo defaults on development phantoms (``hybridmim_studies.defaults_choice``).

    python tools/choose_defaults.py --recipe docs/defaults/btcv_demo.json --output_dir runs/defaults_btcv
"""

import fire

from hybridmim_studies.defaults_choice import main

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
