"""HybridMIM objective: L = L_rec + 0.1 L_count + 0.1 L_location + 0.01 L_consistency + 0.1 L_contrastive.

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

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.losses import ContrastiveLoss

from hybridmim_components.transforms import MaskKeys

__all__ = ["HybridMIMLoss", "masked_mse", "count_location_consistency"]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask`` is 1.

    Args:
        prediction, target: (B, C, D, H, W).
        mask: (B, 1, D, H, W), 1 for the voxels to score. Returns 0 when no voxel is masked.
    """
    mask = mask.to(prediction.dtype)
    squared = (prediction - target) ** 2 * mask
    return squared.sum() / (mask.sum() * prediction.shape[1]).clamp_min(1.0)


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
