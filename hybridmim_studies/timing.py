"""Side-by-side timing for the benchmark tools: configurations alternate round by round, so that the noise of a
shared machine hits all of them alike. And the peak memory of a process."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def time_alternating(
    steps_by_name: Mapping[str, Callable[[], None]], device: torch.device, steps: int, warmup: int, rounds: int
) -> dict[str, float]:
    """Seconds per call of each callable: ``warmup`` untimed calls each, then ``rounds`` x ``steps`` timed."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    totals = dict.fromkeys(steps_by_name, 0.0)
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            totals[name] += time.perf_counter() - start
    return {name: total / (steps * rounds) for name, total in totals.items()}


def peak_rss_gib() -> float:
    """This process's peak resident memory. Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``exec``,
    so a child started by a large parent reports the parent's peak; ``VmHWM`` belongs to the new address space."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib / 2**20
