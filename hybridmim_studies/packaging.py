"""Zip a bundle as the MONAI model zoo ships it, with the code it needs, so that it runs where only MONAI and the
packages of its metadata are installed.

    python tools/package_bundle.py bundles/msd_spleen_segmentation --output_dir dist
    python -m monai.bundle download --name msd_spleen_segmentation \
        --url file://$PWD/dist/msd_spleen_segmentation_v0.4.0.zip --bundle_dir ./downloaded
    cd downloaded/msd_spleen_segmentation && python -m monai.bundle run --config_file configs/train.json

The zip holds one top folder named after the bundle, without data or run outputs (``models/`` only with
``--with_weights True``; the zoo publishes weights through ``large_files.yml``). Its code is the zoo's way, a
folder inside the bundle: ``scripts/hybridmim_components/`` is a copy of the package the zip was made with, and
``scripts/vendored.json`` records its version and the hash of every file. Each config that imports
``hybridmim_components`` imports ``scripts`` first, whose ``__init__`` puts the copy on ``sys.path`` unless the same
version is installed (a checkout, or ``pip install hybridmim-components``): then the installed package wins.
``import scripts`` needs the bundle's folder on ``sys.path`` when the config is parsed: MONAI Label puts it there,
``python -m monai.bundle run`` finds it when run from that folder (the zoo's usage, and ``bundle_root`` is ``.``);
from elsewhere, set ``PYTHONPATH=<bundle folder>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile


import hybridmim_components

# what a run writes into a bundle: never part of the package
RUN_OUTPUTS = ("data", "models", "runs", "eval", "predictions", "reconstructions", "__pycache__")
PACKAGE = "hybridmim_components"
IMPORT_PACKAGE, IMPORT_SCRIPTS = f"$import {PACKAGE}", "$import scripts"
SCRIPTS_INIT = '''"""This bundle's code: a copy of hybridmim-components (``hybridmim_components/``, its version and file hashes in
``vendored.json``), so that the bundle runs where only MONAI and the packages of its metadata are installed.

The copy goes on ``sys.path`` unless hybridmim-components of the same version is installed, which then wins (a
development checkout stays on its own code). A copy already imported, by another bundle of the same version in one
MONAI Label server, is kept.
"""

import ast
import importlib.util
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "vendored.json")) as _f:
    VENDORED = json.load(_f)


def _importable_version():
    """The version of the package that ``import`` would find, read from its source without importing it (its
    distribution's metadata can be visible where the package itself is not, as with a hidden editable install)."""
    spec = importlib.util.find_spec(VENDORED["package"])
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    for node in ast.parse(open(spec.origin).read()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


if VENDORED["package"] not in sys.modules and _importable_version() != VENDORED["version"]:
    sys.path.insert(0, _HERE)
'''


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def package_files(root: str | None = None) -> dict[str, str]:
    """``{path inside the bundle's scripts/: sha256}`` of the package's files (its code and schemas) under ``root``
    (the importable package's folder by default)."""
    root = root or os.path.dirname(os.path.abspath(hybridmim_components.__file__))
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json")):
                full = os.path.join(folder, name)
                found[os.path.join(PACKAGE, os.path.relpath(full, root))] = _sha256(full)
    return found


def with_scripts_import(config: dict) -> dict:
    """A config whose ``imports`` import ``scripts`` before ``hybridmim_components`` (unchanged if it has none)."""
    imports = config.get("imports")
    if not isinstance(imports, list) or IMPORT_PACKAGE not in imports or IMPORT_SCRIPTS in imports:
        return config
    at = imports.index(IMPORT_PACKAGE)
    return {**config, "imports": [*imports[:at], IMPORT_SCRIPTS, *imports[at:]]}


def package(bundle_dir: str, output_dir: str = "dist", with_weights: bool = False) -> str:
    """Write ``<output_dir>/<name>_v<version>.zip`` with the vendored package; return its path."""
    bundle_dir = os.path.abspath(bundle_dir)
    meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{bundle_dir} has no configs/metadata.json: is it a bundle folder?")
    if os.path.isdir(os.path.join(bundle_dir, "scripts")):
        raise ValueError(f"{bundle_dir} has a scripts/ folder of its own; the zip's scripts/ is the vendored package.")
    with open(meta_file) as f:
        version = json.load(f)["version"]
    name = os.path.basename(bundle_dir)
    skipped = set(RUN_OUTPUTS) - ({"models"} if with_weights else set())
    package_root = os.path.dirname(os.path.abspath(hybridmim_components.__file__))
    vendored = {"package": PACKAGE, "distribution": "hybridmim-components", "version": hybridmim_components.__version__,
                "files": package_files(package_root)}
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}_v{version}.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(bundle_dir):
            dirs[:] = sorted(d for d in dirs if d not in (skipped if root == bundle_dir else {"__pycache__"}))
            for file in sorted(files):
                full = os.path.join(root, file)
                inside = os.path.join(name, os.path.relpath(full, bundle_dir))
                if os.path.dirname(inside) == os.path.join(name, "configs") and file.endswith(".json"):
                    with open(full) as f:
                        archive.writestr(inside, json.dumps(with_scripts_import(json.load(f)), indent=4) + "\n")
                else:
                    archive.write(full, inside)
        archive.writestr(os.path.join(name, "scripts", "__init__.py"), SCRIPTS_INIT)
        archive.writestr(os.path.join(name, "scripts", "vendored.json"), json.dumps(vendored, indent=2) + "\n")
        for inside in vendored["files"]:
            archive.write(os.path.join(package_root, os.path.relpath(inside, PACKAGE)),
                          os.path.join(name, "scripts", inside))
    print(f"wrote {path} (hybridmim-components {vendored['version']} vendored in scripts/)")
    return path


def vendored_differences(bundle_dir: str, package_root: str | None = None) -> list[str]:
    """What is wrong with a bundle folder's vendored package: a file whose content is not the hash
    ``vendored.json`` records, and, when the version equals that of the package at ``package_root`` (the importable
    one by default), every file that differs from it, is missing, or is extra. Empty when all is well."""
    scripts = os.path.join(bundle_dir, "scripts")
    with open(os.path.join(scripts, "vendored.json")) as f:
        vendored = json.load(f)
    found = package_files(os.path.join(scripts, PACKAGE))
    problems = [f"{p}: its content is not the hash vendored.json records" for p, h in vendored["files"].items()
                if found.get(p) != h]
    problems += [f"{p}: not recorded in vendored.json" for p in found if p not in vendored["files"]]
    if vendored["version"] == hybridmim_components.__version__:
        expected = package_files(package_root)
        problems += [f"{p}: differs from hybridmim-components {vendored['version']} ({'missing' if p not in found else 'changed'})"
                     for p in expected if found.get(p) != expected[p]]
        problems += [f"{p}: not in hybridmim-components {vendored['version']}" for p in found if p not in expected]
    return problems
