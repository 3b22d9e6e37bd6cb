"""A bundle run as a study sees it: the bundle's configs found, its workflow run, the run made resumable by its
``result.json``, its CPU time recorded, and the run scored with the bundle's own ``evaluate.json``.

Both studies (``label_efficiency``, ``comparison``) run every bundle through this module, so a change to how a
run is started, resumed or scored is made here once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from monai.bundle import ConfigParser, ConfigWorkflow

from hybridmim_components.checkpoints import latest_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(REPO, "bundles")


def bundle_configs(bundle: str, *files: str) -> list[str]:
    """The paths of ``bundle``'s ``train.json`` and then ``files`` (names relative to its ``configs/``)."""
    folder = os.path.join(BUNDLES, bundle, "configs")
    return [os.path.join(folder, name) for name in ("train.json", *files)]


def check_bundle(bundle: str, files=(), where: str = "", key: str = "") -> None:
    """Raise, naming ``where`` and ``key``, when ``bundle`` is not one of this collection or lacks ``files``."""
    folder = os.path.join(BUNDLES, str(bundle), "configs")
    if not os.path.isfile(os.path.join(folder, "train.json")):
        raise ValueError(f"{where}: {key}.bundle {bundle!r} is not a bundle of this collection; choose among "
                         f"{sorted(os.listdir(BUNDLES))}.")
    missing = [f for f in files or [] if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(f"{where}: {key}.config_files {missing} are not in {folder}.")


def parsed(config_files: str | list[str], overrides: dict | None = None) -> ConfigParser:
    """A ``ConfigParser`` of ``config_files`` with ``overrides`` applied, nothing yet resolved."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(overrides or {})
    return parser


def run_workflow(config_files: str | list[str], root: str, workflow_type: str | None,
                 before_run: Callable[[ConfigWorkflow], None] | None = None, **overrides) -> ConfigWorkflow:
    """Run a bundle workflow in ``root`` as ``python -m monai.bundle run`` would; ``before_run`` may attach handlers
    to the initialised workflow. Returns the finalised workflow (its parser still resolves ids)."""
    workflow = ConfigWorkflow(config_file=config_files, workflow_type=workflow_type, bundle_root=root, **overrides)
    workflow.initialize()
    if before_run is not None:
        before_run(workflow)
    workflow.run()
    workflow.finalize()
    return workflow


def resumable(root: str) -> bool:
    """Whether the bundle run in ``root`` left an intact checkpoint in ``models`` to resume from."""
    try:
        latest_checkpoint(os.path.join(root, "models"))
    except FileNotFoundError:
        return False
    return True


def result_path(root: str) -> str:
    """A finished run's record: its presence is what makes a rerun skip the run."""
    return os.path.join(root, "result.json")


def finished(root: str) -> dict | None:
    """The ``result.json`` of the run in ``root``, or ``None`` while it has not finished."""
    path = result_path(root)
    return read_json(path) if os.path.isfile(path) else None


@contextmanager
def cost() -> Iterator[dict]:
    """Measure a block: the dict yielded gets ``cpu_seconds`` (this process's CPU time) and ``seconds`` (wall)."""
    start, cpu = time.perf_counter(), time.process_time()
    measured: dict = {}
    try:
        yield measured
    finally:
        measured.update(cpu_seconds=time.process_time() - cpu, seconds=time.perf_counter() - start)


def score(bundle: str, root: str, extra_configs=(), **overrides) -> dict:
    """Score the model that the run in ``root`` saved with the bundle's ``evaluate.json`` (original image space,
    metrics per class and case) and return ``eval/metrics.json``."""
    run_workflow(bundle_configs(bundle, *extra_configs, "evaluate.json"), root, None, **overrides)
    return read_json(os.path.join(root, "eval", "metrics.json"))


def folder_name(name: str) -> str:
    """``name`` (a recipe's, a row's or a task's) as a folder name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def write_json(path: str, content) -> None:
    """Write to a temporary name, then rename: a run stopped while writing leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
