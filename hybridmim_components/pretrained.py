"""Load pre-trained weights into a fine-tuning network, and say what was loaded.

Checkpoints come in many shapes: a plain state dict (our ``models/model.pt``), ``{"model": ...}`` or
``{"state_dict": ...}`` wrappers, keys prefixed by ``module.`` (DistributedDataParallel) or ``backbone.`` (a
pre-training wrapper), or a ViT saved on its own for a network that holds it under ``vit.``. ``load_pretrained``
finds the key prefix alignment that matches the most weights, loads every weight whose name and shape agree,
prints a report, and fails when too little matched: silently training from scratch is the classic failure of
self-supervised weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hybridmim_components.loading import describe_preprocessing
from hybridmim_components.plan import check_plan

__all__ = ["LoadReport", "load_pretrained", "pretrained_network", "extract_state_dict"]

logger = logging.getLogger(__name__)
WRAPPER_KEYS = ("model", "state_dict", "network", "net")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did.

    ``fraction`` is the loaded tensors over the tensors of the smaller side, the network or the checkpoint: an
    encoder-only checkpoint (MAE's ViT into UNETR) that loads whole scores 100 %, as does a network that is a
    part of a larger pre-training model; a checkpoint of other settings scores about 0 %.
    """

    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    strip_prefix: str = ""
    add_prefix: str = ""
    total: int = 0
    checkpoint_total: int = 0

    @property
    def fraction(self) -> float:
        smaller = min(self.total, self.checkpoint_total)
        return len(self.loaded) / smaller if smaller else 0.0

    def __str__(self) -> str:
        def show(names, limit=8):
            names = [n if isinstance(n, str) else f"{n[0]} {n[1]} -> {n[2]}" for n in names]
            return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

        lines = [
            f"pre-trained weights from {self.checkpoint}:",
            f"  loaded     {len(self.loaded)} of {self.total} tensors of the network, of {self.checkpoint_total} in the "
            f"checkpoint ({self.fraction:.0%} of the smaller)"
            + (f", checkpoint keys mapped '{self.strip_prefix}*' -> '{self.add_prefix}*'"
               if self.strip_prefix or self.add_prefix else ""),
            f"  mismatched {len(self.mismatched)} (shape differs, kept the network's): {show(self.mismatched)}",
            f"  missing    {len(self.missing)} (not in the checkpoint, kept the network's): {show(self.missing)}",
            f"  unexpected {len(self.unexpected)} (in the checkpoint only, ignored): {show(self.unexpected)}",
        ]
        return "\n".join(lines)


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapping ``{"model": ...}``-style containers."""
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return extract_state_dict(checkpoint[key])
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _prefixes(keys) -> set[str]:
    """'' and the first one or two dotted components of the keys, e.g. 'module.', 'module.backbone.'."""
    found = {""}
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                found.add(".".join(parts[:depth]) + ".")
    return found


def _align(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The (strip, add) prefix pair that maps the most checkpoint keys onto network keys."""
    best, best_count = ("", ""), -1
    target_keys = set(target)
    for strip in sorted(_prefixes(source)):
        stripped = {k[len(strip):] for k in source if k.startswith(strip)}
        for add in sorted(_prefixes(target)):
            count = len({add + k for k in stripped} & target_keys)
            if count > best_count:
                best, best_count = (strip, add), count
    return best


def load_pretrained(
    network: nn.Module, checkpoint: str, min_fraction: float = 0.5, map_location: str = "cpu"
) -> nn.Module:
    """Load the matching weights of ``checkpoint`` into ``network`` and return the network.

    Args:
        network: the fine-tuning network.
        checkpoint: path of a ``.pt`` file; an empty string loads nothing (training from scratch).
        min_fraction: fail if fewer than this fraction of the tensors of the smaller side (network or
            checkpoint) are loaded.
        map_location: where to load the checkpoint's tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: fewer than ``min_fraction`` of the tensors matched; the message holds the report.
    """
    if not checkpoint:
        return network
    try:
        raw = torch.load(checkpoint, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pre-trained checkpoint {checkpoint} does not exist; check --pretrained.") from e
    source = extract_state_dict(raw) if isinstance(raw, Mapping) else {}
    target = network.state_dict()
    strip, add = _align(source, target)
    report = LoadReport(
        checkpoint=checkpoint, strip_prefix=strip, add_prefix=add, total=len(target), checkpoint_total=len(source)
    )
    matched = {}
    for key, value in source.items():
        name = add + key[len(strip):] if key.startswith(strip) else None
        if name not in target:
            report.unexpected.append(key)
        elif value.shape != target[name].shape:
            report.mismatched.append((name, tuple(value.shape), tuple(target[name].shape)))
        else:
            matched[name] = value
    report.loaded = sorted(matched)
    mismatched = {name for name, _, _ in report.mismatched}
    report.missing = sorted(k for k in target if k not in matched and k not in mismatched)
    if report.fraction < min_fraction:
        raise ValueError(
            f"{report}\nonly {report.fraction:.0%} of the weights matched (at least {min_fraction:.0%} "
            "needed): the checkpoint is probably for another network or other settings (features, feature_size, "
            "channels). Check the network override and the pre-training bundle's settings."
        )
    network.load_state_dict(matched, strict=False)
    logger.info("%s", report)
    print(report, flush=True)
    return network


def pretrained_network(network: nn.Module, checkpoint: str, plan: Mapping | None, in_channels: int,
                       preprocessing: Sequence) -> nn.Module:
    """The network a fine-tuning run starts from: checked against the pre-training ``plan`` (``check_plan``:
    input channels, architecture, widths, and the ``preprocessing`` chain's spacing and intensities), then given
    the weights of ``checkpoint`` (``load_pretrained``; an empty string leaves it as it is)."""
    return load_pretrained(check_plan(plan, network, in_channels, describe_preprocessing(preprocessing)), checkpoint)
