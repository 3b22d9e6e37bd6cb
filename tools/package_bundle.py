"""Zip a bundle as the MONAI model zoo ships it: one top folder named after the bundle, no data or run outputs.

    python tools/package_bundle.py bundles/msd_spleen_segmentation --output_dir dist
    python -m monai.bundle download --name msd_spleen_segmentation \
        --url file://$PWD/dist/msd_spleen_segmentation_v0.3.0.zip --bundle_dir ./downloaded

``models/`` goes in only with ``--with_weights True`` (the zoo publishes weights through ``large_files.yml``).
"""

from __future__ import annotations

import json
import os
import zipfile

import fire

# what a run writes into a bundle: never part of the package
RUN_OUTPUTS = ("data", "models", "runs", "eval", "predictions", "reconstructions", "__pycache__")


def package(bundle_dir: str, output_dir: str = "dist", with_weights: bool = False) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip``; return its path."""
    bundle_dir = os.path.abspath(bundle_dir)
    meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{bundle_dir} has no configs/metadata.json: is it a bundle folder?")
    with open(meta_file) as f:
        version = json.load(f)["version"]
    name = os.path.basename(bundle_dir)
    skipped = set(RUN_OUTPUTS) - ({"models"} if with_weights else set())
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}_v{version}.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(bundle_dir):
            dirs[:] = sorted(d for d in dirs if d not in (skipped if root == bundle_dir else {"__pycache__"}))
            for file in sorted(files):
                full = os.path.join(root, file)
                archive.write(full, os.path.join(name, os.path.relpath(full, bundle_dir)))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    fire.Fire(package)
