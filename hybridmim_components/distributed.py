"""What a bundle's ``multi_gpu_train.json`` needs under ``torchrun``: the process's device, its shard of the data,
and the network made ready for ``DistributedDataParallel``. Each process calls these after the process group is
initialised (the config's ``initialize``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from monai.data import partition_dataset

__all__ = ["local_device", "rank_shard", "ddp_ready"]


def local_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``, set by ``torchrun``), or the CPU where there is no CUDA (gloo)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
    return torch.device("cpu")


def rank_shard(items: Sequence, seed: int, even_divisible: bool) -> list:
    """This process's disjoint share of ``items``, shuffled once with ``seed``. ``even_divisible`` repeats items so
    that every process gets as many (needed when an epoch is one pass over the data; not with a fixed
    ``epoch_length``)."""
    shards = partition_dataset(items, num_partitions=dist.get_world_size(), shuffle=True, seed=seed,
                               even_divisible=even_divisible)
    return shards[dist.get_rank()]


def ddp_ready(network: nn.Module, device: torch.device, sync_batchnorm: bool,
              memory_format: torch.memory_format = torch.preserve_format) -> nn.Module:
    """``network`` on ``device`` in ``memory_format``, its BatchNorm layers synchronised across processes with
    ``sync_batchnorm`` (SyncBatchNorm needs CUDA)."""
    if sync_batchnorm:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return network.to(device, memory_format=memory_format)
