"""What the optimizers need to run on FSDP2-sharded parameters (``DTensor`` with ``Shard(0)``).

Elementwise updates and per-tensor norms work on DTensors as they are (a norm of a sharded tensor is reduced
across ranks by DTensor). Three things need help:

- a small replicated operand (OrthoAdam's rotation, ASA's power-iteration vector) must be a replicated
  DTensor on the parameter's mesh: :func:`replicate_like`;
- whole-matrix work (Muon's Newton–Schulz, Spectra's subspace tracking and shaping) needs the full matrix.
  :func:`owner_map` gathers each matrix, lets one rank (its owner, round-robin over the matrices) compute
  on it, and broadcasts the result, which every rank slices back to its shard. Per matrix and step that
  costs an all-gather of the input (each rank receives (W-1)/W of it) and a broadcast of the output
  (plus any small extras such as Spectra's basis); the matrix work is done once instead of W times.

On plain tensors every function is the identity / a direct call, so single-process code is unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor. Without importing ``torch.distributed.tensor`` (1.5 s of every process's start):
    no tensor can be one before something else has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathered when sharded)."""
    return t.full_tensor() if is_dtensor(t) else t


def like_shard(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` laid out like ``like``: its local shard (no communication) when ``like`` is a DTensor."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def replicated(t: Tensor) -> Tensor:
    """A DTensor with partial (pending-reduction) placements reduced to a replicated one; others unchanged."""
    if not is_dtensor(t) or not any(p.is_partial() for p in t.placements):
        return t
    from torch.distributed.tensor import Replicate

    return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)


def replicate_like(t: Tensor, like: Tensor) -> Tensor:
    """A plain tensor (identical on every rank) as a replicated DTensor on ``like``'s mesh."""
    if not is_dtensor(like) or is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


ResultSpec = torch.Size | tuple[torch.Size, torch.dtype]


def owner_map(inputs: Sequence[Tensor], fn: Callable[[int, Tensor], Sequence[Tensor]],
              shapes: Callable[[int, Tensor], Sequence[ResultSpec]]) -> list[list[Tensor]]:
    """For each (possibly sharded) matrix ``inputs[i]``, ``fn(i, full matrix)`` computed once, on its owner.

    ``fn`` returns a list of full tensors (e.g. the update and a new basis); ``shapes(i, full)`` describes them
    so that the other ranks can receive them: a shape (the result has the input's dtype) or a (shape, dtype)
    pair (e.g. an fp32 basis of a bf16 matrix). Returns, for every i, the list of full results on every rank.
    Without sharding (or with one rank), ``fn`` runs locally on each matrix.
    """
    sharded = [t for t in inputs if is_dtensor(t)]
    if not sharded or dist.get_world_size() == 1:
        return [list(fn(i, full(t))) for i, t in enumerate(inputs)]
    rank, world = dist.get_rank(), dist.get_world_size()
    group = sharded[0].device_mesh.get_group()
    wholes = [full(t) for t in inputs]
    owners = _round_robin([w.numel() for w in wholes], world)
    results: list[list[Tensor]] = []
    for i, whole in enumerate(wholes):
        if owners[i] == rank:
            outs = [o.contiguous() for o in fn(i, whole)]
        else:
            outs = [_receive_buffer(spec, whole) for spec in shapes(i, whole)]
        for out in outs:
            dist.broadcast(out, src=dist.get_global_rank(group, owners[i]), group=group)
        results.append(outs)
    return results


def _receive_buffer(spec: ResultSpec, like: Tensor) -> Tensor:
    shape, dtype = (spec, like.dtype) if isinstance(spec, torch.Size) else spec
    return torch.empty(shape, dtype=dtype, device=like.device)


def _round_robin(sizes: list[int], world: int) -> list[int]:
    """Owners: matrices sorted by size (largest first) dealt to ranks in turn, so the work is balanced."""
    owners = [0] * len(sizes)
    for turn, i in enumerate(sorted(range(len(sizes)), key=lambda j: -sizes[j])):
        owners[i] = turn % world
    return owners
