"""Pictures of masked-image pre-training in TensorBoard: the masked input, the reconstruction and the original.

MONAI's ``TensorBoardImageHandler`` draws its inputs from ``engine.state.batch``, which in pre-training holds the
unmasked crop: the masking happens in ``prepare_batch``, on the device. ``TensorBoardPanels`` draws every picture
from the engine's output instead, with MONAI's ``plot_2d_or_3d_image``. The fine-tuning bundles, whose batches hold
what they show, use ``TensorBoardImageHandler`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from monai.visualize import plot_2d_or_3d_image
from torch.utils.tensorboard import SummaryWriter

from hybridmim_components.losses import reconstructed_region


def middle_slice(volume: torch.Tensor) -> torch.Tensor:
    """(C, D, H, W) -> (C, D, H): the slice in the middle of the last spatial axis (axial in RAS)."""
    if volume.ndim != 4:
        raise ValueError(f"middle_slice expects (C, D, H, W), got {tuple(volume.shape)}.")
    return volume[..., volume.shape[-1] // 2]


def reconstruction_panels(output: Mapping | list, sigmoid: bool = False) -> dict[str, torch.Tensor]:
    """From an evaluator's (not decollated) output of a masked reconstruction (HybridMIM, SimMIM): the ``masked``
    input, the ``reconstruction`` and the ``original``, each (B, C, *box), where the box is the reconstructed region
    (``pred["roi"]``, HybridMIM) or the whole crop (SimMIM). Masked voxels are shown as 0."""
    output = output[0] if isinstance(output, list) else output
    reconstruction, original, mask = reconstructed_region(output[CommonKeys.PRED], output[CommonKeys.LABEL], sigmoid)
    return {"masked": original.masked_fill(mask.bool(), 0), "reconstruction": reconstruction, "original": original}


class TensorBoardPanels:
    """At each epoch's end, the middle slice of each named image of the engine's last output, as TensorBoard images
    tagged ``<prefix>/<name>``; the step is the engine's epoch (an evaluator's is its trainer's).

    Args:
        log_dir: TensorBoard folder, when no ``summary_writer`` is given.
        panels: output -> {name: (B, C, D, H, W) tensor}.
        index: which item of the batch to show.
        prefix: tag prefix.
        summary_writer: a writer to share with other handlers.
    """

    def __init__(self, log_dir: str = "./runs", panels: Callable[[object], Mapping[str, torch.Tensor]] = reconstruction_panels,
                 index: int = 0, prefix: str = "val", summary_writer: SummaryWriter | None = None) -> None:
        self.panels, self.index, self.prefix = panels, index, prefix
        self.writer = summary_writer if summary_writer is not None else SummaryWriter(log_dir=log_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for name, images in self.panels(engine.state.output).items():
            image = middle_slice(images[self.index].detach()).float().cpu()  # only the slice leaves the device
            plot_2d_or_3d_image(image[None], engine.state.epoch, self.writer, index=0, max_channels=1,
                                tag=f"{self.prefix}/{name}")
        self.writer.flush()
