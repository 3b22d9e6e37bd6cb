"""A virtual environment as a user of a downloaded bundle has it: torch, MONAI with the extra its command line
needs (``monai[fire]``), and exactly the packages the bundles' metadata lists, installed from the package registry,
and nothing of this repository.

It sees none of this environment's packages. It is built once (a minute or two: torch from the local wheel that
``pip install torch==<version>`` takes, the rest from the registry) under ``~/.cache/hybridmim-bundles/``, named by
a hash of its requirements, and reused while the metadata asks for the same packages.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import venv

from conftest import REPO


def metadata_requirements() -> list[str]:
    """``name==version`` of MONAI, torch, NumPy and every ``required_packages_version`` of every bundle."""
    wanted: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(REPO, "bundles", "*", "configs", "metadata.json"))):
        with open(path) as f:
            meta = json.load(f)
        wanted.update({"monai": meta["monai_version"], "torch": meta["pytorch_version"].split("+")[0],
                       "numpy": meta["numpy_version"], **meta["required_packages_version"]})
    return sorted(f"{name}=={version}" for name, version in wanted.items())


def bundle_env() -> str:
    """The environment's python, built on first use."""
    requirements = [r.replace("monai==", "monai[fire]==") for r in metadata_requirements()]
    tag = hashlib.sha1("\n".join(requirements).encode()).hexdigest()[:10]
    path = os.environ.get("BUNDLE_ENV") or os.path.join(os.path.expanduser("~"), ".cache", "hybridmim-bundles",
                                                         f"bundle-env-{tag}")
    python = os.path.join(path, "bin", "python")
    done = os.path.join(path, "requirements.txt")
    if os.path.isfile(done) and open(done).read().split() == requirements:
        return python
    venv.create(path, with_pip=True, clear=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    torch = next(r for r in requirements if r.startswith("torch=="))
    subprocess.run([*pip, torch], check=True)  # first and alone: the local CPU wheel, not a CUDA build
    subprocess.run([*pip, *requirements], check=True)
    with open(done, "w") as f:
        f.write("\n".join(requirements) + "\n")
    return python
