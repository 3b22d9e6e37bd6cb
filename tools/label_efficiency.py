"""Does pre-training help on my data? The label-efficiency protocol (``hybridmim_studies.label_efficiency``).

    python tools/label_efficiency.py --output_dir runs/label_efficiency              # on phantoms
    python tools/label_efficiency.py --output_dir runs/mine --labelled /data/pool --development /data/dev \\
        --test /data/test --corpus /data/unlabelled --protocol my_protocol.json     # on your data
    python tools/label_efficiency.py --output_dir results/label_efficiency_protocol --report_only True
"""

import fire

from hybridmim_studies.label_efficiency import main

if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
