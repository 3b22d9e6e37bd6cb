# Copyright 2026 hybridmim-bundles contributors
# Licensed under the Apache License, Version 2.0
"""A segmentation probe during pre-training: is the encoder getting better at what fine-tuning will ask of it?

Pre-training logs only its pretext losses, and a falling reconstruction error says little about segmentation.
``SegmentationProbe`` measures it directly, on the fly. Every ``interval`` epochs, and once before the first
(the random encoder, the baseline every later value is read against):

1. the encoder is frozen (evaluation mode, no gradients) and encodes a few labelled crops;
2. every encoder level is brought onto one grid at 1/``feature_scale`` of the crop (finer levels average-pooled,
   coarser ones interpolated) and the levels are concatenated, each channel standardised over the fitting crops;
3. a linear head (a 1x1x1 convolution) from those features to the classes is fitted for ``steps`` full-batch
   Adam steps against the label's class fractions in each cell of that grid (cross-entropy plus soft Dice);
4. the head's logits on crops of held-out volumes are interpolated back to full resolution, and the score is
   the mean over classes of the Dice pooled over all held-out crops (a class absent from them does not count).

A linear head on frozen features measures what the features already separate, not what a trained decoder could
learn; the budget is fixed, so values at different epochs compare like with like. The probe draws from its own
seeded generators and restores the global random state, so it changes neither the training's random stream (an
exact resume stays exact) nor any weight or buffer of the network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events

__all__ = ["plateaued", "StopAtProbePlateau", "PROBE_METRIC", "multiscale_features", "class_fractions", "pooled_dice", "SegmentationProbe",
           "read_probe_log"]

PROBE_METRIC = "probe_dice"  # key in the trainer's ``state.metrics`` at the epochs the probe runs


def multiscale_features(features: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
    """Encoder feature maps (N, C_l, ...) at any scales, each resized onto ``grid`` and concatenated:
    (N, sum of C_l, *grid). Maps finer than the grid are average-pooled, coarser ones interpolated."""
    resized = []
    for f in features:
        f = f.float()
        if all(s >= g for s, g in zip(f.shape[2:], grid)):
            resized.append(F.adaptive_avg_pool3d(f, tuple(grid)))
        else:
            resized.append(F.interpolate(f, size=tuple(grid), mode="trilinear", align_corners=False))
    return torch.cat(resized, 1)


def class_fractions(label: torch.Tensor, num_classes: int, scale: int) -> torch.Tensor:
    """(N, 1, D, H, W) integer labels -> (N, num_classes, D/scale, H/scale, W/scale): the fraction of each cell's
    voxels in each class."""
    one_hot = F.one_hot(label[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).float()
    return F.avg_pool3d(one_hot, scale)


def pooled_dice(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float | None]:
    """Dice of each foreground class 1..num_classes-1, its voxels pooled over all crops of (N, D, H, W) integer
    ``prediction`` and ``label``; ``None`` for a class absent from ``label``."""
    scores = []
    for c in range(1, num_classes):
        p, t = prediction == c, label == c
        truth = int(t.sum())
        scores.append(None if truth == 0 else 2.0 * float((p & t).sum()) / (float(p.sum()) + truth))
    return scores


class SegmentationProbe:
    """Fit a linear segmentation head on the frozen encoder every ``interval`` epochs; log its held-out Dice.

    Args:
        network: the pre-training network (not its DDP wrapper); ``network.encode(x)`` takes (N, C, D, H, W)
            crops and returns the encoder's feature maps, finest first.
        data: labelled items ``{"image": ..., "label": ...}``, or a function that returns them (called at the
            first probe, so that a probe that never runs reads nothing); the last ``held_out`` are scored, the
            others fit.
        preprocessing: turns an item into a list of crop dicts (or one dict) with ``image`` (C, D, H, W) and
            ``label`` (1, D, H, W), D, H, W multiples of ``feature_scale`` and of the encoder's down-sampling.
            Its random transforms are seeded once with ``seed``; the crops are read once and kept.
        num_classes: classes of the label, background included.
        interval: epochs between probes; the probe runs after epochs interval, 2 interval, ... and before the
            first epoch of a fresh run. 0 turns it off (``attach`` does nothing).
        held_out: how many of the volumes are held out for the score (at least 1, fewer than ``len(data)``).
        steps, learning_rate: the head's fitting budget (full-batch Adam).
        feature_scale: the features' grid is the crop's divided by this.
        class_names: names of the foreground classes, for the log.
        log_file: JSON Lines file that gets one record per probe (epoch, iteration, Dice, per-class Dice,
            seconds); ``None`` for none.
        device: where the encoder runs.
        amp_dtype: autocast dtype for the encoder on CUDA, ``None`` for fp32.
        seed: seeds the crops (the head starts from zero, so the same encoder always gets the same score).
    """

    def __init__(
        self,
        network: nn.Module,
        data: Sequence[Mapping] | Callable[[], Sequence[Mapping]],
        preprocessing: Callable,
        num_classes: int,
        interval: int = 2,
        held_out: int = 2,
        steps: int = 100,
        learning_rate: float = 0.05,
        feature_scale: int = 4,
        class_names: Sequence[str] | None = None,
        log_file: str | None = None,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if not callable(getattr(network, "encode", None)):
            raise TypeError(f"the probe needs a network with an encode(x) method, got {type(network).__name__}.")
        if interval < 0:
            raise ValueError(f"probe interval must be a number of epochs (0: no probe), got {interval}.")
        if held_out < 1:
            raise ValueError(f"the probe must hold out at least one volume, got held_out={held_out}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes - 1:
            raise ValueError(f"class_names must name the {num_classes - 1} foreground classes, got {len(class_names)}.")
        self.network, self.data, self.preprocessing = network, data, preprocessing
        self.num_classes, self.interval, self.held_out = num_classes, interval, held_out
        self.steps, self.learning_rate, self.feature_scale = steps, learning_rate, feature_scale
        self.class_names = list(class_names) if class_names else [str(c) for c in range(1, num_classes)]
        self.log_file, self.device, self.amp_dtype, self.seed = log_file, torch.device(device), amp_dtype, seed
        self._crops: tuple[dict, dict] | None = None

    # ---- the measurement -------------------------------------------------------------------------------------
    def _read_crops(self) -> tuple[dict, dict]:
        """The fitting and held-out crops, read once: ``{"image": (N, C, ...), "label": (N, 1, ...)}`` each."""
        if self._crops is None:
            if hasattr(self.preprocessing, "set_random_state"):
                self.preprocessing.set_random_state(seed=self.seed)

            def stack(items: Sequence[Mapping]) -> dict:
                crops = []
                for item in items:
                    out = self.preprocessing(dict(item))
                    crops.extend(out if isinstance(out, list) else [out])
                return {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in ("image", "label")}

            data = list(self.data() if callable(self.data) else self.data)
            if len(data) <= self.held_out:
                raise ValueError(f"the probe needs at least one labelled volume to fit and {self.held_out} to hold "
                                 f"out, but its data has {len(data)}; give more with --probe_datalist.")
            fit, held_out = data[: -self.held_out], data[-self.held_out:]
            self._crops = stack(fit), stack(held_out)
            shape = tuple(self._crops[0]["image"].shape[2:])
            if any(s % self.feature_scale for s in shape):
                raise ValueError(f"probe crops {shape} must be multiples of feature_scale {self.feature_scale}.")
            labels = torch.cat([self._crops[0]["label"], self._crops[1]["label"]])
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"probe labels hold values {labels.unique().tolist()}, outside "
                                 f"0..{self.num_classes - 1}; set probe_num_classes to the label's classes.")
        return self._crops

    @torch.no_grad()
    def _features(self, images: torch.Tensor, batch: int = 2) -> torch.Tensor:
        grid = [s // self.feature_scale for s in images.shape[2:]]
        autocast = self.amp_dtype is not None and self.device.type == "cuda"
        out = []
        for start in range(0, len(images), batch):
            x = images[start:start + batch].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=autocast):
                out.append(multiscale_features(self.network.encode(x), grid))
        return torch.cat(out)

    def _fit_head(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights (K, C) and bias (K, 1) of a linear map from (C, M) feature vectors to (K, M) class logits,
        fitted to (K, M) class fractions: a 1x1x1 convolution, written as one matrix product over the M grid
        cells, whose softmax runs along rows of M contiguous values (several times faster on a CPU)."""
        weight = torch.zeros(self.num_classes, features.shape[0], device=features.device, requires_grad=True)
        bias = torch.zeros(self.num_classes, 1, device=features.device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.learning_rate)
        present = targets.sum(1) > 0
        present[0] = False  # the soft Dice is over the foreground classes that the fitting crops hold
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            log_p = F.log_softmax(weight @ features + bias, 0)
            cross_entropy = -(targets * log_p).sum() / features.shape[1]
            p = log_p.exp()
            dice = (2 * (p * targets).sum(1) + 1e-5) / (p.sum(1) + targets.sum(1) + 1e-5)
            soft_dice = 1 - dice[present].mean() if present.any() else torch.zeros((), device=features.device)
            (cross_entropy + soft_dice).backward()
            optimizer.step()
        return weight.detach(), bias.detach()

    def measure(self) -> dict:
        """Fit the head on the encoder as it is now and score it: ``{"dice": mean, "dice_per_class": {...}}``."""
        fit, held_out = self._read_crops()
        was_training = self.network.training
        devices = [self.device] if self.device.type == "cuda" else []
        self.network.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)  # for an encoder that draws at evaluation: the same score each time
                try:
                    x_fit, x_val = self._features(fit["image"]), self._features(held_out["image"])
                except RuntimeError as e:
                    raise RuntimeError(
                        f"the segmentation probe could not encode its crops of shape {tuple(fit['image'].shape[1:])} "
                        f"({e}). Its volumes (--probe_datalist, default: 1-channel CT phantoms) and "
                        "probe#preprocessing must give what the network takes (channels, intensity scaling); or "
                        "turn it off with --probe_interval 0.") from e
                grid = x_val.shape[2:]
                x_fit, x_val = (x.transpose(0, 1).flatten(1) for x in (x_fit, x_val))  # (C, M): M grid cells
                mean, std = x_fit.mean(1, keepdim=True), x_fit.std(1, keepdim=True) + 1e-6
                targets = class_fractions(fit["label"], self.num_classes, self.feature_scale).to(self.device)
                with torch.enable_grad():
                    weight, bias = self._fit_head((x_fit - mean) / std, targets.transpose(0, 1).flatten(1))
                logits = (weight @ ((x_val - mean) / std) + bias).unflatten(1, (len(held_out["image"]), *grid))
                logits = F.interpolate(logits.transpose(0, 1), size=held_out["label"].shape[2:], mode="trilinear",
                                       align_corners=False)
                prediction = logits.argmax(1).cpu()
        finally:
            self.network.train(was_training)
        per_class = pooled_dice(prediction, held_out["label"][:, 0], self.num_classes)
        scored = [d for d in per_class if d is not None]
        return {
            "dice": sum(scored) / len(scored) if scored else float("nan"),
            "dice_per_class": dict(zip(self.class_names, per_class)),
        }

    # ---- the handler -----------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Probe before a fresh run's first epoch and at the last iteration of every ``interval``-th epoch, so
        that the score is in ``engine.state.metrics[PROBE_METRIC]`` when the epoch's loggers run (MONAI's
        ``StatsHandler``, ``TensorBoardStatsHandler``, MLflow tracking). With ``interval`` 0 it does nothing."""
        if self.interval == 0:
            return
        engine.add_event_handler(Events.STARTED, self._before_training)
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget)
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._ends_probe_epoch), self._after_epoch)

    def _ends_probe_epoch(self, engine: Engine, iteration: int) -> bool:
        length = engine.state.epoch_length
        return iteration % length == 0 and (iteration // length) % self.interval == 0

    def _before_training(self, engine: Engine) -> None:
        if engine.state.epoch == 0:  # not on a resumed run: its epoch 0 was measured when it first started
            self._record(engine, epoch=0)

    def _after_epoch(self, engine: Engine) -> None:
        epoch = engine.state.iteration // engine.state.epoch_length
        engine.state.metrics[PROBE_METRIC] = self._record(engine, epoch=epoch)

    def _forget(self, engine: Engine) -> None:
        engine.state.metrics.pop(PROBE_METRIC, None)  # a value only at the epochs it was measured

    def _record(self, engine: Engine, epoch: int) -> float:
        start = time.perf_counter()
        result = self.measure()
        record = {"epoch": epoch, "iteration": engine.state.iteration, **result,
                  "seconds": round(time.perf_counter() - start, 3)}
        engine.logger.info(f"probe at epoch {epoch}: held-out Dice {result['dice']:.4f} of a linear head on the "
                           f"frozen encoder ({record['seconds']:.1f} s)")
        if self.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        return result["dice"]


def read_probe_log(path: str) -> list[dict]:
    """The records of a probe's JSON Lines log, one per epoch (a resumed run's later record of an epoch wins),
    sorted by epoch."""
    records: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record["epoch"]] = record
    return [records[e] for e in sorted(records)]


def plateaued(scores: Sequence[float], min_gain: float = 0.005, patience: int = 3) -> bool:
    """Whether the last ``patience`` of ``scores`` (in the order measured) all stay within ``min_gain`` of the best
    score before them; False until there are ``patience + 1`` scores."""
    if len(scores) <= patience:
        return False
    return max(scores[-patience:]) <= max(scores[:-patience]) + min_gain


class StopAtProbePlateau:
    """End a pre-training run when its probe stops improving (``plateaued``: no gain above ``min_gain`` over
    the best earlier probe in ``patience`` probes), the run's ``max_epochs`` being the cap.

    The probes after the first epoch count; the random encoder's (epoch 0) does not. The decision is read from the
    probe's log (``SegmentationProbe(log_file=...)``) after every epoch, so a resumed run stops where the
    uninterrupted one would have. Ending through ``terminate`` completes the run: ``model.pt`` is written.
    """

    def __init__(self, log_file: str, min_gain: float = 0.005, patience: int = 3) -> None:
        if patience < 1 or min_gain < 0:
            raise ValueError(f"patience must be at least 1 and min_gain at least 0, got {patience} and {min_gain}.")
        self.log_file, self.min_gain, self.patience = log_file, min_gain, patience

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not os.path.isfile(self.log_file):
            return
        records = [r for r in read_probe_log(self.log_file) if 0 < r["epoch"] <= engine.state.epoch]
        if plateaued([r["dice"] for r in records], self.min_gain, self.patience):
            engine.logger.info(f"the probe has plateaued at epoch {engine.state.epoch} (no gain above "
                               f"{self.min_gain} in {self.patience} probes): pre-training ends here")
            engine.terminate()

