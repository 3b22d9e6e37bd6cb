"""Time one training step of every pre-training bundle, side by side, with each bundle's own network, loss,
masking and batch preparation (read from its train.json), on the same crops.

    python tools/benchmark_methods.py                      # demo networks, 64^3 crops, batch 2, CPU
    python tools/benchmark_methods.py --device cuda --overrides '{"feature_size": 48, "features": [64,64,128,256,512,64]}'

Rounds alternate between the methods so that machine noise hits all of them alike.
"""

from __future__ import annotations

import glob
import os

import fire
import torch

from monai.bundle import ConfigParser
from monai.data import list_data_collate

from timing import device_name, time_alternating

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
    items = []
    for _ in range(batch):
        sample = {"image": torch.rand(1, *roi)}
        for t in tail:
            sample = t(sample)
        items.append(sample)
    batch = list_data_collate(items)
    network = parser.get_parsed_content("network_def").to(device).train()
    return {
        "network": network,
        "loss": parser.get_parsed_content("loss"),
        "prepare": parser.get_parsed_content("prepare_batch"),
        "optimizer": torch.optim.AdamW(network.parameters(), lr=1e-4),
        "batch": batch,
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


def main(
    device: str = "cpu", batch: int = 2, steps: int = 3, warmup: int = 1, rounds: int = 2, amp: bool = False,
    overrides: dict | None = None,
) -> dict:
    """Seconds per training step of each pre-training bundle; prints a table."""
    device = torch.device(device)
    overrides = dict(overrides or {})
    bundles = sorted(os.path.basename(os.path.dirname(os.path.dirname(p)))
                     for p in glob.glob(os.path.join(REPO, "bundles", "*_pretrain", "configs", "train.json")))
    parts = {b: build(b, device, overrides, batch) for b in bundles}

    result = time_alternating({b: (lambda p=p: step(p, device, amp)) for b, p in parts.items()}, device, steps, warmup, rounds)
    print(f"{device_name(device)}; batch {batch}; overrides {overrides or 'none (demo settings)'}")
    for b, seconds in result.items():
        print(f"  {b}: {seconds:.2f} s/step")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
