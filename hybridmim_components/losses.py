"""Objectives of masked image modeling. Each loss takes (network output dict, targets dict) and returns a dict
with the total under ``loss`` and each term under its name (the convention of ``MaskedImageModelingTrainer``).

HybridMIM: L = L_rec + 0.1 L_count + 0.1 L_location + 0.01 L_consistency + 0.1 L_contrastive.

Terms, for the network outputs of ``HybridMIMUNet`` and the labels of ``TwoLevelMaskd``:

- reconstruction: squared error between sigmoid(reconstruction) and the original voxels, averaged over the
  masked voxels (and channels) inside the reconstructed box;
- count: cross-entropy of the 9-way count head against the number of masked patches of each region;
- location: binary cross-entropy of the 8 location logits against the masked patches of each region;
- consistency: (sum_k sigmoid(l_k) - sum_c c * softmax(n)_c)^2 averaged over regions: the count implied by
  the location head against the expected count under the count head. Both sides are differentiable (the
  authors' thresholded form has no gradient);
- contrastive: NT-Xent (``monai.losses.ContrastiveLoss``) between the embeddings of the two dropout views,
  other samples of the batch being the negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.losses import ContrastiveLoss
from monai.utils import ensure_tuple_rep

from hybridmim_components.networks import patchify
from hybridmim_components.transforms import MaskKeys

__all__ = [
    "HybridMIMLoss",
    "SimMIMLoss",
    "MAELoss",
    "ContrastiveViewsLoss",
    "masked_mse",
    "masked_l1",
    "count_location_consistency",
]


def _masked_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, C, ...) ``error`` over the positions where the (B, 1, ...) ``mask`` is 1; 0 if none is."""
    mask = mask.to(error.dtype)
    return (error * mask).sum() / (mask.sum() * error.shape[1]).clamp_min(1.0)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask`` is 1.

    Args:
        prediction, target: (B, C, D, H, W).
        mask: (B, 1, D, H, W), 1 for the voxels to score. Returns 0 when no voxel is masked.
    """
    return _masked_mean((prediction - target) ** 2, mask)


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels where ``mask`` is 1 (shapes as in ``masked_mse``)."""
    return _masked_mean((prediction - target).abs(), mask)


def count_location_consistency(count_logits: torch.Tensor, location_logits: torch.Tensor) -> torch.Tensor:
    """Squared gap between the count implied by the location head and the count head's expectation.

    Args:
        count_logits: (B, R, 9); location_logits: (B, R, 8).
    """
    classes = torch.arange(count_logits.shape[-1], device=count_logits.device, dtype=count_logits.dtype)
    expected_count = (count_logits.softmax(dim=-1) * classes).sum(dim=-1)
    implied_count = location_logits.sigmoid().sum(dim=-1)
    return F.mse_loss(implied_count, expected_count)


class HybridMIMLoss(nn.Module):
    """The five HybridMIM terms and their weighted sum.

    Args:
        reconstruction_weight, count_weight, location_weight, consistency_weight, contrastive_weight: weights
            of the terms (the paper's by default); a zero weight skips the term.
        temperature: NT-Xent temperature.
        sigmoid: apply a sigmoid to the reconstruction logits (targets scaled to [0, 1]).

    ``forward(pred, target)`` takes the network's output dict and a dict with the ``MaskKeys`` items (target
    (B, C, D, H, W), mask (B, 1, D, H, W), mask_count (B, R), mask_location (B, R, 8)) and returns a dict
    with the total under ``loss`` and each term under its name.
    """

    def __init__(
        self,
        reconstruction_weight: float = 1.0,
        count_weight: float = 0.1,
        location_weight: float = 0.1,
        consistency_weight: float = 0.01,
        contrastive_weight: float = 0.1,
        temperature: float = 0.5,
        sigmoid: bool = True,
    ) -> None:
        super().__init__()
        self.weights = {
            "reconstruction": reconstruction_weight,
            "count": count_weight,
            "location": location_weight,
            "consistency": consistency_weight,
            "contrastive": contrastive_weight,
        }
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"loss weights must be non-negative, got {self.weights}.")
        if not any(self.weights.values()):
            raise ValueError("at least one loss weight must be positive.")
        self.sigmoid = sigmoid
        self.contrastive = ContrastiveLoss(temperature=temperature)

    def reconstruction_error(self, pred: Mapping, target: Mapping) -> torch.Tensor:
        """Masked squared error inside the reconstructed box (also the validation metric)."""
        box = (slice(None), slice(None)) + tuple(pred["roi"])
        reconstruction = pred["reconstruction"].float()
        if self.sigmoid:
            reconstruction = reconstruction.sigmoid()
        return masked_mse(reconstruction, target[MaskKeys.TARGET][box], target[MaskKeys.MASK][box])

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        count_logits = pred["count_logits"].float()
        location_logits = pred["location_logits"].float()
        terms = {
            "reconstruction": self.reconstruction_error(pred, target),
            "count": F.cross_entropy(count_logits.flatten(0, 1), target[MaskKeys.COUNT].flatten().long()),
            "location": F.binary_cross_entropy_with_logits(location_logits, target[MaskKeys.LOCATION].float()),
            "consistency": count_location_consistency(count_logits, location_logits),
        }
        embeddings = pred.get("embeddings")
        if embeddings is not None and self.weights["contrastive"] > 0:
            terms["contrastive"] = self.contrastive(embeddings[0].float(), embeddings[1].float())
        total = sum(self.weights[name] * value for name, value in terms.items() if self.weights[name] > 0)
        return {"loss": total, **terms}


class SimMIMLoss(nn.Module):
    """SimMIM: L1 between the predicted and the original voxels, over the masked voxels.

    ``forward(pred, target)``: ``pred["reconstruction"]`` (B, C, D, H, W); ``target`` with the ``MaskKeys``
    items ``target`` and ``mask``. Returns ``{"loss", "reconstruction"}``.
    """

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        error = masked_l1(pred["reconstruction"].float(), target[MaskKeys.TARGET], target[MaskKeys.MASK])
        return {"loss": error, "reconstruction": error}


class MAELoss(nn.Module):
    """MAE: mean squared error between predicted and original patches, averaged over the masked patches.

    Args:
        patch_size: the ViT's patch size.
        norm_pix_loss: normalise each target patch to zero mean and unit variance (the MAE paper's option).

    ``forward(pred, target)``: ``pred["prediction"]`` (B, N, P), ``pred["patch_mask"]`` (B, N) with 1 on the
    masked patches, ``target["target"]`` the original (B, C, D, H, W). Returns ``{"loss", "reconstruction"}``.
    """

    def __init__(self, patch_size: Sequence[int] | int = 16, norm_pix_loss: bool = False) -> None:
        super().__init__()
        self.patch_size = ensure_tuple_rep(patch_size, 3)
        self.norm_pix_loss = norm_pix_loss

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        patches = patchify(target[MaskKeys.TARGET].float(), self.patch_size)
        if self.norm_pix_loss:
            patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred["prediction"].float() - patches) ** 2).mean(dim=-1, keepdim=True)  # (B, N, 1)
        error = _masked_mean(per_patch.transpose(1, 2), pred["patch_mask"][:, None])
        return {"loss": error, "reconstruction": error}


class ContrastiveViewsLoss(nn.Module):
    """NT-Xent (``monai.losses.ContrastiveLoss``) between the two views of ``pred["embeddings"]`` (2, B, F).

    Returns ``{"loss", "contrastive"}``.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.contrastive = ContrastiveLoss(temperature=temperature)

    def forward(self, pred: Mapping, target: Mapping | None = None) -> dict[str, torch.Tensor]:
        embeddings = pred["embeddings"].float()
        value = self.contrastive(embeddings[0], embeddings[1])
        return {"loss": value, "contrastive": value}
