"""Verify the metadata of every bundle offline, against the schema shipped in hybridmim_components.

    python tools/verify_bundles.py                 # all bundles under bundles/
    python tools/verify_bundles.py bundles/hybridmim_unet_pretrain

Runs MONAI's ``verify_metadata`` with ``--filepath`` pointing at the shipped schema (so nothing is downloaded),
then checks what JSON Schema cannot: ``version`` is a key of ``changelog``.
"""

from __future__ import annotations

import glob
import json
import os

import fire

from monai.bundle import verify_metadata

from hybridmim_components import METADATA_SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def verify(*bundle_dirs: str) -> list[str]:
    """Verify each bundle's ``configs/metadata.json``; raise ValueError naming the first bad file."""
    bundle_dirs = bundle_dirs or tuple(sorted(glob.glob(os.path.join(REPO, "bundles", "*"))))
    verified = []
    for bundle in bundle_dirs:
        meta_file = os.path.join(bundle, "configs", "metadata.json")
        if not os.path.isfile(meta_file):
            raise FileNotFoundError(f"{bundle} has no configs/metadata.json.")
        try:
            verify_metadata(meta_file=meta_file, filepath=METADATA_SCHEMA)
        except ValueError as e:
            raise ValueError(f"{meta_file}: {e}") from e
        with open(meta_file) as f:
            meta = json.load(f)
        if meta["version"] not in meta["changelog"]:
            raise ValueError(f"{meta_file}: version {meta['version']} is not a key of changelog; add an entry.")
        verified.append(meta_file)
        print(f"verified {meta_file}")
    return verified


if __name__ == "__main__":
    fire.Fire(verify)
