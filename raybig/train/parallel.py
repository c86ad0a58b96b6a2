"""Parallelism applied from outside the model: the loop hands its model here and trains what comes back."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def parallelize(model: nn.Module, env) -> nn.Module:
    """Data parallel over every rank (gloo on CPU, NCCL on GPU, as Ray Train set up the process group).

    DDP broadcasts rank 0's weights when it wraps, so ranks start identical even if their seeds were not.
    """
    if not env.distributed:
        return model
    device_ids = [env.device] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
