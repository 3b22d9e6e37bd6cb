"""A fine-tuning plan: what a pre-trained ``model.pt`` needs from the run that fine-tunes it.

Weights are worth less, silently, when the fine-tuning run resamples to another spacing, normalises intensities
another way, or builds another network. A pre-training run writes its ``Plan`` as ``models/plan.json`` beside
``models/model.pt`` (when training starts, so a crashed run has one too) and in every full checkpoint. A
fine-tuning bundle given ``--pretrained .../model.pt`` reads the ``plan.json`` beside it (``read_plan``), takes its
spacing and intensity window by default (``planned``; a command-line override still wins), and ``check_plan``
prints the plan beside the fine-tuning settings, stops on what cannot work (input channels, architecture, widths)
and warns on what only hurts (spacing, orientation, normalisation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

import monai

from hybridmim_components.encoders import ENCODER_PREFIXES
from hybridmim_components.loading import describe_preprocessing

__all__ = ["PLAN_FILE", "Plan", "read_plan", "planned", "check_plan", "unetr_refusal"]

PLAN_FILE = "plan.json"
# pre-trained classes whose weights serve other fine-tuning networks: MAE's ViT is UNETR's encoder
SERVES = {"ViT": ("UNETR",)}
UNETR_PATCH = 16  # MONAI's UNETR builds its ViT with 16^3 patches; it has no argument to change them
logger = logging.getLogger(__name__)


class Plan:
    """The plan of one pre-training run.

    Args:
        network: ``{"class": ..., <the stock network's arguments>}`` of the weights ``model.pt`` holds, e.g.
            ``{"class": "BasicUNet", "in_channels": 1, "features": [...]}``.
        preprocessing: the transforms that load and normalise a volume (``load_and_scale``).
        crop: the crop size of pre-training.
        method: the method's name; ``loss``: the loss, whose term weights are recorded.
        datalist: the pre-training volumes (``{"image": ...}`` items): their number and a hash of their paths, or
            of their content hashes where the items carry them (``sha256``, as a preprocessed corpus's do).
        ckpt_dir: where ``plan.json`` goes.
    """

    def __init__(self, network: Mapping, preprocessing: Sequence, crop: Sequence[int],
                 method: str, loss: nn.Module, datalist: Sequence[Mapping], ckpt_dir: str) -> None:
        if "class" not in network or "in_channels" not in network:
            raise ValueError(f"network must name its 'class' and 'in_channels', got {dict(network)}.")
        import hybridmim_components  # the version of this code, installed or vendored into a bundle

        images = sorted(json.dumps(item.get("sha256") or item.get("image")) for item in datalist)
        self.plan = {
            "network": dict(network),
            # the key prefixes of the encoder in model.pt, for fine-tuning that transfers only the encoder
            "encoder": list(ENCODER_PREFIXES[network["class"]]) if network["class"] in ENCODER_PREFIXES else None,
            **describe_preprocessing(preprocessing),
            "crop": [int(v) for v in crop],
            "method": {"name": method, "loss": type(loss).__name__,
                       "weights": dict(getattr(loss, "weights", {}))},
            "data": {"volumes": len(images), "sha1": hashlib.sha1("\n".join(images).encode()).hexdigest()},
            # plain strings: full checkpoints are loaded with weights_only, which refuses torch's TorchVersion
            "versions": {"monai": str(monai.__version__), "torch": str(torch.__version__),
                         "hybridmim_components": hybridmim_components.__version__},
        }
        self.path = os.path.join(ckpt_dir, PLAN_FILE)

    def state_dict(self) -> dict:
        return dict(self.plan)

    def load_state_dict(self, state: Mapping) -> None:
        """A resumed run keeps the plan its configuration builds (the checkpoint's copy is for the record)."""

    def write(self, _: Engine | None = None) -> str:
        """Write ``plan.json``, through a temporary name so that no half file is ever left."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.plan, f, indent=2)
        os.replace(self.path + ".tmp", self.path)
        return self.path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.write)


def read_plan(pretrained: str, quiet: bool = False) -> dict | None:
    """The plan beside a ``model.pt`` (``plan.json`` in its folder); ``None`` without a path or for weights that
    have none (other frameworks' checkpoints; a warning unless ``quiet``). Inference reads the fine-tuning run's
    own plan this way, so that it resamples and normalises as that run did."""
    if not pretrained:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(pretrained)), PLAN_FILE)
    if not os.path.isfile(path):
        if quiet:
            return None
        logger.warning("%s has no %s beside it: the fine-tuning settings cannot be checked against its "
                       "pre-training; make sure spacing, intensity window and network match.", pretrained, PLAN_FILE)
        return None
    with open(path) as f:
        return json.load(f)


def planned(plan: Mapping | None, key: str, default):
    """The plan's value at ``key`` (dotted, e.g. ``intensity.window``), or ``default`` without a plan or value."""
    value = plan
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def check_plan(plan: Mapping | None, network: nn.Module, in_channels: int, settings: Mapping) -> nn.Module:
    """Print the plan beside the fine-tuning ``settings`` (spacing, orientation, intensity: as
    ``describe_preprocessing`` gives them), raise ``ValueError`` on what cannot work, warn on what only hurts;
    return ``network`` unchanged."""
    if plan is None:
        return network
    unetr_refusal(plan["network"], type(network).__name__)
    rows = [("network", plan["network"].get("class"), type(network).__name__),
            ("in_channels", plan["network"].get("in_channels"), in_channels)]
    if "features" in plan["network"]:
        rows.append(("features", plan["network"]["features"], _features(network)))
    architecture = len(rows)  # what cannot work if it differs; the rest only hurts
    rows += [(key, plan.get(key), settings.get(key)) for key in ("spacing", "orientation", "intensity")]
    width = max(len(_short(p)) for _, p, _ in rows) + 2
    table = "\n".join(f"  {name:<12} {_short(p):<{width}} {_short(f)}" for name, p, f in rows)
    logger.info("pre-training plan vs fine-tuning settings:\n  %-12s %-*s %s\n%s", "", width, "plan", "fine-tuning", table)
    print(f"pre-training plan vs fine-tuning settings:\n  {'':<12} {'plan':<{width}} fine-tuning\n{table}", flush=True)
    fatal = [f"{name}: pre-trained {p}, fine-tuning {f}" for name, p, f in rows[:architecture]
             if p != f and not (name == "network" and f in SERVES.get(p, ()))]
    if fatal:
        raise ValueError(
            "the pre-trained weights cannot serve this fine-tuning network (" + "; ".join(fatal) + "). Build the "
            "network the plan describes (e.g. --network_def, --in_channels, --features) or pre-train for this one."
        )
    for name, p, f in rows[architecture:]:
        if p is not None and f is not None and p != f:
            logger.warning("fine-tuning %s %s differs from the pre-training's %s: the pre-trained filters saw other "
                           "inputs; use the plan's unless you mean it.", name, f, p)
    return network


def unetr_refusal(planned_network: Mapping, network_class: str) -> None:
    """Raise where ViT weights of another patch size than UNETR's fixed 16^3 would be fine-tuned as UNETR: its
    patch embedding could not take them, and MONAI would fail on a shape deep inside the load."""
    patch = planned_network.get("patch_size")
    if planned_network.get("class") == "ViT" and network_class == "UNETR" and patch is not None:
        if any(int(p) != UNETR_PATCH for p in (patch if isinstance(patch, (list, tuple)) else [patch])):
            raise ValueError(
                f"these ViT weights were pre-trained with {patch}^3 patches, and MONAI's UNETR fixes its ViT's patches "
                f"at {UNETR_PATCH}^3: they cannot be fine-tuned as UNETR. Pre-train with vit_patch_size "
                f"{UNETR_PATCH}, or fine-tune another network.")


def _short(value) -> str:
    """A plan value for the table: a transform's description on one short line."""
    if isinstance(value, Mapping) and "transform" in value:
        return value["transform"] + " " + ", ".join(f"{k} {v}" for k, v in value.items() if k != "transform")
    return str(value)


def _features(network: nn.Module) -> list[int] | None:
    """A ``BasicUNet``'s ``features`` read back from its layers."""
    try:
        return [network.conv_0.conv_0.conv.out_channels, network.down_1.convs.conv_0.conv.out_channels,
                network.down_2.convs.conv_0.conv.out_channels, network.down_3.convs.conv_0.conv.out_channels,
                network.down_4.convs.conv_0.conv.out_channels, network.upcat_1.convs.conv_0.conv.out_channels]
    except AttributeError:
        return None
