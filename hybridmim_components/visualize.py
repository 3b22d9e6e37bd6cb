"""Pictures of what pre-training learned: in TensorBoard, the masked input, the reconstruction and the original;
at inference, the same volumes (``ReconstructionPanelsd``) or, for an encoder without a decoder (the contrastive
baseline), its features as a colour volume (``FeatureMapPCA``).

MONAI's ``TensorBoardImageHandler`` draws its inputs from ``engine.state.batch``, which in pre-training holds the
unmasked crop: the masking happens in ``prepare_batch``, on the device. ``TensorBoardPanels`` draws every picture
from the engine's output instead, with MONAI's ``plot_2d_or_3d_image``. The fine-tuning bundles, whose batches hold
what they show, use ``TensorBoardImageHandler`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import CommonKeys
from monai.visualize import plot_2d_or_3d_image
from torch.utils.tensorboard import SummaryWriter

from hybridmim_components.losses import reconstructed_region
from hybridmim_components.batch_keys import MaskKeys


def middle_slice(volume: torch.Tensor) -> torch.Tensor:
    """(C, D, H, W) -> (C, D, H): the slice in the middle of the last spatial axis (axial in RAS)."""
    if volume.ndim != 4:
        raise ValueError(f"middle_slice expects (C, D, H, W), got {tuple(volume.shape)}.")
    return volume[..., volume.shape[-1] // 2]


def reconstruction_panels(output: Mapping | list, region: Callable = reconstructed_region, **region_kwargs) -> dict[str, torch.Tensor]:
    """From an evaluator's (not decollated) output of a masked reconstruction: the ``masked`` input, the
    ``reconstruction`` and the ``original``, each (B, C, *box). ``region(pred, target, **region_kwargs)`` gives
    the reconstruction, the original and the mask: ``reconstructed_region`` (HybridMIM's box, SimMIM's crop;
    ``sigmoid=True`` for logits) or ``mae_reconstructed_volume`` (MAE's patches). Masked voxels are shown as 0."""
    output = output[0] if isinstance(output, list) else output
    reconstruction, original, mask = region(output[CommonKeys.PRED], output[CommonKeys.LABEL], **region_kwargs)
    return {"masked": original.masked_fill(mask.bool(), 0), "reconstruction": reconstruction, "original": original}


def restoration_panels(output: Mapping | list, sigmoid: bool = True) -> dict[str, torch.Tensor]:
    """From an evaluator's (not decollated) output of a restoration (Models Genesis): the ``corrupted`` input, the
    ``restoration`` (after a sigmoid of the logits) and the ``original``, each (B, C, D, H, W)."""
    output = output[0] if isinstance(output, list) else output
    restoration = output[CommonKeys.PRED]["reconstruction"].float()
    return {
        "corrupted": output[CommonKeys.IMAGE],
        "restoration": restoration.sigmoid() if sigmoid else restoration,
        "original": output[CommonKeys.LABEL][MaskKeys.TARGET],
    }


class ReconstructionPanelsd(Transform):
    """Inference post-processing of one decollated item: ``reconstruction_panels`` of its ``pred`` and ``label``
    stored under ``masked``, ``reconstruction`` and ``original`` (C, D, H, W), carrying the metadata of the
    item's ``image`` so that ``SaveImaged`` names and places them like the input.

    Args:
        region, region_kwargs: as for ``reconstruction_panels``.
        image_key: the item whose metadata (affine, file name) the volumes take.
    """

    def __init__(self, region: Callable = reconstructed_region, image_key: str = CommonKeys.IMAGE, **region_kwargs) -> None:
        self.region, self.image_key, self.region_kwargs = region, image_key, region_kwargs

    def __call__(self, data: Mapping) -> dict:
        def batched(item):
            return {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in item.items()}

        output = {CommonKeys.PRED: batched(data[CommonKeys.PRED]), CommonKeys.LABEL: batched(data[CommonKeys.LABEL])}
        meta = dict(getattr(data[self.image_key], "meta", {}))  # its "affine" becomes each volume's affine
        panels = reconstruction_panels(output, self.region, **self.region_kwargs)
        return {**data, **{name: MetaTensor(volume[0], meta=meta) for name, volume in panels.items()}}


class ViewPanelsd(Transform):
    """Inference post-processing of one decollated item of the SwinUNETR pretext network: its cut-out ``image``,
    the ``reconstruction`` in its ``pred`` and the rotated view before the cut-out (``target`` in its ``label``),
    stored under ``corrupted``, ``restoration`` and ``original`` (C, D, H, W), the names of ``restoration_panels``,
    with the metadata of the image (the volumes are in the view's rotation).

    The network returns 2B reconstructions for B images (both views), so the evaluator's decollation gives B more
    items, the second views, which have no image: they pass unchanged, and ``SaveImaged(allow_missing_keys=True)``
    writes nothing for them.
    """

    def __call__(self, data: Mapping) -> dict:
        if data.get(CommonKeys.IMAGE) is None:
            return dict(data)
        meta = dict(getattr(data[CommonKeys.IMAGE], "meta", {}))
        volumes = {"corrupted": data[CommonKeys.IMAGE], "restoration": data[CommonKeys.PRED]["reconstruction"],
                   "original": data[CommonKeys.LABEL][MaskKeys.TARGET]}
        return {**data, **{name: MetaTensor(torch.as_tensor(v).detach(), meta=meta) for name, v in volumes.items()}}


def vit_feature_map(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output tokens of a MONAI ``ViT`` as a feature map: (B, C, *img_size) -> (B, hidden, d, h, w), one
    vector per patch, for ``FeatureMapPCA``."""
    patch = network.patch_embedding.patch_embeddings.kernel_size
    tokens, _ = network(x)
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, *(s // p for s, p in zip(x.shape[2:], patch)))


class FeatureMapPCA(nn.Module):
    """An encoder's feature map as a colour volume: the first ``components`` principal components of the
    feature vectors of each image, each scaled to [0, 1], upsampled (trilinear) to the input size. Regions the
    encoder tells apart get different colours; a collapsed encoder gives noise.

    Args:
        network: the trained network (a submodule, so that ``eval()`` and ``to()`` reach it).
        features: ``(network, x) -> (B, C, d, h, w)``, e.g. ``lambda net, x: net.swinViT(x, net.normalize)[2]``.
        components: channels of the output.

    ``forward(x)`` with ``x`` (B, C_in, D, H, W) returns (B, components, D, H, W).
    """

    def __init__(self, network: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor], components: int = 3) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be at least 1, got {components}.")
        self.network, self.features, self.components = network, features, components

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(self.network, x).float()
        b, c, *grid = feats.shape
        if c < self.components:
            raise ValueError(f"the features have {c} channels, fewer than components={self.components}.")
        vectors = feats.flatten(2).transpose(1, 2)  # (B, N, C)
        vectors = vectors - vectors.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(vectors, full_matrices=False)
        axes = vh[:, : self.components].transpose(1, 2)  # (B, C, k)
        # an SVD axis has no sign: make each one's largest loading positive, so runs and items compare
        signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
        scores = (vectors @ (axes * signs)).transpose(1, 2).reshape(b, self.components, *grid)
        low = scores.flatten(2).min(-1).values[..., None, None, None]
        high = scores.flatten(2).max(-1).values[..., None, None, None]
        scores = (scores - low) / (high - low).clamp_min(1e-8)
        return F.interpolate(scores, size=x.shape[2:], mode="trilinear", align_corners=False)


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
