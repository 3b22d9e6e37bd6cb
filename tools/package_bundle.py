"""Zip a bundle as the MONAI model zoo ships it, with ``hybridmim_components`` vendored in its ``scripts/``
(``hybridmim_studies.packaging``).

    python tools/package_bundle.py bundles/msd_spleen_segmentation --output_dir dist [--with_weights True]
"""

import fire

from hybridmim_studies.packaging import package

if __name__ == "__main__":
    fire.Fire(package)
