"""Time HybridMIM training steps side by side: the dropout views (duplicated pass, shared trunk, stop-gradient,
one view), partial vs full reconstruction, both backbones, and on a GPU fp32 vs bf16 vs compile vs channels-last;
with the peak memory of each.

    python tools/benchmark_step.py                                    # demo settings, CPU
    python tools/benchmark_step.py --paper True                       # the paper's UNet settings (96^3, widths 64-512)
    python tools/benchmark_step.py --paper True --device cuda --batch 4 --swin_feature_size 48

A step is what the trainer does: batch masking on the device (``PrepareMaskedBatch`` + ``TwoLevelMask``),
forward, the five-term loss, backward, AdamW. Each configuration runs ``warmup`` untimed steps, then
``rounds`` x ``steps`` timed ones; the configurations alternate round by round so that machine noise hits all
of them alike. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak RSS of a fresh
process that builds only that configuration and runs one step (``--memory False`` skips it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext

import fire
import torch

from hybridmim_components.engines import PrepareMaskedBatch
from hybridmim_components.losses import HybridMIMLoss
from hybridmim_components.networks import HybridMIMSwinUNETR, HybridMIMUNet
from hybridmim_components.transforms import TwoLevelMask
from hybridmim_studies.timing import device_name, peak_rss_gib, time_alternating

PAPER_FEATURES = (64, 64, 128, 256, 512, 64)

# name -> (network arguments, loss arguments); configurations() adds the backbone and the GPU options
VIEWS = {
    "duplicated pass (dropout everywhere)": ({"dropout_levels": None}, {}),
    "shared trunk": ({}, {}),
    "shared trunk + stop-gradient": ({"stop_gradient": True}, {}),
    "one view (contrastive_views=1)": ({"contrastive_views": 1}, {"contrastive_weight": 0.0}),
}


def configurations(device: torch.device, swin_feature_size: int) -> dict[str, dict]:
    configs = {}
    for name, (net_kwargs, loss_kwargs) in VIEWS.items():
        configs[f"UNet, {name}"] = {"backbone": "unet", "net": net_kwargs, "loss": loss_kwargs}
    configs["UNet, shared trunk, full reconstruction"] = {"backbone": "unet", "net": {"roi_size": None}, "loss": {}}
    if device.type == "cuda":
        for option in ("bf16", "bf16 + channels_last", "bf16 + compile"):
            configs[f"UNet, shared trunk, {option}"] = {"backbone": "unet", "net": {}, "loss": {}, "gpu": option}
        configs["UNet, duplicated pass (dropout everywhere), bf16"] = {
            "backbone": "unet", "net": {"dropout_levels": None}, "loss": {}, "gpu": "bf16"
        }
    if swin_feature_size:
        for name in ("duplicated pass (dropout everywhere)", "shared trunk", "one view (contrastive_views=1)"):
            net_kwargs, loss_kwargs = VIEWS[name]
            configs[f"SwinUNETR, {name}"] = {"backbone": "swin", "net": net_kwargs, "loss": loss_kwargs}
        if device.type == "cuda":
            configs["SwinUNETR, shared trunk, bf16"] = {"backbone": "swin", "net": {}, "loss": {}, "gpu": "bf16"}
    return configs


def build(config: dict, device: torch.device, roi: int, box: int, features, swin_feature_size: int, batch: int):
    """The step of one configuration, as a closure over its own network, optimizer and batch."""
    gpu = config.get("gpu", "")
    net_kwargs = {"roi_size": box, **config["net"]}
    if config["backbone"] == "unet":
        net = HybridMIMUNet(features=features, **net_kwargs)
    else:
        net = HybridMIMSwinUNETR(feature_size=swin_feature_size, **net_kwargs)
    memory_format = torch.channels_last_3d if "channels_last" in gpu else torch.preserve_format
    net = net.to(device, memory_format=memory_format).train()
    model = torch.compile(net) if "compile" in gpu else net
    loss_fn = HybridMIMLoss(**config["loss"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    prepare = PrepareMaskedBatch(masking=TwoLevelMask(), memory_format=memory_format)
    images = torch.rand(batch, 1, roi, roi, roi, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in gpu else nullcontext()

    def step():
        image, targets = prepare({"image": images}, device)
        with autocast:
            loss = loss_fn(model(image), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_rss_of_one_step(name: str, args: dict) -> float:
    """Peak RSS (GiB) of a fresh process that builds configuration ``name`` alone and runs one step."""
    cmd = [sys.executable, "-m", "hybridmim_studies.step_benchmark", "--only", name, "--report_rss", "True"]
    for key, value in args.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, tuple)) else str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_gib"]


def main(
    device: str = "cpu",
    paper: bool = False,
    roi: int = 64,
    box: int = 32,
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8),
    swin_feature_size: int = 0,
    batch: int = 2,
    steps: int = 3,
    warmup: int = 1,
    rounds: int = 2,
    memory: bool = True,
    only: str = "",
    report_rss: bool = False,
) -> dict[str, dict[str, float]]:
    """Return (and print) seconds per step and peak memory (GiB) of each configuration.

    Args:
        paper: the paper's UNet settings: 96^3 crops, 64^3 box, widths 64-512 (overrides roi, box, features).
        swin_feature_size: also time HybridMIM-SwinUNETR with this feature size (48 in the paper); 0 skips it.
        only: run one configuration by name (used for the per-process memory measurement).
    """
    if paper:
        roi, box, features = 96, 64, PAPER_FEATURES
    dev = torch.device(device)
    configs = configurations(dev, swin_feature_size)
    if only:
        configs = {only: configs[only]}
    steps_by_name = {n: build(c, dev, roi, box, tuple(features), swin_feature_size, batch) for n, c in configs.items()}
    if report_rss:  # child process of peak_rss_of_one_step
        steps_by_name[only]()
        print(json.dumps({"peak_rss_gib": peak_rss_gib()}))
        return {}

    if dev.type == "cuda" and memory:
        peaks = {}
        for name, step in steps_by_name.items():
            step()  # warm-up outside the measurement (compile, cuDNN autotuning)
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            step()
            torch.cuda.synchronize(dev)
            peaks[name] = torch.cuda.max_memory_allocated(dev) / 2**30
    seconds = time_alternating(steps_by_name, dev, steps, warmup, rounds)
    if dev.type != "cuda" and memory:
        args = {"device": device, "roi": roi, "box": box, "features": list(features),
                "swin_feature_size": swin_feature_size, "batch": batch}
        peaks = {name: peak_rss_of_one_step(name, args) for name in configs}

    memory_kind = "GPU max_memory_allocated" if dev.type == "cuda" else "CPU peak RSS of a one-config process"
    print(f"{device_name(dev)}; crop {roi}^3, box {box}^3, batch {batch}, UNet features {tuple(features)}"
          + (f", Swin feature size {swin_feature_size}" if swin_feature_size else ""))
    print(f"| configuration | s/step | {memory_kind} (GiB) |\n|---|---|---|")
    result = {}
    for name, sec in seconds.items():
        result[name] = {"seconds": sec, "peak_gib": peaks[name] if memory else float("nan")}
        print(f"| {name} | {sec:.3f} | {result[name]['peak_gib']:.2f} |")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # main prints its own table
