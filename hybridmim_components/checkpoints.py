"""Checkpoints on disk: the full checkpoints a run resumes from, the final ``model.pt``, and the pretext weights
saved beside it.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.nn as nn

from monai.handlers import CheckpointSaver

__all__ = ["latest_checkpoint", "CompletedCheckpointSaver", "PretextWeights"]


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint*.pt") -> str:
    """Path of the newest full checkpoint in ``ckpt_dir``, for resuming a run.

    Raises:
        FileNotFoundError: when there is none, naming the folder and the pattern looked for.
    """
    found = glob.glob(os.path.join(ckpt_dir, pattern))
    if not found:
        raise FileNotFoundError(
            f"resume was asked for, but {ckpt_dir} has no '{pattern}' file; run without --resume to start afresh, "
            "or pass --resume_from <path of a checkpoint>."
        )
    return max(found, key=os.path.getmtime)


class CompletedCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose ``save_final`` file is written only when the run completes.

    MONAI's also writes it when an exception ends the run, so a crashed pre-training would leave a ``model.pt``
    that looks finished. The run's periodic full checkpoints are what a resume needs, and they are kept.
    """

    def exception_raised(self, engine, e: Exception) -> None:
        raise e


class PretextWeights:
    """The weights of a pre-training network that its backbone lacks (SimMIM's mask token and head, MAE's
    decoder), as one object with ``state_dict``/``load_state_dict``.

    The bundles save the backbone as ``models/model.pt`` (what a stock MONAI network loads) and these beside it
    as ``models/pretext_weights.pt``, so that inference can reconstruct without a second copy of the backbone.
    Tensors the network shares with the backbone (MAE's ``vit`` is made of the MAE encoder's modules) count as
    the backbone's.

    Args:
        network: the whole pre-training network.
        backbone: its part saved as ``model.pt``.
    """

    def __init__(self, network: nn.Module, backbone: nn.Module) -> None:
        self.network, self.backbone = network, backbone

    def keys(self) -> list[str]:
        shared = {id(t) for t in self.backbone.state_dict(keep_vars=True).values()}
        return [k for k, t in self.network.state_dict(keep_vars=True).items() if id(t) not in shared]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        return {k: state[k] for k in self.keys()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        expected = set(self.keys())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"pretext weights do not fit {type(self.network).__name__}: missing {missing}, unexpected "
                f"{unexpected}; were they saved by a run of the same bundle and settings?"
            )
        self.network.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
