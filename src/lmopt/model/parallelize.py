"""Data parallelism with PyTorch's own engines: FSDP2 (``fully_shard``) or DDP, under ``torchrun``.

FSDP2: each transformer block is sharded as its own unit, then the root (embeddings, final norm; the tied
output projection shares the embedding), so that a block's parameters are all-gathered just before its
forward and freed after. Order: blocks first, then the root, as ``fully_shard`` requires.

Mixed precision is the same in every mode: fp32 weights, gradients and reductions, bf16 matmuls by the
trainer's ``torch.autocast`` (see docs/distributed.md). So FSDP2 gets no ``MixedPrecisionPolicy``: a policy with
``param_dtype=bf16`` would also run the norms, the embedding and the residual stream in bf16, and give other
losses than one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

DIST_MODES = ("auto", "none", "fsdp", "ddp")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_mode(mode: str, world_size: int) -> str:
    """``auto``: FSDP2 under torchrun with several processes, else a single process."""
    if mode == "auto":
        return "fsdp" if world_size > 1 else "none"
    return mode


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes: NCCL on GPU, gloo on CPU."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def parallelize(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Shard (fsdp) or replicate (ddp) ``model``; returns the module to call for forward passes."""
    if mode == "none":
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def gradient_sync(wrapped: nn.Module, mode: str, sync: bool):
    """A context in which backward does (``sync``) or does not reduce gradients across ranks: DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``; gradients then accumulate locally until a backward that syncs."""
    import contextlib

    if mode == "ddp" and not sync:
        return wrapped.no_sync()
    if mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
