"""Does the collection work on this CUDA machine, and how fast? Every GPU measurement of the project in one command.

    python tools/gpu_check.py --output_dir gpu_check                        # a CUDA GPU: the paper's settings
    python tools/gpu_check.py --device cpu --smoke True --output_dir /tmp/c  # every part on tiny settings (CI)

A bare GPU machine needs the wheels of ``tools/gpu_wheels.sh`` first (see ``docs/performance.md``).

The parts, each in a process of its own with its own time limit, so that a part that fails or hangs is reported
with its error and the others still run:

- ``environment``: GPU, driver, torch, CUDA, cuDNN and MONAI versions;
- ``main_job``: the README's main job (HybridMIM-UNet pre-training) end to end, its epochs cut to fit: time, peak
  memory, ``model.pt`` written, the probe's last Dice;
- ``finetune``: the spleen bundle for one epoch with validation, then its ``evaluate.json`` and ``inference.json``;
- ``step``: the HybridMIM step at the paper's settings (UNet 96³, batch 4, widths 64-512, the 64³ box): fp32,
  bf16, bf16 + channels-last, bf16 + ``torch.compile`` (compile time apart), the shared trunk against the
  duplicated pass and one view, partial against full reconstruction, SwinUNETR 48; each with its peak memory and
  its achieved TFLOP/s (the step's FLOPs counted once with ``FlopCounterMode``, over the measured time);
- ``pipeline``: the data pipeline's crops/s beside the crops/s that the measured bf16 step consumes;
- ``ddp``: two processes of the pre-training bundle under ``torchrun`` (NCCL) where the machine has two GPUs;
  on a CPU smoke run, two gloo processes; otherwise skipped, and said so.

Written: ``<output_dir>/gpu_check.json`` (everything) and ``gpu_check.md`` (the tables, also printed). The
targets of ``docs/performance.md`` are reported beside the figures, never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

import fire

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARTS = ("environment", "main_job", "finetune", "step", "pipeline", "ddp")
LIMITS = {"environment": 60, "main_job": 120, "finetune": 120, "step": 300, "pipeline": 60, "ddp": 120}  # seconds
SMOKE_LIMITS = {"environment": 60, "main_job": 240, "finetune": 240, "step": 600, "pipeline": 180, "ddp": 300}
PEAK_BF16_TFLOPS = {"H200": 790.0}  # dense bf16 matrix peak the project measures against; --peak_tflops for others
TINY_UNET = [4, 4, 8, 8, 16, 4]
STEP_TARGET_SECONDS = 0.25


def _bundle_args(bundle_root: str, overrides: dict) -> list[str]:
    args = ["--bundle_root", bundle_root]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _run_bundle(config_files: list[str], run_id: str, args: list[str], timeout: float) -> float:
    """``python -m monai.bundle run`` in a process of its own; its seconds. Raises with the log's end on failure."""
    configs = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, *args]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def _config(bundle: str, name: str) -> str:
    return os.path.join(REPO, "bundles", bundle, "configs", name)


def _device_overrides(device: str) -> dict:
    """A CPU run on a machine that has a GPU too: the bundles pick CUDA when they see it."""
    return {} if device == "cuda" else {"device": "$torch.device('cpu')", "amp": False}


def part_environment(device: str, smoke: bool, work: str) -> dict:
    import monai
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "monai": monai.__version__, "gpus": torch.cuda.device_count(), "device": device}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported())
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            found["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()[0]
    else:
        found.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return found


def part_main_job(device: str, smoke: bool, work: str) -> dict:
    """The UNet pre-training bundle as the README runs it, in this process, so that its peak memory is ours."""
    import torch

    from monai.bundle import run

    from hybridmim_components.probe import read_probe_log

    root = os.path.join(work, "main_job")
    overrides = {"max_epochs": 4, "epoch_length": 10, "val_interval": 2, "probe_interval": 2}
    if smoke:
        overrides = {"features": TINY_UNET, "roi_size": [32, 32, 32], "reconstruction_roi": [16, 16, 16],
                     "sub_volume_size": 16, "patch_size": 8, "max_epochs": 2, "epoch_length": 2, "val_interval": 1,
                     "probe_interval": 1, "num_workers": 0}
    overrides.update(_device_overrides(device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run("training", config_file=_config("hybridmim_unet_pretrain", "train.json"), bundle_root=root, **{
        k: v for k, v in overrides.items()})
    seconds = time.perf_counter() - start
    model = os.path.join(root, "models", "model.pt")
    probes = read_probe_log(os.path.join(root, "runs", "probe.jsonl"))
    from hybridmim_studies.timing import peak_rss_gib

    return {"seconds": seconds, "model_pt": os.path.isfile(model), "probes": len(probes),
            "probe_dice": probes[-1]["dice"] if probes else None,
            "amp": device == "cuda", "settings": {k: v for k, v in overrides.items() if k not in ("device", "amp")},
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak_rss_gib(),
            "peak_kind": "max_memory_allocated" if device == "cuda" else "peak RSS"}


def part_finetune(device: str, smoke: bool, work: str) -> dict:
    bundle, root = "msd_spleen_segmentation", os.path.join(work, "finetune")
    overrides = {"max_epochs": 1, "val_interval": 1, **_device_overrides(device)}
    if smoke:
        overrides.update(features=TINY_UNET, roi_size=[32, 32, 32], num_workers=0)
    args = _bundle_args(root, overrides)
    limit = (SMOKE_LIMITS if smoke else LIMITS)["finetune"]
    found = {"train_seconds": _run_bundle([_config(bundle, "train.json")], "training", args, limit)}
    found["evaluate_seconds"] = _run_bundle([_config(bundle, "train.json"), _config(bundle, "evaluate.json")], "run",
                                            args, limit)
    with open(os.path.join(root, "eval", "metrics.json")) as f:
        found["evaluate"] = json.load(f)
    infer = {k: v for k, v in overrides.items() if k not in ("max_epochs", "val_interval")}
    if smoke:  # one volume, not the twelve phantoms
        infer["dataset_dir"] = os.path.join(root, "data", "phantoms_spleen", "imagesTr", "phantom_000.nii.gz")
    infer_args = _bundle_args(root, infer)
    found["inference_seconds"] = _run_bundle([_config(bundle, "inference.json")], "run", infer_args, limit)
    found["predictions"] = len(os.listdir(os.path.join(root, "predictions")))
    return found


def _flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def part_step(device: str, smoke: bool, work: str, peak_tflops: float = 0.0) -> dict:
    """The step benchmark's configurations, each built once: first call (compile and autotuning), peak memory,
    FLOPs of one step, then seconds per step, timed side by side."""
    import torch

    from hybridmim_studies.step_benchmark import PAPER_FEATURES, build, configurations
    from hybridmim_studies.timing import time_alternating

    dev = torch.device(device)
    if smoke:
        settings = {"roi": 64, "box": 32, "features": TINY_UNET, "swin_feature_size": 12, "batch": 1}
        timing = {"steps": 1, "warmup": 0, "rounds": 1}
    else:
        settings = {"roi": 96, "box": 64, "features": PAPER_FEATURES, "swin_feature_size": 48, "batch": 4}
        timing = {"steps": 5, "warmup": 2, "rounds": 3}
    # the GPU rows on a CPU smoke run too (bf16 autocast and channels-last run there), so that they do not rot
    # between GPU loans; not compile, whose CPU backend is not the GPU's and takes 1.5 minutes on 2 cores
    configs = configurations(torch.device("cuda"), settings["swin_feature_size"])
    if smoke:
        # and one row of each kind: the views, the reconstruction, each GPU option, the other backbone
        configs = {n: c for n, c in configs.items() if "compile" not in n and "duplicated" not in n
                   and "stop-gradient" not in n and (not n.startswith("SwinUNETR") or n.endswith("shared trunk"))}
    rows = {}
    steps = {}
    for name, config in configs.items():
        step = build(config, dev, settings["roi"], settings["box"], tuple(settings["features"]),
                     settings["swin_feature_size"], settings["batch"])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()  # compile, cuDNN autotuning
        if device == "cuda":
            torch.cuda.synchronize()
        rows[name] = {"first_step_seconds": time.perf_counter() - start,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
        eager = {**config, "gpu": config.get("gpu", "").replace(" + compile", "")}  # the same arithmetic, countable
        counted = step if eager == config else build(eager, dev, settings["roi"], settings["box"],
                                                     tuple(settings["features"]), settings["swin_feature_size"],
                                                     settings["batch"])
        rows[name]["flops"] = _flops(counted)
        steps[name] = step
    seconds = time_alternating(steps, dev, **timing)
    for name, sec in seconds.items():
        rows[name]["seconds"] = sec
        rows[name]["tflops"] = rows[name]["flops"] / sec / 1e12
        if peak_tflops:
            rows[name]["fraction_of_peak"] = rows[name]["tflops"] / peak_tflops
    return {"settings": settings, "rows": rows, "peak_tflops": peak_tflops or None}


def part_pipeline(device: str, smoke: bool, work: str) -> dict:
    """Crops/s of the pre-training pipeline; the step's need comes from the step part's bf16 row, if it ran."""
    from hybridmim_studies.pipeline_benchmark import main as pipeline

    step_seconds = STEP_TARGET_SECONDS
    measured = os.path.join(work, "part_step.json")
    if os.path.isfile(measured):
        with open(measured) as f:
            rows = json.load(f).get("result", {}).get("rows", {})
        row = rows.get("UNet, shared trunk, bf16") or rows.get("UNet, shared trunk")
        if row:
            step_seconds = row["seconds"]
    batch_size, crops = 2, 2
    kwargs = {"roi": 32, "batches": 3, "workers": (0,)} if smoke else {"roi": 96, "batches": 20, "workers": (0, 4, 8)}
    rates = pipeline(device=device, batch_size=batch_size, crops_per_volume=crops, step_seconds=step_seconds, **kwargs)
    needed = batch_size * crops / step_seconds
    return {"step_seconds": step_seconds, "crops_per_second_needed": needed,
            "loaders": {k: v for k, v in rates.items() if k != "cache_seconds_per_volume"},
            "cache_seconds_per_volume": rates["cache_seconds_per_volume"]}


def part_ddp(device: str, smoke: bool, work: str) -> dict:
    import torch

    if device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU on this machine; DDP needs two"}
    if device == "cpu" and not smoke:
        return {"skipped": "a CPU run without --smoke: nothing to measure"}
    bundle, root = "hybridmim_unet_pretrain", os.path.join(work, "ddp")
    overrides = {"max_epochs": 2, "epoch_length": 4, "val_interval": 2, "probe_interval": 0}
    if smoke:
        overrides.update(features=TINY_UNET, roi_size=[32, 32, 32], reconstruction_roi=[16, 16, 16],
                         sub_volume_size=16, patch_size=8, num_workers=0, epoch_length=2)
    configs = f"['{_config(bundle, 'train.json')}','{_config(bundle, 'multi_gpu_train.json')}']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "monai.bundle", "run", "--config_file", configs, *_bundle_args(root, overrides)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=(SMOKE_LIMITS if smoke else LIMITS)["ddp"] - 10,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"two-process run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {"processes": 2, "backend": "nccl" if device == "cuda" else "gloo", "seconds": time.perf_counter() - start,
            "model_pt": os.path.isfile(os.path.join(root, "models", "model.pt"))}


def _one_part(part: str, device: str, smoke: bool, work: str, peak_tflops: float) -> None:
    """Child process: run one part and write ``part_<name>.json``, with the error if it failed."""
    import torch

    torch.backends.cudnn.benchmark = device == "cuda"
    start = time.perf_counter()
    try:
        kwargs = {"peak_tflops": peak_tflops} if part == "step" else {}
        result = globals()[f"part_{part}"](device, smoke, work, **kwargs)
        status = "skipped" if "skipped" in result else "ok"
        record = {"status": status, "result": result}
    except Exception as e:  # reported, and the other parts still run
        record = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    record["seconds"] = time.perf_counter() - start
    with open(os.path.join(work, f"part_{part}.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)


def _cell(value, digits=3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The report's tables, with the targets beside the figures."""
    parts = report["parts"]
    env = parts["environment"].get("result", {})
    lines = [f"# GPU check: {env.get('gpu') or 'CPU'} ({'smoke' if report['smoke'] else 'full'} settings)", "",
             "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name in PARTS:
        p = parts[name]
        note = (p.get("error") or "").strip().split("\n")[0][:120] if p["status"] != "ok" else ""
        note = p.get("result", {}).get("skipped", note)
        lines.append(f"| {name} | {p['status']} | {p['seconds']:.0f} | {note} |")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    main = parts["main_job"].get("result")
    if main:
        lines += ["", f"Main job: {main['seconds']:.1f} s (target on a GPU: under 60 s), {main['peak_kind']} "
                      f"{main['peak_gib']:.2f} GiB, model.pt written: {main['model_pt']}, {main['probes']} probes, "
                      f"last probe Dice {_cell(main['probe_dice'])}; settings {main['settings']}"]
    fine = parts["finetune"].get("result")
    if fine:
        lines += ["", f"Fine-tuning (spleen): one epoch with validation {fine['train_seconds']:.1f} s, evaluate.json "
                      f"{fine['evaluate_seconds']:.1f} s, inference.json {fine['inference_seconds']:.1f} s "
                      f"({fine['predictions']} predictions)"]
    step = parts["step"].get("result")
    if step:
        rows = step["rows"]
        lines += ["", f"Step, settings {step['settings']}:", "",
                  "| configuration | s/step | first step (s) | peak GiB | TFLOP/s | of peak |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['seconds']:.3f} | {r['first_step_seconds']:.2f} | {_cell(r['peak_gib'], 2)} "
                         f"| {r['tflops']:.3g} | {_cell(r.get('fraction_of_peak'), 3)} |")
        targets = []
        bf16 = rows.get("UNet, shared trunk, bf16")
        if bf16:
            targets.append(f"bf16 UNet step {bf16['seconds']:.3f} s (target at most {STEP_TARGET_SECONDS} s)")
        trunk, one = rows.get("UNet, shared trunk"), rows.get("UNet, one view (contrastive_views=1)")
        if trunk and one:
            targets.append(f"second view {trunk['seconds'] / one['seconds'] - 1:+.0%} of a step (target at most 15 %)")
        full = rows.get("UNet, shared trunk, full reconstruction")
        if trunk and full:
            targets.append(f"partial reconstruction {full['seconds'] / trunk['seconds']:.2f}x faster than full "
                           "(target at least 1.5x)")
        lines += ["", "Targets: " + "; ".join(targets) + "."]
    pipe = parts["pipeline"].get("result")
    if pipe:
        lines += ["", f"Pipeline: a step of {pipe['step_seconds']:.3f} s needs {pipe['crops_per_second_needed']:.1f} "
                      "crops/s (target: at least twice that)", "", "| loader | crops/s | x the need |", "| --- | --- | --- |"]
        for name, rate in pipe["loaders"].items():
            lines.append(f"| {name} | {rate:.1f} | {rate / pipe['crops_per_second_needed']:.1f} |")
    return "\n".join(lines) + "\n"


def main(output_dir: str = "gpu_check", device: str = "", smoke: bool = False, parts: tuple = PARTS,
         peak_tflops: float = 0.0, part: str = "") -> dict:
    """Run the parts (all by default) and write ``gpu_check.json`` and ``gpu_check.md`` in ``output_dir``.

    Args:
        device: ``cuda`` (the default where a GPU is visible) or ``cpu``.
        smoke: tiny settings for every part, minutes on a CPU.
        parts: a subset of the parts to run, e.g. ``"[step]"``.
        peak_tflops: the GPU's dense bf16 peak, for the fraction reached (known: H200).
        part: internal, the part a child process runs.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU; pass --device cpu --smoke True for the CPU run.")
    os.makedirs(output_dir, exist_ok=True)
    work = os.path.abspath(output_dir)
    if part:
        _one_part(part, device, smoke, work, peak_tflops)
        return {}
    if not peak_tflops and device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; the parts are {', '.join(PARTS)}.")
    report = {"device": device, "smoke": smoke, "parts": {}}
    for name in PARTS:
        if name not in parts:
            report["parts"][name] = {"status": "not asked for", "seconds": 0.0}
            continue
        limit = (SMOKE_LIMITS if smoke else LIMITS)[name]
        command = [sys.executable, os.path.abspath(__file__), "--part", name, "--device", device, "--smoke", str(smoke),
                   "--output_dir", work, "--peak_tflops", str(peak_tflops)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
            with open(os.path.join(work, f"part_{name}.json")) as f:
                report["parts"][name] = json.load(f)
            if proc.returncode != 0:
                report["parts"][name].setdefault("error", proc.stderr[-2000:])
        except subprocess.TimeoutExpired:
            report["parts"][name] = {"status": "timed out", "error": f"over its limit of {limit} s",
                                     "seconds": time.perf_counter() - start}
        except FileNotFoundError:  # the child died before writing its record
            report["parts"][name] = {"status": "failed", "error": proc.stderr[-2000:],
                                     "seconds": time.perf_counter() - start}
        print(f"{name}: {report['parts'][name]['status']} ({report['parts'][name]['seconds']:.0f} s)", flush=True)
    table = markdown(report)
    with open(os.path.join(work, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(work, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table)
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
