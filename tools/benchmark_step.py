"""Time HybridMIM(UNet) training steps: partial vs full reconstruction, fp32 vs AMP, measured side by side.

    python tools/benchmark_step.py                                   # demo settings, CPU
    python tools/benchmark_step.py --device cuda --roi 96 --box 64 \\
        --features "[64,64,128,256,512,64]" --batch 4                 # the paper's settings on a GPU

Each configuration runs ``warmup`` untimed steps, then ``steps`` timed ones (forward, loss, backward, AdamW step)
on random masked crops; the configurations alternate round by round so that machine noise hits all of them.
"""

from __future__ import annotations

import fire
import torch

from monai.data import list_data_collate

from hybridmim_components.losses import HybridMIMLoss
from hybridmim_components.networks import HybridMIMUNet
from hybridmim_components.transforms import TwoLevelMaskd
from timing import device_name, time_alternating


def main(
    device: str = "cpu",
    roi: int = 64,
    box: int = 32,
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8),
    batch: int = 2,
    steps: int = 10,
    warmup: int = 2,
    rounds: int = 2,
) -> dict[str, float]:
    """Return (and print) seconds per step for each configuration."""
    device = torch.device(device)
    precisions = [False, True] if device.type == "cuda" else [False]
    configs = {
        f"{'partial' if b else 'full'} box {b or roi}^3, {'AMP' if amp else 'fp32'}": (b, amp)
        for b in (box, None)
        for amp in precisions
    }
    masking = TwoLevelMaskd("image")
    loss_fn = HybridMIMLoss()
    batch_data = list_data_collate([masking({"image": torch.rand(1, roi, roi, roi)}) for _ in range(batch)])
    batch_data = {k: v.to(device) for k, v in batch_data.items()}
    setups = {}
    for name, (b, amp) in configs.items():
        net = HybridMIMUNet(features=features, roi_size=b).to(device)
        setups[name] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4), torch.amp.GradScaler(enabled=amp), amp)

    def step(net, opt, scaler, amp):
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(batch_data["image"]), batch_data)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    result = time_alternating(
        {name: (lambda setup=setup: step(*setup)) for name, setup in setups.items()}, device, steps, warmup, rounds
    )
    print(f"{device_name(device)}; crop {roi}^3, batch {batch}, features {tuple(features)}")
    for name, seconds in result.items():
        print(f"  {name}: {seconds:.3f} s/step")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # main prints its own table
