"""Checkpoints on disk: the full checkpoints a run resumes from, the final ``model.pt``, and the pretext weights
saved beside it.

A cluster pre-empts a job with SIGKILL, at any moment, also while a checkpoint is being written. Every file here
is written under a temporary name and renamed when complete (``AtomicCheckpointSaver``), the file it replaces is
removed only after that, and a resume takes the newest intact checkpoint (``latest_checkpoint``), so a kill never
loses the finished epochs.
"""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from collections.abc import Mapping

import ignite.distributed as idist
import torch
import torch.nn as nn
from ignite.handlers.checkpoint import BaseSaveHandler

from monai.handlers import CheckpointSaver

__all__ = ["intact", "latest_checkpoint", "resume_checkpoint", "AtomicDiskSaver", "AtomicCheckpointSaver", "CompletedCheckpointSaver",
           "PretextWeights"]


# the run's decisions go to its log (the bundle's logging.conf), which PYTHONWARNINGS=ignore does not silence
logger = logging.getLogger(__name__)
PARTIAL = ".partial"  # suffix of a file being written; a leading dot keeps it out of every checkpoint pattern


def intact(path: str) -> bool:
    """Whether ``path`` is a whole ``torch.save`` file: a zip archive that holds its pickle (``data.pkl``) and
    whose every member passes its CRC check. A file cut short (by a kill during a non-atomic write, a full disk or
    an interrupted copy) fails it, and so does one closed after its pickling failed."""
    try:
        with zipfile.ZipFile(path) as archive:
            has_pickle = any(name.endswith("/data.pkl") for name in archive.namelist())
            return has_pickle and archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint*.pt") -> str:
    """Path of the newest intact full checkpoint in ``ckpt_dir``, for resuming a run. A damaged or partial file
    is skipped with a warning in the run's log that names it.

    Raises:
        FileNotFoundError: when there is none, naming the folder, the pattern looked for and any damaged files.
    """
    damaged = []
    for path in sorted(glob.glob(os.path.join(ckpt_dir, pattern)), key=os.path.getmtime, reverse=True):
        if intact(path):
            return path
        damaged.append(path)
        logger.warning("skipping the checkpoint %s: it is damaged or was cut short (not a whole torch.save file); "
                       "resuming from the newest intact one instead.", path)
    raise FileNotFoundError(
        f"resume was asked for, but {ckpt_dir} has no intact '{pattern}' file"
        + (f" (damaged: {', '.join(damaged)})" if damaged else "")
        + "; run without --resume to start afresh, or pass --resume_from <path of a checkpoint>."
    )


def resume_checkpoint(ckpt_dir: str, resume: bool) -> str:
    """The checkpoint a run resumes from: the newest intact one in ``ckpt_dir`` with ``resume``, else ``""``."""
    return latest_checkpoint(ckpt_dir) if resume else ""


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite's save handler for ``CheckpointSaver``, writing every file under a temporary name (``.<name>.partial``)
    and renaming it when complete, and removing the file it replaces only after that.

    Ignite's ``Checkpoint`` asks its handler to remove the oldest file *before* it writes the next one, and MONAI's
    handler writes in place: a kill during the write leaves one truncated checkpoint and nothing else. Here a kill
    at any moment leaves the previous file whole (and at worst a stray ``.partial`` file, removed by the next
    write). Saves on rank 0 only, as ignite's ``DiskSaver`` does.

    Args:
        dirname: the folder of the files.
        filename: a fixed file name (``model.pt``) used for every save, as MONAI's handler does; ``None`` for the
            names ``Checkpoint`` gives (``checkpoint_epoch=N.pt``).
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        self.dirname, self.filename = dirname, filename
        self._replaced: list[str] = []
        os.makedirs(dirname, exist_ok=True)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            return
        name = self.filename or filename
        for stray in glob.glob(os.path.join(self.dirname, f".*{PARTIAL}")):  # left by a write that was killed
            os.remove(stray)
        partial = os.path.join(self.dirname, f".{name}{PARTIAL}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.remove(partial)
            raise
        os.replace(partial, os.path.join(self.dirname, name))
        for old in self._replaced:
            if old != name and os.path.exists(os.path.join(self.dirname, old)):
                os.remove(os.path.join(self.dirname, old))
        self._replaced = []

    def remove(self, filename: str) -> None:
        """Called by ignite before the next save: the file is removed once that save is complete."""
        self._replaced.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose every file, full checkpoint or ``model.pt``, is written
    by ``AtomicDiskSaver``: complete or not there, and never removed before its successor is complete."""

    def __init__(self, *args, **kwargs) -> None:
        # every DDP rank builds the savers, and ignite creates their folder by checking, then making it: the
        # second rank's mkdir then fails with FileExistsError. A folder made up front is only checked.
        os.makedirs(kwargs.get("save_dir", args[0] if args else "."), exist_ok=True)
        super().__init__(*args, **kwargs)
        for checkpoint in (self._interval_checkpoint, self._key_metric_checkpoint, self._final_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, fixed)


class CompletedCheckpointSaver(AtomicCheckpointSaver):
    """``AtomicCheckpointSaver`` whose ``save_final`` file is written only when the run completes.

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
