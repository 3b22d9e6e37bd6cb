"""Load pre-trained weights into a fine-tuning network, say what was transferred, and fine-tune it accordingly.

Checkpoints come in many shapes: a plain state dict (our ``models/model.pt``), ``{"model": ...}`` or
``{"state_dict": ...}`` wrappers, keys prefixed by ``module.`` (DistributedDataParallel) or ``backbone.`` (a
pre-training wrapper), or a ViT saved on its own for a network that holds it under ``vit.``. ``load_pretrained``
finds the key prefix alignment that matches the most weights, loads every weight whose name and shape agree,
prints a report, and fails when too little matched: silently training from scratch is the classic failure of
self-supervised weights.

What is transferred and trained is a choice (``TRANSFER_MODES``):

- ``all`` loads every weight that matches, decoder included, and trains everything (the HybridMIM paper's mode);
- ``encoder`` loads only the encoder (``encoders.ENCODER_PREFIXES``), starts the decoder and the head fresh and
  trains everything (nnssl's);
- ``decoder`` loads as ``all`` does, then holds the network's encoder frozen for the whole run: only the decoder
  and the head train (few-shot fine-tuning with too few labels to move the encoder);
- ``linear`` loads as ``encoder`` does and trains only a linear head on the frozen encoder's multi-scale features
  (``linear_head.LinearHeadSegmenter``, the pre-training probe's head as a network).

``PretrainedWeights`` carries that choice through a fine-tuning config: it builds the network, then gives the
optimizer parameter groups (the transferred part at its own learning rate, frozen parameters left out) and the
training loop the transferred encoder to freeze for the first epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hybridmim_components.encoders import encoder_prefixes, in_encoder
from hybridmim_components.linear_head import LINEAR_HEAD, LinearHeadSegmenter
from hybridmim_components.loading import describe_preprocessing
from hybridmim_components.plan import check_plan, planned

__all__ = ["TRANSFER_MODES", "LoadReport", "load_pretrained", "transfer_weights", "PretrainedWeights",
           "extract_state_dict", "warmup_multiplier"]

logger = logging.getLogger(__name__)
WRAPPER_KEYS = ("model", "state_dict", "network", "net")
TRANSFER_MODES = ("all", "encoder", "decoder", "linear")
LOADS = {"all": "all", "encoder": "encoder", "decoder": "all", "linear": "encoder"}  # what each mode loads


@dataclass
class LoadReport:
    """What ``transfer_weights`` did.

    ``fraction`` is the loaded tensors over the tensors of the smaller side, the network or the checkpoint (each
    restricted to the encoder in ``encoder`` mode): an encoder-only checkpoint (MAE's ViT into UNETR) that loads
    whole scores 100 %, as does a network that is a part of a larger pre-training model; a checkpoint of other
    settings scores about 0 %.
    """

    checkpoint: str
    mode: str = "all"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
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

        part = "the encoder" if self.mode == "encoder" else "every matching weight"
        lines = [
            f"pre-trained weights from {self.checkpoint} (transfer: {self.mode}, {part}):",
            f"  loaded     {len(self.loaded)} of {self.total} tensors of the network"
            + ("'s encoder" if self.mode == "encoder" else "")
            + f", of {self.checkpoint_total} in the checkpoint ({self.fraction:.0%} of the smaller)"
            + (f", checkpoint keys mapped '{self.strip_prefix}*' -> '{self.add_prefix}*'"
               if self.strip_prefix or self.add_prefix else ""),
            f"  mismatched {len(self.mismatched)} (shape differs, kept the network's): {show(self.mismatched)}",
            f"  missing    {len(self.missing)} (not in the checkpoint, kept the network's): {show(self.missing)}",
            f"  unexpected {len(self.unexpected)} (in the checkpoint only, ignored): {show(self.unexpected)}",
        ]
        if self.mode == "encoder":
            lines.append(f"  left out   {len(self.left_out)} (outside the encoder, not transferred): {show(self.left_out)}")
        lines.append(f"  fresh      {len(self.fresh)} tensors start from the network's initialisation: {show(self.fresh)}")
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


def transfer_weights(network: nn.Module, checkpoint: str, mode: str = "all",
                     checkpoint_encoder: Sequence[str] | None = None, min_fraction: float = 0.5,
                     map_location: str = "cpu") -> LoadReport:
    """Load the matching weights of ``checkpoint`` into ``network`` and report what was transferred.

    Args:
        network: the fine-tuning network.
        checkpoint: path of a ``.pt`` file.
        mode: ``"all"``, every weight whose name and shape match; ``"encoder"``, only those under the encoder
            prefixes of the network's family (``encoders.encoder_prefixes``).
        checkpoint_encoder: in ``encoder`` mode, the prefixes of the encoder in the checkpoint's keys (the
            pre-training plan's ``encoder``); by default the network's own.
        min_fraction: fail if fewer than this fraction of the tensors of the smaller side (network or
            checkpoint, each restricted to what ``mode`` transfers) are loaded.
        map_location: where to load the checkpoint's tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown ``mode``, a family without a defined encoder, or fewer than ``min_fraction`` of the
            tensors matched (the message holds the report).
    """
    if mode not in ("all", "encoder"):
        raise ValueError(f"transfer_weights loads 'all' or the 'encoder', got {mode!r}; the transfer modes decoder "
                         "and linear load as all and encoder do (PretrainedWeights).")
    try:
        raw = torch.load(checkpoint, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pre-trained checkpoint {checkpoint} does not exist; check --pretrained.") from e
    source = extract_state_dict(raw) if isinstance(raw, Mapping) else {}
    state = network.state_dict()
    target, left_out = state, []
    if mode == "encoder":
        prefixes = encoder_prefixes(network)
        target = {k: v for k, v in state.items() if in_encoder(k, prefixes)}
        if checkpoint_encoder is not None:
            left_out = sorted(k for k in source if not in_encoder(k, checkpoint_encoder))
            source = {k: v for k, v in source.items() if in_encoder(k, checkpoint_encoder)}
    strip, add = _align(source, target)
    report = LoadReport(checkpoint=checkpoint, mode=mode, strip_prefix=strip, add_prefix=add, total=len(target),
                        checkpoint_total=len(source), left_out=left_out)
    matched = {}
    for key, value in source.items():
        name = add + key[len(strip):] if key.startswith(strip) else None
        if name in target and value.shape == target[name].shape:
            matched[name] = value
        elif name in target:
            report.mismatched.append((name, tuple(value.shape), tuple(target[name].shape)))
        elif name in state:  # a decoder or head weight, in encoder mode
            report.left_out.append(key)
        else:
            report.unexpected.append(key)
    report.loaded = sorted(matched)
    mismatched = {name for name, _, _ in report.mismatched}
    report.missing = sorted(k for k in target if k not in matched and k not in mismatched)
    report.fresh = sorted(k for k in state if k not in matched)
    if report.fraction < min_fraction:
        raise ValueError(
            f"{report}\nonly {report.fraction:.0%} of the weights matched (at least {min_fraction:.0%} "
            "needed): the checkpoint is probably for another network or other settings (features, feature_size, "
            "channels). Check the network override and the pre-training bundle's settings."
        )
    network.load_state_dict(matched, strict=False)
    logger.info("%s", report)
    print(report, flush=True)
    return report


def load_pretrained(network: nn.Module, checkpoint: str, min_fraction: float = 0.5, map_location: str = "cpu",
                    mode: str = "all") -> nn.Module:
    """``transfer_weights``, returning the network; an empty ``checkpoint`` loads nothing (training from scratch)."""
    if checkpoint:
        transfer_weights(network, checkpoint, mode, min_fraction=min_fraction, map_location=map_location)
    return network


def _unwrapped(network: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel, whose parameter names the report uses."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


class PretrainedWeights:
    """A fine-tuning run's pre-trained start, from the network to its optimisation.

    Args:
        checkpoint: the pre-trained ``model.pt`` (``--pretrained``); an empty string trains from scratch, and
            then every method below behaves as without pre-training.
        plan: the pre-training plan beside it (``plan.read_plan``), checked against the network, and whose
            ``encoder`` names the encoder's keys in the checkpoint.
        transfer: what is loaded and what trains (``TRANSFER_MODES``): ``all``, ``encoder``, ``decoder`` (the
            encoder frozen for the whole run, from scratch too) or ``linear`` (a linear head on the frozen encoder;
            on a random encoder without a checkpoint).
        min_fraction: see ``transfer_weights``.
    """

    def __init__(self, checkpoint: str, plan: Mapping | None = None, transfer: str = "all",
                 min_fraction: float = 0.5) -> None:
        if transfer not in TRANSFER_MODES:
            raise ValueError(f"transfer must be one of {TRANSFER_MODES}, got {transfer!r}; see the bundle's docs.")
        self.checkpoint, self.plan, self.transfer, self.min_fraction = checkpoint, plan, transfer, min_fraction
        self.report: LoadReport | None = None

    def network(self, network: nn.Module, in_channels: int, preprocessing: Sequence) -> nn.Module:
        """``network`` checked against the plan (``check_plan``: input channels, architecture, widths, and the
        ``preprocessing`` chain's spacing and intensities) and given the weights that ``transfer`` names."""
        check_plan(self.plan, network, in_channels, describe_preprocessing(preprocessing))
        if self.checkpoint:
            self.report = transfer_weights(network, self.checkpoint, LOADS[self.transfer],
                                           planned(self.plan, "encoder", None), self.min_fraction)
        if self.transfer == "decoder":
            prefixes = encoder_prefixes(network)
            for name, p in network.named_parameters():
                if in_encoder(name, prefixes):
                    p.requires_grad_(False)
        if self.transfer == "linear":
            return LinearHeadSegmenter(network)
        return network

    @property
    def head(self) -> str:
        """What the saved network is, for the run's plan (``linear_head.as_trained``): ``linear`` for a linear head
        on the encoder, ``network`` for the fine-tuning network itself."""
        return LINEAR_HEAD if self.transfer == "linear" else "network"

    def warmup_epochs(self, epochs: int) -> int:
        """The learning-rate warm-up of the transferred weights: ``epochs`` from a checkpoint, none from scratch."""
        return epochs if self.checkpoint else 0

    def transferred(self, network: nn.Module, encoder_only: bool = False) -> list[nn.Parameter]:
        """The parameters of ``network`` that hold pre-trained weights (of its encoder only, with ``encoder_only``)."""
        if self.report is None:
            return []
        loaded = set(self.report.loaded)
        prefixes = encoder_prefixes(_unwrapped(network)) if encoder_only else ("",)
        return [p for name, p in _unwrapped(network).named_parameters() if name in loaded and in_encoder(name, prefixes)]

    def transferred_encoder(self, network: nn.Module) -> list[nn.Parameter]:
        """The transferred parameters of the encoder: what ``engines.FreezeParameters`` holds fixed for the first
        epochs. None in ``decoder`` and ``linear`` modes, whose encoder stays frozen for the whole run."""
        if self.transfer in ("decoder", "linear"):
            return []
        return self.transferred(network, encoder_only=True)

    def parameter_groups(self, network: nn.Module, learning_rate: float,
                         pretrained_learning_rate: float) -> list[dict]:
        """Optimizer parameter groups: the transferred parameters at ``pretrained_learning_rate``, the fresh ones
        (all of them without pre-training) at ``learning_rate``; frozen parameters (``decoder``, ``linear``) and
        empty groups are left out."""
        transferred = {id(p) for p in self.transferred(network)}
        trained = [p for p in network.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trained if id(p) in transferred], "lr": pretrained_learning_rate},
            {"params": [p for p in trained if id(p) not in transferred], "lr": learning_rate},
        ]
        return [group for group in groups if group["params"]]


def warmup_multiplier(warmup_epochs: int) -> float:
    """``WarmupCosineSchedule``'s factor at the first warm-up epoch: 1 / (epochs + 1), so that the first epoch does
    not train at a learning rate of zero; 0 (MONAI's default) without warm-up."""
    return 1.0 / (warmup_epochs + 1) if warmup_epochs else 0.0
