"""Exact resume: what a run's future depends on besides the weights, the optimizer and the engine's counters.

A bundle's full checkpoint (``models/checkpoint_epoch=N.pt``, written at the end of every epoch) holds, beside
``model``, ``optimizer``, ``lr_scheduler`` and ``trainer``, a ``run_state`` (``RunState``): the random states
(python, numpy, torch, CUDA, every random transform's, the generators of seeded masking), the AMP ``GradScaler``
and, for fine-tuning, the best-model saver's record. ``--resume True`` then continues bit-identically on a CPU
(on a GPU, as far as non-deterministic kernels allow), provided each epoch starts a fresh pass over the data
(``FreshDataEachEpoch``): an ignite epoch shorter than the data loader would otherwise carry its iterator, with
its shuffle order and its workers' random streams, into the next epoch, where no checkpoint can reach it.

The schedule's horizon (``t_total``, ``T_max``) comes from the resuming command, not from the checkpoint
(``ConfiguredHorizon``), so that ``--max_epochs`` can extend a run.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LambdaLR

from monai.transforms import Randomizable, Transform

__all__ = ["RunState", "ConfiguredHorizon", "FreshDataEachEpoch", "random_transforms"]


def random_transforms(transforms: Iterable) -> list[Randomizable]:
    """Every ``Randomizable`` reachable from ``transforms``, depth first: nested ``Compose`` and ``OneOf``, and the
    array transforms that dictionary transforms hold (``RandScaleIntensityd`` draws from its ``RandScaleIntensity``,
    ``RandCropByPosNegLabeld`` from its cropper), each with its own random state."""
    found: dict[int, Randomizable] = {}

    def visit(value) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, Transform) and id(value) not in found:
            if isinstance(value, Randomizable):
                found[id(value)] = value
            for attribute in vars(value).values():
                if isinstance(attribute, (Transform, list, tuple)):
                    visit(attribute)

    visit(list(transforms))
    return list(found.values())


def _portable(numpy_state: tuple) -> tuple:
    """A numpy ``RandomState`` state as plain Python values: MONAI loads checkpoints with ``weights_only=True``,
    which refuses numpy arrays."""
    name, keys, pos, has_gauss, cached = numpy_state
    return name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)


def _numpy(state: Sequence) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


class RunState:
    """The random states, the AMP scaler and the best-model record of a run, as one checkpoint entry.

    Args:
        trainer: the trainer, whose ``scaler`` (MONAI builds it when the run starts) is saved if AMP is on.
        transforms: pipelines (``Compose``) whose random transforms' ``numpy`` states are saved. With data loader
            workers those states are re-derived from torch's at each epoch; without, they carry over.
        generators: ``torch.Generator`` objects drawn from outside the global state (validation masking).
        evaluator, best_model_saver: the validation engine and its key-metric ``CheckpointSaver``: the best
            metric so far and the saver's record, so a resumed run does not replace ``model.pt`` with a worse one.

    Under DistributedDataParallel only rank 0 saves, so a resumed rank ``r`` reseeds from the saved torch state
    plus ``r``: ranks keep distinct streams and the resumed run is reproducible, not identical to an uninterrupted
    one.
    """

    def __init__(
        self,
        trainer: Engine,
        transforms: Sequence = (),
        generators: Sequence[torch.Generator] = (),
        evaluator: Engine | None = None,
        best_model_saver=None,
    ) -> None:
        self.trainer, self.generators = trainer, list(generators)
        self.randomizables = random_transforms(transforms)
        self.evaluator, self.best_model_saver = evaluator, best_model_saver

    def state_dict(self) -> dict:
        scaler = getattr(self.trainer, "scaler", None)
        state = {
            "python": random.getstate(),
            "numpy": _portable(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "transforms": [_portable(t.R.get_state()) for t in self.randomizables],
            "generators": [g.get_state() for g in self.generators],
            "scaler": scaler.state_dict() if scaler is not None else {},
        }
        if self.evaluator is not None:
            state["best_metric"] = self.evaluator.state.best_metric
            state["best_metric_epoch"] = self.evaluator.state.best_metric_epoch
        if self.best_model_saver is not None and self.best_model_saver._key_metric_checkpoint is not None:
            # MONAI's saver loads this record (load_state_dict) but only saves it inside model.pt itself
            state["best_model_saver"] = self.best_model_saver._key_metric_checkpoint.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if len(state["transforms"]) != len(self.randomizables) or len(state["generators"]) != len(self.generators):
            raise ValueError(
                f"the checkpoint has the random states of {len(state['transforms'])} transforms and "
                f"{len(state['generators'])} generators, this configuration {len(self.randomizables)} and "
                f"{len(self.generators)}: resume with the configuration that wrote it."
            )
        random.setstate(state["python"])
        np.random.set_state(_numpy(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for transform, saved in zip(self.randomizables, state["transforms"]):
            transform.R.set_state(_numpy(saved))
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(saved)
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.best_model_saver is not None and "best_model_saver" in state:
            self.best_model_saver.load_state_dict(state["best_model_saver"])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + dist.get_rank()
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            for transform in self.randomizables:
                transform.set_random_state(seed % 2**32)


class ConfiguredHorizon:
    """Load a learning-rate scheduler's state from a checkpoint, except its horizon, which the configuration sets.

    The rule for a run resumed with a larger ``max_epochs``: the learning rate continues from the value it had
    at the checkpoint and follows the cosine down to its end at the new horizon; it neither jumps nor climbs
    back (the old horizon, restored, would make the cosine rise again past its end). ``CosineAnnealingLR``'s
    recursive form does this by itself once ``T_max`` is the new one; for a ``LambdaLR`` (MONAI's
    ``WarmupCosineSchedule``) the base learning rates are rescaled so that the rate is continuous at the resume
    step. With an unchanged horizon nothing changes.

    Use it in the ``CheckpointLoader``'s ``load_dict`` in place of the scheduler; save the scheduler itself.
    """

    HORIZON = ("t_total", "T_max", "total_steps")

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        scheduler = self.scheduler
        configured = {k: getattr(scheduler, k) for k in self.HORIZON if hasattr(scheduler, k)}
        scheduler.load_state_dict(state)
        if configured == {k: getattr(scheduler, k) for k in configured}:
            return
        step = scheduler.last_epoch
        before = [f(step) for f in scheduler.lr_lambdas] if isinstance(scheduler, LambdaLR) else []
        for key, value in configured.items():
            setattr(scheduler, key, value)
        if hasattr(scheduler, "warmup_steps") and "t_total" in configured:
            scheduler.warmup_steps = min(scheduler.warmup_steps, scheduler.t_total)
        if before:
            after = [f(step) for f in scheduler.lr_lambdas]
            scheduler.base_lrs = [
                base * old / new if old > 0 and new > 0 else base
                for base, old, new in zip(scheduler.base_lrs, before, after)
            ]


class FreshDataEachEpoch:
    """Start every epoch on a new iterator of the trainer's data loader (a fresh shuffle, fresh workers).

    With ``epoch_length`` shorter than the loader, ignite would carry one iterator across epochs; a checkpoint,
    written between epochs, cannot hold its position or its workers' random streams. A new iterator per epoch
    is drawn from the global random state, which ``RunState`` saves, so a resumed run sees the same batches.
    Each epoch is then a random subset of the data, drawn without repetition within the epoch.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.set_data(engine.state.dataloader)
