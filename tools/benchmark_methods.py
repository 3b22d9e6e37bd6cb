"""Time one training step of every pre-training bundle, side by side, with each bundle's own network, loss,
masking and batch preparation (read from its train.json), on the same crops; and its peak memory (GPU
``max_memory_allocated``, or on a CPU the peak RSS of a fresh process that builds that bundle alone). Also the
time its per-crop transforms after the crop (views, Models Genesis' corruptions) take for one crop on the CPU,
which the data loader's workers spend beside the step.

    python tools/benchmark_methods.py                      # demo networks, 64^3 crops, batch 2, CPU
    python tools/benchmark_methods.py --device cuda --overrides '{"feature_size": 48, "features": [64,64,128,256,512,64]}'

Rounds alternate between the methods so that machine noise hits all of them alike.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import fire
import torch

from monai.bundle import ConfigParser
from monai.data import list_data_collate

from hybridmim_studies.timing import device_name, peak_rss_gib, time_alternating

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(bundle: str, device: torch.device, overrides: dict, batch: int) -> dict:
    """The pieces of a bundle's training step, and one batch made by its own transforms."""
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundles", bundle, "configs", "train.json"))
    parser.update({k: v for k, v in overrides.items() if k in parser.config})
    parser.update({"device": device})
    roi = parser.get_parsed_content("roi_size")
    # the bundle's own per-sample transforms after loading: crop (identity here) and masking / views
    tail = parser.get_parsed_content("train#preprocessing").transforms[len(parser.get_parsed_content("load_and_scale")) + 1:]

    def transform_one_crop() -> dict:
        sample = {"image": torch.rand(1, *roi)}
        for t in tail:
            sample = t(sample)
        return sample

    batch = list_data_collate([transform_one_crop() for _ in range(batch)])
    network = parser.get_parsed_content("network_def").to(device).train()
    return {
        "network": network,
        "loss": parser.get_parsed_content("loss"),
        "prepare": parser.get_parsed_content("prepare_batch"),
        "optimizer": torch.optim.AdamW(network.parameters(), lr=1e-4),
        "batch": batch,
        "transform_one_crop": transform_one_crop,
    }


def step(parts: dict, device: torch.device, amp: bool) -> None:
    prepared = parts["prepare"](parts["batch"], device)
    image, targets = prepared[0], prepared[1]
    kwargs = prepared[3] if len(prepared) == 4 else {}
    with torch.autocast(device.type, enabled=amp):
        loss = parts["loss"](parts["network"](image, **kwargs), targets)["loss"]
    parts["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    parts["optimizer"].step()


def peak_rss_of_one_step(bundle: str, device: str, batch: int, overrides: dict) -> float:
    """Peak RSS (GiB) of a fresh process that builds ``bundle`` alone and runs one step."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", bundle, "--report_rss", "True", "--device", device,
           "--batch", str(batch), "--overrides", json.dumps(overrides)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_gib"]


def main(
    device: str = "cpu", batch: int = 2, steps: int = 3, warmup: int = 1, rounds: int = 2, amp: bool = False,
    overrides: dict | None = None, memory: bool = True, only: str = "", report_rss: bool = False,
) -> dict[str, dict[str, float]]:
    """Seconds per training step and peak memory (GiB) of each pre-training bundle; prints a table.

    Args:
        memory: also measure the peak memory of one step of each bundle.
        only: one bundle by name (used for the per-process memory measurement).
    """
    dev = torch.device(device)
    overrides = dict(overrides or {})
    bundles = sorted(os.path.basename(os.path.dirname(os.path.dirname(p)))
                     for p in glob.glob(os.path.join(REPO, "bundles", "*_pretrain", "configs", "train.json")))
    if only:
        bundles = [only]
    parts = {b: build(b, dev, overrides, batch) for b in bundles}
    if report_rss:  # child process of peak_rss_of_one_step
        step(parts[only], dev, amp)
        print(json.dumps({"peak_rss_gib": peak_rss_gib()}))
        return {}

    peaks = {b: float("nan") for b in bundles}
    if dev.type == "cuda" and memory:
        for b, p in parts.items():
            step(p, dev, amp)  # warm-up outside the measurement
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            step(p, dev, amp)
            torch.cuda.synchronize(dev)
            peaks[b] = torch.cuda.max_memory_allocated(dev) / 2**30
    seconds = time_alternating({b: (lambda p=p: step(p, dev, amp)) for b, p in parts.items()}, dev, steps, warmup, rounds)
    per_crop = time_alternating({b: p["transform_one_crop"] for b, p in parts.items()}, torch.device("cpu"), steps,
                                warmup, rounds)
    if dev.type != "cuda" and memory:
        peaks = {b: peak_rss_of_one_step(b, device, batch, overrides) for b in bundles}

    memory_kind = "GPU max_memory_allocated" if dev.type == "cuda" else "CPU peak RSS of a one-bundle process"
    print(f"{device_name(dev)}; batch {batch}; overrides {overrides or 'none (demo settings)'}")
    print(f"| bundle | s/step | per-crop transforms, s/crop (CPU) | {memory_kind} (GiB) |\n|---|---|---|---|")
    for b in bundles:
        print(f"| {b} | {seconds[b]:.2f} | {per_crop[b]:.3f} | {peaks[b]:.2f} |")
    return {b: {"seconds": seconds[b], "transform_seconds_per_crop": per_crop[b], "peak_gib": peaks[b]} for b in bundles}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
