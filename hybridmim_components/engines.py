"""Engine pieces for masked image modeling on MONAI's Ignite workflows.

``SupervisedTrainer`` already does the iteration (AMP, gradient accumulation, events); masked image modeling
only differs in what a batch holds (a masked image plus several targets) and in a loss that returns a dict of
terms. ``PrepareMaskedBatch`` and ``MaskedImageModelingTrainer`` cover exactly those two differences.
"""

from __future__ import annotations

import atexit
import gc
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import Events

from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatch
from monai.handlers import ValidationHandler
from monai.utils import CommonKeys

from hybridmim_components.batch_keys import MaskKeys

__all__ = [
    "PrepareMaskedBatch", "MaskedImageModelingTrainer", "LOSS_TERMS", "StopOnNonFiniteLoss", "FreezeParameters",
    "FinalValidationHandler", "free_at_exit",
]

LOSS_TERMS = "loss_terms"  # key of the detached loss terms in ``engine.state.output``


class PrepareMaskedBatch(PrepareBatch):
    """Return ``(image, targets)`` on the device, ``targets`` being the dict of ``target_keys``; with
    ``network_kwargs``, ``(image, targets, (), kwargs)`` so that the network is called as
    ``network(image, **kwargs)``.

    Args:
        image_key: key of the (masked) network input.
        target_keys: keys of the items the loss needs.
        masking: optional batch masking (``TwoLevelMask``) applied to the whole (B, C, D, H, W) batch *after*
            the move to the device, so that masking runs on the GPU and only the unmasked image crosses the bus;
            it returns the masked batch under ``"image"`` and the targets under their keys. The data pipeline
            then leaves images unmasked.
        network_kwargs: network argument name -> batch key, for networks that take more than the image
            (SimMIM's ``mask``, the second view of a contrastive network).
        memory_format: memory format of the network input, e.g. ``torch.channels_last_3d`` for a network
            converted to it; ``None`` (or ``torch.preserve_format``) leaves the layout as it comes.
    """

    def __init__(
        self,
        image_key: str = CommonKeys.IMAGE,
        target_keys: Sequence[str] = (MaskKeys.TARGET, MaskKeys.MASK, MaskKeys.COUNT, MaskKeys.LOCATION),
        masking: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
        network_kwargs: Mapping[str, str] | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)
        self.masking = masking
        self.network_kwargs = dict(network_kwargs or {})
        self.memory_format = memory_format

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple:
        def move(key):
            return batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)

        if self.masking is not None:
            masked = dict(self.masking(move(self.image_key)))
            batchdata = {**batchdata, **masked, self.image_key: masked.pop("image")}
        missing = [k for k in (self.image_key, *self.target_keys, *self.network_kwargs.values()) if k not in batchdata]
        if missing:
            raise KeyError(
                f"batch has no {missing} (it has {sorted(batchdata)}); add TwoLevelMaskd to the preprocessing "
                "or pass `masking` to PrepareMaskedBatch."
            )
        image = move(self.image_key)
        if self.memory_format is not None:
            image = image.to(memory_format=self.memory_format)
        targets = {k: move(k) for k in self.target_keys}
        if self.network_kwargs:
            return image, targets, (), {name: move(key) for name, key in self.network_kwargs.items()}
        return image, targets


class MaskedImageModelingTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for a loss that returns a dict of terms with the total under ``"loss"``.

    The total is back-propagated as usual; every term, detached, is put in the output's ``"loss_terms"`` so that
    ``StatsHandler`` and ``TensorBoardStatsHandler`` log them (``output_transform=lambda x: x[0]["loss_terms"]``).
    Batches are not decollated (that would sync the host to turn every scalar into a number), and the batch's
    output dict is the one item of ``engine.state.output``: the shape MONAI's handlers expect of a decollated
    output, so that ``from_engine(["loss"], first=True)``, which ``--tracking mlflow`` logs, gives the loss.
    Batches default to ``PrepareMaskedBatch()``. All other arguments are those of ``SupervisedTrainer``; mixed precision is its
    ``amp`` with ``amp_kwargs={"dtype": ...}``: float16 is scaled by MONAI's ``GradScaler``, bfloat16 (which
    needs no scaling) runs with a disabled one, which spares ``GradScaler.step`` its host synchronisation.
    """

    def __init__(
        self,
        *args,
        loss_function: Callable[..., Mapping[str, torch.Tensor]],
        prepare_batch: Callable = PrepareMaskedBatch(),
        decollate: bool = False,
        **kwargs,
    ) -> None:
        self.loss_terms = loss_function
        super().__init__(
            *args, loss_function=self._total_loss, prepare_batch=prepare_batch, decollate=decollate, **kwargs
        )
        if self.amp and self.amp_kwargs.get("dtype") == torch.bfloat16:
            # Trainer.run() builds the scaler, then starts the engine: replace it as the run starts
            self.add_event_handler(Events.STARTED, self._disable_grad_scaler)

    def _iteration(self, engine: MaskedImageModelingTrainer, batchdata: dict) -> list[dict]:
        return [super()._iteration(engine, batchdata)]

    def _disable_grad_scaler(self, engine: MaskedImageModelingTrainer) -> None:
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def _total_loss(self, pred: Mapping, targets: Mapping) -> torch.Tensor:
        terms = self.loss_terms(pred, targets)
        self.state.output[LOSS_TERMS] = {name: value.detach() for name, value in terms.items()}
        return terms["loss"]


class StopOnNonFiniteLoss:
    """Stop a run at the first iteration whose loss, or one of its terms, is NaN or infinite.

    A NaN spreads to every weight at the next optimizer step, and every later epoch, checkpoint and ``model.pt``
    is worthless. ignite's ``TerminateOnNan`` ends the run *normally*, which writes a final model; this raises
    instead, so the run ends with an error that names the iteration and the term, nothing more is written, and the
    last full checkpoint (written at the end of the last whole epoch) is what ``--resume True`` continues from.

    Reads the loss terms of ``MaskedImageModelingTrainer`` (``LOSS_TERMS``) or the ``loss`` of MONAI's
    ``SupervisedTrainer``. The check reads one value per step from the device (a host synchronisation);
    ``interval`` > 1 checks every ``interval`` iterations instead.
    """

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}.")
        self.interval = interval

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    @staticmethod
    def terms(output) -> dict[str, torch.Tensor]:
        first = output[0] if isinstance(output, (list, tuple)) else output
        if LOSS_TERMS in first:
            return dict(first[LOSS_TERMS])
        return {"loss": first[CommonKeys.LOSS]}

    def __call__(self, engine) -> None:
        terms = self.terms(engine.state.output)
        values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        bad = ", ".join(f"{name} = {v}" for name, v in zip(terms, values.tolist()) if not math.isfinite(v))
        raise FloatingPointError(
            f"the loss is not finite at iteration {engine.state.iteration} (epoch {engine.state.epoch}): {bad}. "
            "The run stopped before this step could spread to later checkpoints; the last full checkpoint is kept. "
            "Lower the learning rate or the loss weights, check the data (tools/check_dataset.py), then resume "
            "with --resume True."
        )


class FreezeParameters:
    """Hold ``parameters`` fixed for the first ``epochs`` epochs of training, then train them.

    Fine-tuning's "linear probing, then fine-tuning": the fresh decoder and head first learn to read the
    transferred encoder, which then trains with them. It decides from the epoch alone at every epoch start, so a
    resumed run freezes exactly as an uninterrupted one. Frozen parameters stop taking gradients
    (``requires_grad``), which also saves their backward pass, and the optimizer never sees one of their
    gradients: under DistributedDataParallel a parameter without a gradient may get a zero one, and AdamW would
    still move it (weight decay).

    Args:
        parameters: the parameters to freeze (``PretrainedWeights.transferred_encoder``); none freezes nothing.
        epochs: the number of frozen epochs from the start (0: never frozen).
        optimizer: the run's optimizer, if any, whose steps skip the frozen parameters.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], epochs: int = 0,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if epochs < 0:
            raise ValueError(f"frozen epochs must be 0 or more, got {epochs}.")
        self.parameters, self.epochs, self.frozen = list(parameters), int(epochs), False
        if optimizer is not None and self.parameters and self.epochs:
            optimizer.register_step_pre_hook(self._drop_gradients)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.frozen = engine.state.epoch <= self.epochs
        for p in self.parameters:
            p.requires_grad_(not self.frozen)
        self._drop_gradients()

    def _drop_gradients(self, *_) -> None:
        if self.frozen:
            for p in self.parameters:
                p.grad = None


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler``, plus one validation when training completes on an epoch it did not validate.

    The best-metric ``CheckpointSaver`` writes ``model.pt`` only from a validation. MONAI Label overrides
    ``train#trainer#max_epochs`` (often below ``val_interval``), and a run of fewer epochs than the interval would
    end without a model. ``COMPLETED`` fires only when the run ends normally, so a crashed run gets no final model.
    """

    def attach(self, engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._validate_last_epoch)

    def _validate_last_epoch(self, engine) -> None:
        epoch = engine.state.epoch
        validated = epoch % self.interval == 0 if self.epoch_level else engine.state.iteration % self.interval == 0
        if not validated:
            self(engine)


def free_at_exit() -> None:
    """Free the run's objects at exit while Python is still whole, not during its shutdown, the process group last.

    A bundle's engines hold reference cycles, so the DDP network and its process group are only freed by the
    cyclic garbage collector, which otherwise first runs during interpreter shutdown. Freed there, a gloo process
    group's worker threads can need the GIL after it is gone, and the process aborts ("terminate called without
    an active exception") after a run that finished and saved everything: seen on one rank in about 50 two-process
    runs. Registered first, this collection runs after every other exit handler, with the interpreter alive.

    Which object frees the process group matters too. Freed by the DDP module's ``Reducer`` (its destructor keeps
    the GIL), ``~ProcessGroupGloo`` waits for a worker thread that is still destroying the last collective's work,
    and that destruction waits for the GIL to free the work's tensors: a deadlock, seen in CI as a rank that never
    exits (py-spy: the main thread in ``gc_collect`` → ``Reducer::~Reducer`` → ``~ProcessGroupGloo``, a gloo worker
    in ``THPVariable_dealloc``). Held here until the collection has freed every ``Reducer``, the process group is
    freed last by its Python object, whose destructor releases the GIL.
    """
    import torch.distributed as dist

    group = [dist.group.WORLD] if dist.is_available() and dist.is_initialized() else []

    def free() -> None:
        gc.collect()  # every DDP module and its Reducer; the process group survives in `group`
        group.clear()  # now the process group itself, without the GIL

    atexit.register(free)
