"""Apply the MONAI model zoo's bundle checks to our bundles, offline.

    python tools/verify_bundles.py                 # all bundles under bundles/
    python tools/verify_bundles.py bundles/hybridmim_unet_pretrain --features "[4,4,8,8,16,4]"

What the zoo's ``ci/verify_bundle.py`` checks, with our own code:
- the files: ``configs/metadata.json``, ``configs/inference.json``, ``LICENSE``, ``docs/README.md``,
  ``docs/data_license.txt``, and a ``large_files.yml`` whose entries name a path, a URL and a hash;
- ``version`` is a key of ``changelog``;
- the metadata against the schema (the offline copy in ``hybridmim_components/schemas/``: nothing is downloaded);
- every package of ``required_packages_version`` at its version, and MONAI, PyTorch and NumPy at theirs, on the
  package registry (``pip index versions``): what ``pip install`` of the metadata's list would fetch;
- in a packaged bundle (``tools/package_bundle.py``), the vendored code: each file as ``scripts/vendored.json``
  records it, and the same as the installed package's at the same version;
- ``verify_net_in_out`` of ``network_def`` in ``configs/inference.json`` against the metadata's shapes (not for
  MAE's ViT, whose output is a tuple; the zoo keeps such bundles in a list);
- when ``models/model.pt`` exists (the weights the bundle saved): ``ckpt_export`` to TorchScript, or, for a
  network TorchScript cannot compile (SwinUNETR; the zoo keeps such bundles in a list too), a strict
  ``load_state_dict``.

Other keyword arguments override config ids for the network checks (e.g. the small settings a model was trained
with).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import tempfile

import fire
import torch
import yaml

from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from hybridmim_components import METADATA_SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md",
                  "docs/data_license.txt", "large_files.yml")
# SwinUNETR's forward takes **kwargs, which TorchScript cannot compile (the zoo skips its Swin bundles likewise,
# in its exclude_verify_torchscript_list); the fine-tuning bundles default to BasicUNet
NOT_SCRIPTABLE = ("hybridmim_swinunetr_pretrain", "simmim_swinunetr_pretrain", "contrastive_swinunetr_pretrain",
                  "swinssl_swinunetr_pretrain")
# MONAI's ViT returns (hidden states, per-layer hidden states), and verify_net_in_out needs one tensor (the zoo's
# exclude_verify_shape_list exists for such networks)
NO_SHAPE_CHECK = ("mae_vit_pretrain",)


def check_files(bundle: str) -> None:
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(bundle, name))]
    if missing:
        raise FileNotFoundError(f"{bundle} lacks {', '.join(missing)}; the model zoo expects them.")
    with open(os.path.join(bundle, "large_files.yml")) as f:
        large_files = (yaml.safe_load(f) or {}).get("large_files")
    if not isinstance(large_files, list):
        raise ValueError(f"{bundle}/large_files.yml: expected a 'large_files:' list (empty when no weights ship).")
    for entry in large_files:
        absent = {"path", "url", "hash_val", "hash_type"} - set(entry)
        if absent:
            raise ValueError(f"{bundle}/large_files.yml: the entry {entry} lacks {sorted(absent)}.")


def check_metadata(bundle: str) -> None:
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    try:
        verify_metadata(meta_file=meta_file, filepath=METADATA_SCHEMA)
    except ValueError as e:
        raise ValueError(f"{meta_file}: {e}") from e
    with open(meta_file) as f:
        meta = json.load(f)
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"{meta_file}: version {meta['version']} is not a key of changelog; add an entry.")


@functools.lru_cache(maxsize=None)
def registry_versions(package: str) -> tuple[str, ...]:
    """The versions of ``package`` that the configured package registry offers (empty if it has none)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True)
    line = next((row for row in proc.stdout.splitlines() if row.startswith("Available versions:")), "")
    return tuple(v.strip() for v in line.partition(":")[2].split(",") if v.strip())


def check_packages(bundle: str) -> None:
    """Every package the metadata lists resolves on the registry at its version."""
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    with open(meta_file) as f:
        meta = json.load(f)
    wanted = {**meta.get("required_packages_version", {}), "monai": meta["monai_version"],
              "torch": meta["pytorch_version"].split("+")[0], "numpy": meta["numpy_version"]}
    missing = [f"{name}=={version}" for name, version in wanted.items() if version not in registry_versions(name)]
    if missing:
        raise ValueError(f"{meta_file}: the package registry has no {', '.join(missing)}, so `pip install` of the "
                         "metadata's packages fails. List only published packages; the collection's own code travels "
                         "in the zip's scripts/ (tools/package_bundle.py).")


def check_vendored(bundle: str) -> None:
    from hybridmim_studies.packaging import vendored_differences

    if os.path.isfile(os.path.join(bundle, "scripts", "vendored.json")):
        problems = vendored_differences(bundle)
        if problems:
            raise ValueError(f"{bundle}/scripts: the vendored hybridmim-components is not the one it claims to be:\n  "
                             + "\n  ".join(problems) + "\nPackage the bundle again with tools/package_bundle.py.")


def check_network(bundle: str, **overrides) -> str:
    """``verify_net_in_out``, then the saved weights through TorchScript (or a strict load); what was checked."""
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    config_file = os.path.join(bundle, "configs", "inference.json")
    name = os.path.basename(os.path.normpath(bundle))
    if name in NO_SHAPE_CHECK:
        checked = "no shapes (tuple output)"
    else:
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=bundle,
                          **overrides)
        checked = "shapes"
    weights = os.path.join(bundle, "models", "model.pt")
    if not os.path.isfile(weights):
        return checked
    if name in NOT_SCRIPTABLE:
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.update({"bundle_root": bundle, **overrides})
        parser.get_parsed_content("network_def").load_state_dict(torch.load(weights, weights_only=True), strict=True)
        return f"{checked}, weights loaded strictly"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_export(net_id="network_def", filepath=os.path.join(tmp, "model.ts"), ckpt_file=weights,
                    meta_file=meta_file, config_file=config_file, bundle_root=bundle, **overrides)
        torch.jit.load(os.path.join(tmp, "model.ts"))
    return f"{checked}, weights exported to TorchScript"


def verify(*bundle_dirs: str, net: bool = True, packages: bool = True, **overrides) -> list[str]:
    """Run the checks on each bundle (all of ``bundles/`` by default); raise naming the first bundle that fails.
    ``packages False`` skips the registry look-up (offline)."""
    bundle_dirs = bundle_dirs or tuple(sorted(glob.glob(os.path.join(REPO, "bundles", "*"))))
    verified = []
    for bundle in bundle_dirs:
        check_files(bundle)
        check_metadata(bundle)
        if packages:
            check_packages(bundle)
        check_vendored(bundle)
        checked = check_network(bundle, **overrides) if net else "not run"
        verified.append(bundle)
        print(f"verified {bundle}: files, metadata, " + ("packages, " if packages else "") + f"network ({checked})")
    return verified


if __name__ == "__main__":
    fire.Fire(verify)
