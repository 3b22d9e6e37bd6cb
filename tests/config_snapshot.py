"""What every bundle's configs resolve to, as plain JSON, so that a refactor of the configs can be shown to change
nothing.

Each config set (``train.json``, ``inference.json``, ``evaluate.json``, and ``train.json`` merged with
``multi_gpu_train.json`` in a one-process gloo group) is parsed by MONAI's ``ConfigParser`` and every id is
resolved, nested ids included, the way ``monai.bundle run`` would. Each resolved value is described without
memory addresses: plain values as they are, a network by its class and parameter names and shapes, any other
object by its class and its plain attributes (classes by name, not module, so that moving a class to another
module changes nothing here), the bundle root replaced by ``<bundle_root>``. The ids that run
the workflow (``run``, ``initialize``, ...) are recorded as written, not run.

``python tests/config_snapshot.py`` writes ``tests/snapshots/bundle_configs.json``;
``python tests/config_snapshot.py --check`` (run by ``test_bundle_configs.py``) compares the configs with it. Regenerate it only for a change that is meant to change what a bundle builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import types

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(REPO, "tests", "snapshots", "bundle_configs.json")
# run, not resolved: they are the workflow's steps, and resolving them would train
EXECUTION_IDS = ("run", "training", "initialize", "finalize", "preprocess", "imports")
# cheap and free of worker processes; the same for every bundle, so the description stays comparable
OVERRIDES = {"cache_rate": 0.0, "num_workers": 0}
MAX_DEPTH = 4


def _plain(value, root: str, depth: int = 0):
    """A JSON description of ``value``; stable across runs and machines."""
    if isinstance(value, str):
        return value.replace(root, "<bundle_root>")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.device):
        return f"device:{value.type}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return {"array": list(value.shape), "dtype": str(value.dtype)}
    if depth >= MAX_DEPTH:
        return f"<{type(value).__qualname__}>"
    if isinstance(value, (list, tuple)):
        return [_plain(v, root, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, root, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.nn.Module):
        shapes = json.dumps([[n, list(p.shape)] for n, p in value.state_dict().items()])
        return {"module": type(value).__qualname__,
                "state_dict": hashlib.sha256(shapes.encode()).hexdigest()[:16]}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return f"<callable {getattr(value, '__qualname__', type(value).__qualname__)}>"
    described = {"type": type(value).__qualname__}
    for name, attr in sorted(getattr(value, "__dict__", {}).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, (str, bool, int, float, type(None), np.integer, np.floating, torch.device)):
            described[name] = _plain(attr, root, depth + 1)
        elif isinstance(attr, (list, tuple, dict)) and len(attr) <= 64:
            described[name] = _plain(attr, root, depth + 1)
    return described


def _ids(config, prefix: str = ""):
    """Every id of a raw config, parents before children (MONAI's ``a#b#0`` form)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            continue  # MONAI's _target_, _disabled_, ...: the resolved component describes what they made
        ident = f"{prefix}#{key}" if prefix else str(key)
        yield ident, value
        if ident.split("#")[0] not in EXECUTION_IDS:
            yield from _ids(value, ident)


def describe_configs(files: list[str], bundle_root: str) -> dict:
    """Every id of the merged ``files`` with the description of what it resolves to."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    parser.read_meta(os.path.join(os.path.dirname(files[0]), "metadata.json"))
    parser["bundle_root"] = bundle_root
    for key, value in OVERRIDES.items():
        if key in parser:
            parser[key] = value
    raw = parser.get()
    distributed = any(f.endswith("multi_gpu_train.json") for f in files)
    if distributed:  # the multi-GPU ids ask the process group for the rank
        for expression in raw.get("initialize", []):
            if "import" in expression:
                parser.get_parsed_content("initialize")  # noqa: the imports become names of the expressions
                break
    described = {}
    for ident, value in _ids(raw):
        top = ident.split("#")[0]
        if top in EXECUTION_IDS or top == "_meta_":
            described[ident] = value if "#" not in ident else None
            continue
        if isinstance(value, str) and value.startswith("@") and value[1:] in parser:  # described at its own id
            described[ident] = value
            continue
        if isinstance(value, dict) and "_target_" not in value:  # a container: its ids are described one by one
            described[ident] = {"keys": sorted(value)}
            continue
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            described[ident] = {"length": len(value)}  # its items are described one by one
            continue
        try:
            resolved = parser.get_parsed_content(ident)
            described[ident] = _plain(resolved, bundle_root)
        except Exception as e:  # recorded, so that a refactor that makes an id fail to resolve shows
            described[ident] = f"<error {type(e).__name__}>"
    return {k: v for k, v in described.items() if v is not None}


def config_sets(bundle: str) -> dict[str, list[str]]:
    configs = os.path.join(REPO, "bundles", bundle, "configs")
    # as the bundles' docs run them: evaluation and multi-GPU training are overlays on train.json
    sets = {"train.json": ["train.json"], "inference.json": ["inference.json"],
            "train.json+evaluate.json": ["train.json", "evaluate.json"],
            "train.json+multi_gpu_train.json": ["train.json", "multi_gpu_train.json"]}
    return {name: [os.path.join(configs, f) for f in files] for name, files in sets.items()
            if all(os.path.isfile(os.path.join(configs, f)) for f in files)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_bundle(bundle: str) -> dict:
    """Every config set of one bundle, resolved in a fresh bundle root under a one-process gloo group."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    # one fixed root: the plan hashes the datalist's paths
    root = os.path.join(tempfile.gettempdir(), "hybridmim_config_snapshot", bundle)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    try:
        return {name: describe_configs(files, root) for name, files in config_sets(bundle).items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bundles() -> list[str]:
    return sorted(d for d in os.listdir(os.path.join(REPO, "bundles"))
                  if os.path.isfile(os.path.join(REPO, "bundles", d, "configs", "train.json")))


def differences(expected: dict, found: dict) -> list[str]:
    """The ids whose description differs between two descriptions of one bundle, as readable lines."""
    lines = []
    for name in sorted(set(expected) | set(found)):
        old, new = expected.get(name, {}), found.get(name, {})
        for ident in sorted(set(old) | set(new)):
            if old.get(ident, "<absent>") != new.get(ident, "<absent>"):
                lines.append(f"{name} {ident}: {json.dumps(old.get(ident, '<absent>'))[:300]} -> "
                             f"{json.dumps(new.get(ident, '<absent>'))[:300]}")
    return lines


def write(snapshot: dict) -> None:
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    with open(SNAPSHOT, "w") as f:  # one id a line, so that a change reads as a diff of ids
        f.write("{\n")
        for b, (bundle, sets) in enumerate(sorted(snapshot.items())):
            f.write(f" {json.dumps(bundle)}: {{\n")
            for s, (name, ids) in enumerate(sorted(sets.items())):
                f.write(f"  {json.dumps(name)}: {{\n")
                lines = [f"   {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(ids.items())]
                f.write(",\n".join(lines) + "\n  }" + ("," if s < len(sets) - 1 else "") + "\n")
            f.write(" }" + ("," if b < len(snapshot) - 1 else "") + "\n")
        f.write("}\n")


def main(args: list[str]) -> int:
    """``config_snapshot.py [--check] [bundle ...]``: rewrite the snapshot of the bundles (all by default), or
    with ``--check`` compare them with it, print every differing id and exit 1 if any differs."""
    check = "--check" in args
    names = [a for a in args if a != "--check"] or bundles()
    torch.set_num_threads(1)
    snapshot = {}
    if os.path.isfile(SNAPSHOT):
        with open(SNAPSHOT) as f:
            snapshot = json.load(f)
    failed = False
    for bundle in names:
        found = json.loads(json.dumps(describe_bundle(bundle)))  # tuples as lists, as the file holds them
        if check:
            lines = differences(snapshot.get(bundle, {}), found)
            print(f"{bundle}: {len(lines)} id(s) differ from the snapshot", *lines, sep="\n  ", flush=True)
            failed |= bool(lines)
        snapshot[bundle] = found
    if not check:
        write(snapshot)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
