"""Measure the pre-training data pipeline of a bundle: from NIfTI through caching to the masked batch on the
device, in crops per second, for several loaders, beside the training step rate it has to feed.

    python tools/benchmark_pipeline.py                                  # hybridmim_unet_pretrain, phantoms, 96^3
    python tools/benchmark_pipeline.py --dataset_dir /data/ct --device cuda --batch_size 2 --step_seconds 0.25

The bundle's own ``train.json`` builds the dataset (``CacheDataset`` of ``load_and_scale``), the random crops
and ``prepare_batch`` (batch masking after the move to the device), so what is timed is what training runs.
Reported: the caching time per volume, then for each loader the crops/s of ``batches`` batches after one
warm-up batch, and the ratio to the crops/s that a step of ``step_seconds`` consumes.
"""

from __future__ import annotations

import os
import time

import torch

from monai.bundle import ConfigParser
from monai.data import DataLoader, ThreadDataLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loaders(dataset, batch_size: int, workers: list[int]) -> dict:
    """The loaders compared: torch's ``DataLoader`` with worker processes, and MONAI's ``ThreadDataLoader``."""
    found = {f"DataLoader, {w} workers": DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=w,
                                                     persistent_workers=w > 0) for w in workers}
    found["ThreadDataLoader (a background thread)"] = ThreadDataLoader(dataset, batch_size=batch_size, shuffle=True)
    return found


def crops_per_second(loader, prepare_batch, device: torch.device, batches: int, iterator=None) -> float:
    """Crops/s of ``batches`` batches after a warm-up batch, from ``iterator`` (a new one of ``loader`` if none;
    a new one also when it runs out)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    it = iter(loader) if iterator is None else iterator
    prepare_batch(next(it), device)  # warm-up: worker start, first batch
    sync()
    crops, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        image, _ = prepare_batch(batch, device)[:2]
        crops += image.shape[0]
    sync()
    return crops / (time.perf_counter() - start)


def main(
    bundle: str = "hybridmim_unet_pretrain",
    dataset_dir: str = "",
    roi: int = 96,
    batch_size: int = 2,
    crops_per_volume: int = 2,
    workers: tuple[int, ...] = (0, 2),
    batches: int = 20,
    device: str = "cpu",
    step_seconds: float = 0.25,
) -> dict[str, float]:
    """Crops/s of each loader; prints a table.

    Args:
        dataset_dir: NIfTI volumes (the bundle's ``--dataset_dir``); empty: the bundle's phantoms.
        step_seconds: a training step's time to compare with (default: the H100 target at the paper's settings).
    """
    parser = ConfigParser()
    bundle_root = os.path.join(REPO, "bundles", bundle)
    parser.read_config(os.path.join(bundle_root, "configs", "train.json"))
    parser.update({"bundle_root": bundle_root, "device": device, "roi_size": [roi] * 3,
                   "crops_per_volume": crops_per_volume, "num_workers": 0})
    if dataset_dir:
        parser.update({"dataset_dir": dataset_dir})
    dev = torch.device(device)

    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    cache_seconds = time.perf_counter() - start
    prepare_batch = parser.get_parsed_content("prepare_batch")
    needed = batch_size * crops_per_volume / step_seconds

    print(f"{bundle}: {len(dataset)} volumes cached in {cache_seconds:.1f} s ({cache_seconds / len(dataset):.2f} s "
          f"per volume, {torch.get_num_threads()} threads); crops {roi}^3, {batch_size} volumes x "
          f"{crops_per_volume} crops per batch; device {device}")
    print(f"a step of {step_seconds} s consumes {needed:.1f} crops/s\n")
    print("| loader | crops/s | x the step's need |\n|---|---|---|")
    result = {"cache_seconds_per_volume": cache_seconds / len(dataset)}
    for name, loader in loaders(dataset, batch_size, list(workers)).items():
        rate = crops_per_second(loader, prepare_batch, dev, batches)
        result[name] = rate
        print(f"| {name} | {rate:.1f} | {rate / needed:.1f} |")
    return result
