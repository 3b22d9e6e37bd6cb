"""Check a dataset before training: every problem at once, each with its file and the fix.

    python tools/check_dataset.py /data/Task09_Spleen --bundle msd_spleen_segmentation
    python tools/check_dataset.py /data/BraTS2020_TrainingData --bundle brats_tumor_segmentation
    python tools/check_dataset.py lists/mine.json --labels "[0,1,2]" --channels 1
    python tools/check_dataset.py /data/unlabelled_ct --level headers      # pre-training, 10k+ volumes

``--bundle`` takes the task's label values (``label_values``) and the network's channels (``in_channels``) from
the bundle's ``train.json``; ``--labels`` and ``--channels`` give them by hand. ``--level full`` (default) reads
every voxel; ``headers`` only the headers. Exits with 1 when there is a problem. The bundles run the same check
at the start of training (``--dataset_check full|headers|off``).
"""

from __future__ import annotations

import os
import sys
import time

import fire

from monai.bundle import ConfigParser

from hybridmim_components.dataset_check import check_dataset

BUNDLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")


def _task_of(bundle: str) -> tuple[list[int] | None, int]:
    config = os.path.join(BUNDLES, bundle, "configs", "train.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no bundle {bundle!r} (no {config}); the bundles are {sorted(os.listdir(BUNDLES))}.")
    parser = ConfigParser()
    parser.read_config(config)
    labels = parser.get_parsed_content("label_values") if "label_values" in parser else None
    return labels, parser.get_parsed_content("in_channels")


def main(source: str, bundle: str | None = None, labels: list[int] | None = None, channels: int | None = None,
         level: str = "full", keys: tuple[str, ...] = ("training", "validation")) -> int:
    """Print the problems of ``source`` (a dataset folder or datalist JSON); 0 if none, else 1."""
    task_labels, task_channels = _task_of(bundle) if bundle else (None, 1)
    labels = task_labels if labels is None else labels
    channels = task_channels if channels is None else channels
    start = time.perf_counter()
    problems = check_dataset(source, labels=labels, channels=channels, level=level, keys=keys)
    seconds = time.perf_counter() - start
    for problem in problems:
        print(f"- {problem}")
    expected = f"labels {list(labels)}, " if labels is not None else "no labels, "
    summary = f"{len(problems)} problem(s)" if problems else "no problem"
    print(f"{source}: {summary} ({expected}{channels} channel(s), level {level}, {seconds:.1f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(fire.Fire(main, serialize=lambda result: None))
