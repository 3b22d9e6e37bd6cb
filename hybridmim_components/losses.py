"""Objectives of masked image modeling. Each loss takes (network output dict, targets dict) and returns a dict
with the total under ``loss`` and each term under its name (the convention of ``MaskedImageModelingTrainer``).

HybridMIM: L = L_rec + 0.1 L_count + 0.1 L_location + 0.01 L_consistency + 0.1 L_contrastive.

Terms, for the network outputs of ``HybridMIMUNet`` and the labels of ``TwoLevelMaskd``:

- reconstruction: squared error between sigmoid(reconstruction) and the original voxels, averaged over the
  masked voxels (and channels) inside the reconstructed box;
- count: cross-entropy of the (K + 1)-way count head (K patches per region, 8 by default) against the number of
  masked patches of each region;
- location: binary cross-entropy of the K location logits against the masked patches of each region;
- consistency: (sum_k sigmoid(l_k) - sum_c c * softmax(n)_c)^2 averaged over regions: the count implied by
  the location head against the expected count under the count head. Both sides are differentiable (the
  authors' thresholded form has no gradient);
- contrastive: NT-Xent (``nt_xent``, the value of ``monai.losses.ContrastiveLoss``) between the embeddings of the two dropout views,
  other samples of the batch being the negatives; under DDP, the samples of every rank's batch (SimCLR's
  global batch), so that one crop per GPU still has negatives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from monai.utils import ensure_tuple_rep

from hybridmim_components.geometry import patchify, unpatchify
from hybridmim_components.batch_keys import MaskKeys

__all__ = [
    "HybridMIMLoss",
    "SimMIMLoss",
    "MAELoss",
    "ContrastiveViewsLoss",
    "RestorationLoss",
    "SwinSSLLoss",
    "nt_xent",
    "gather_from_ranks",
    "masked_mse",
    "masked_l1",
    "reconstructed_region",
    "mae_reconstructed_volume",
    "count_location_consistency",
]


def reconstructed_region(
    pred: Mapping, target: Mapping, sigmoid: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reconstruction (float, after an optional sigmoid) and the original and the mask cut to the region it
    covers: ``pred["roi"]`` (three slices) where the network decodes a box (HybridMIM), else the whole crop
    (SimMIM). Each (B, C, *region); the mask (B, 1, *region)."""
    region = (slice(None), slice(None)) + tuple(pred.get("roi") or ())
    reconstruction = pred["reconstruction"].float()
    if sigmoid:
        reconstruction = reconstruction.sigmoid()
    return reconstruction, target[MaskKeys.TARGET][region], target[MaskKeys.MASK][region]


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


def gather_from_ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, F) on each of N processes -> (N * B, F), rank order, the same on every rank; ``x`` itself outside
    ``torch.distributed``. Only this rank's rows keep their gradient: the gather is a plain collective in the
    forward pass, and nothing is communicated in the backward pass, where DDP's own gradient reductions run
    (a collective of ours there could interleave with theirs differently on each rank). Every rank must call it
    with the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent between two (B, F) views: row i of ``first`` and of ``second`` are positives, all other rows of
    both are negatives. The value of ``monai.losses.ContrastiveLoss``, written as a cross-entropy over the cosine
    similarities (self-similarity excluded) so that it builds no tensor on the host: MONAI's builds two on every
    call and copies them to the device, a host synchronisation per training step on a GPU.

    Under ``torch.distributed`` the rows of every rank are gathered first (``gather_from_ranks``): negatives come
    from the global batch of N * B samples, and the value at collapse is ln(2NB - 1). Every rank computes the
    same loss over the global batch, so this rank's rows receive every term they appear in; their gradient is
    scaled by N, which DDP's averaging over the ranks undoes: the parameters get the gradient of the global loss.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    first, second = gather_from_ranks(first), gather_from_ranks(second)
    n = first.shape[0]
    z = F.normalize(torch.cat([first, second]), dim=1)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(2 * n, device=z.device).roll(n)  # row i pairs with i + n, row i + n with i
    loss = F.cross_entropy(logits, positives)
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())  # the value, N times the gradient


def count_location_consistency(count_logits: torch.Tensor, location_logits: torch.Tensor) -> torch.Tensor:
    """Squared gap between the count implied by the location head and the count head's expectation.

    Args:
        count_logits: (B, R, K + 1); location_logits: (B, R, K).
    """
    classes = torch.arange(count_logits.shape[-1], device=count_logits.device, dtype=count_logits.dtype)
    expected_count = (count_logits.softmax(dim=-1) * classes).sum(dim=-1)
    implied_count = location_logits.sigmoid().sum(dim=-1)
    return F.mse_loss(implied_count, expected_count)


class HybridMIMLoss(nn.Module):
    """The five HybridMIM terms and their weighted sum.

    Args:
        reconstruction_weight, count_weight, location_weight, consistency_weight, contrastive_weight: weights
            of the terms (the paper's by default); a term of zero weight is neither computed nor returned, and
            ``required_outputs()`` says which network outputs the others need.
        temperature: NT-Xent temperature.
        sigmoid: apply a sigmoid to the reconstruction logits (targets scaled to [0, 1]).

    ``forward(pred, target)`` takes the network's output dict and a dict with the ``MaskKeys`` items (target
    (B, C, D, H, W), mask (B, 1, D, H, W), mask_count (B, R), mask_location (B, R, K)) and returns a dict
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
        self.temperature = temperature

    def reconstruction_error(self, pred: Mapping, target: Mapping) -> torch.Tensor:
        """Masked squared error inside the reconstructed box (also the validation metric)."""
        return masked_mse(*reconstructed_region(pred, target, self.sigmoid))

    def required_outputs(self) -> dict[str, bool]:
        """Which network outputs the terms of non-zero weight need: the ``HybridMIMNetwork`` arguments
        ``reconstruct``, ``count_head``, ``location_head`` and ``contrastive_views`` (as a bool) follow from this."""
        w = self.weights
        return {
            "reconstruction": w["reconstruction"] > 0,
            "count_logits": w["count"] > 0 or w["consistency"] > 0,
            "location_logits": w["location"] > 0 or w["consistency"] > 0,
            "embeddings": w["contrastive"] > 0,
        }

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        needed = [k for k, used in self.required_outputs().items() if used]
        # the two views exist in training only: an evaluation output has no contrastive term, not an error
        missing = [k for k in needed if pred.get(k) is None and k != "embeddings"]
        if missing:
            raise ValueError(
                f"the loss weights need the network outputs {missing}, which the network did not compute; build it "
                "with the heads and views of the weights in use (reconstruct, count_head, location_head, "
                "contrastive_views=2), or set those weights to 0."
            )
        # a term of zero weight is not computed at all
        w = self.weights
        count_logits = pred["count_logits"].float() if "count_logits" in needed else None
        location_logits = pred["location_logits"].float() if "location_logits" in needed else None
        terms = {}
        if w["reconstruction"] > 0:
            terms["reconstruction"] = self.reconstruction_error(pred, target)
        if w["count"] > 0:
            terms["count"] = F.cross_entropy(count_logits.flatten(0, 1), target[MaskKeys.COUNT].flatten().long())
        if w["location"] > 0:
            terms["location"] = F.binary_cross_entropy_with_logits(location_logits, target[MaskKeys.LOCATION].float())
        if w["consistency"] > 0:
            terms["consistency"] = count_location_consistency(count_logits, location_logits)
        if w["contrastive"] > 0 and pred.get("embeddings") is not None:
            embeddings = pred["embeddings"].float()
            terms["contrastive"] = nt_xent(embeddings[0], embeddings[1], self.temperature)
        total = sum(w[name] * value for name, value in terms.items())
        return {"loss": total, **terms}


class SimMIMLoss(nn.Module):
    """SimMIM: L1 between the predicted and the original voxels, over the masked voxels.

    ``forward(pred, target)``: ``pred["reconstruction"]`` (B, C, D, H, W); ``target`` with the ``MaskKeys``
    items ``target`` and ``mask``. Returns ``{"loss", "reconstruction"}``.
    """

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        error = masked_l1(*reconstructed_region(pred, target))
        return {"loss": error, "reconstruction": error}


class RestorationLoss(nn.Module):
    """Models Genesis: mean squared error between the restoration and the original, over every voxel.

    Args:
        sigmoid: apply a sigmoid to the network's logits first (the last layer of the authors' network), for
            originals scaled to [0, 1].

    ``forward(pred, target)``: ``pred["reconstruction"]`` (B, C, D, H, W); ``target["target"]``, the original of
    the same shape. Returns ``{"loss", "restoration"}``.
    """

    def __init__(self, sigmoid: bool = True) -> None:
        super().__init__()
        self.sigmoid = sigmoid

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        restoration = pred["reconstruction"].float()
        if self.sigmoid:
            restoration = restoration.sigmoid()
        error = F.mse_loss(restoration, target[MaskKeys.TARGET].float())
        return {"loss": error, "restoration": error}


class SwinSSLLoss(nn.Module):
    """The SwinUNETR pretext tasks: L = w_rot CE(rotation) + w_contrast NT-Xent(views) + w_rec L1(reconstruction),
    with the reference's weights 1, 1, 1 and temperature 0.5.

    - rotation: cross-entropy of the 4-way rotation logits against each view's k;
    - contrastive: ``nt_xent`` between the two views' embeddings, the other crops of the (DDP-global) batch being
      the negatives; the reference's ``Contrast`` has the same value on one process;
    - reconstruction: mean absolute error between the reconstruction of each cut-out view and the rotated view
      before the cut-out, over every voxel.

    ``forward(pred, target)`` takes the output of ``SwinSSLSwinUNETR`` and the ``target`` (2B, C, D, H, W) and
    ``rotation`` (2B,) of ``SwinSSLViews``; returns ``{"loss", "rotation", "contrastive", "reconstruction"}``.
    """

    def __init__(self, rotation_weight: float = 1.0, contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0,
                 temperature: float = 0.5) -> None:
        super().__init__()
        self.weights = {"rotation": rotation_weight, "contrastive": contrastive_weight, "reconstruction": reconstruction_weight}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"loss weights must be non-negative and one of them positive, got {self.weights}.")
        self.temperature = temperature

    def forward(self, pred: Mapping, target: Mapping) -> dict[str, torch.Tensor]:
        embeddings = pred["embeddings"].float()
        terms = {
            "rotation": F.cross_entropy(pred["rotation_logits"].float(), target["rotation"].long()),
            "contrastive": nt_xent(embeddings[0], embeddings[1], self.temperature),
            "reconstruction": F.l1_loss(pred["reconstruction"].float(), target[MaskKeys.TARGET].float()),
        }
        return {"loss": sum(self.weights[name] * value for name, value in terms.items()), **terms}


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


def mae_reconstructed_volume(
    pred: Mapping, target: Mapping, patch_size: Sequence[int] | int = 16, norm_pix_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's counterpart of ``reconstructed_region``: the predicted patches put back into a (B, C, D, H, W)
    volume (with ``norm_pix_loss``, each patch rescaled to the mean and spread of the original patch, as the
    MAE authors show it), the original, and the (B, 1, D, H, W) mask of the removed patches."""
    original = target[MaskKeys.TARGET].float()
    patch_size, spatial = ensure_tuple_rep(patch_size, 3), original.shape[2:]
    prediction = pred["prediction"].float()
    if norm_pix_loss:
        patches = patchify(original, patch_size)
        prediction = prediction * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    mask = pred["patch_mask"].float()[..., None].expand(-1, -1, math.prod(patch_size))
    return unpatchify(prediction, patch_size, spatial), original, unpatchify(mask, patch_size, spatial)


class ContrastiveViewsLoss(nn.Module):
    """NT-Xent (``nt_xent``) between the two views of ``pred["embeddings"]`` (2, B, F).

    Returns ``{"loss", "contrastive"}``.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, pred: Mapping, target: Mapping | None = None) -> dict[str, torch.Tensor]:
        embeddings = pred["embeddings"].float()
        value = nt_xent(embeddings[0], embeddings[1], self.temperature)
        return {"loss": value, "contrastive": value}
