"""GPU memory of a training step, estimated from the model's shapes, and the device numbers throughput needs.

:func:`estimate_memory` adds up what one rank holds at the peak of a micro-batch's forward and backward:
fp32 weights, fp32 gradients, the optimizer's state, autocast's bf16 copies of the weights, the activations kept
for backward and the transient of the chunked loss. The activation bytes per token come from counting, tensor by
tensor, what autograd saves in this model's eager forward (:func:`activation_bytes_per_token`); the formula is
checked in the tests against a measurement of the saved tensors (:func:`measure_saved_bytes`), and it matches the
real qwen3-134m on CPU to within a few bytes per token. ``docs/gpu-memory.md`` works the numbers for gpu-134m.

Not counted: the CUDA context and cuBLAS/flash-attention workspaces (~1 GB), allocator fragmentation, and what
``torch.compile`` saves (it fuses element-wise ops, so it usually keeps less than eager). Hence the automatic
micro-batch uses at most :data:`AUTO_MEMORY_FRACTION` of the GPU.
"""

from __future__ import annotations

import math

import torch

from lmopt.model.presets import get_preset
from lmopt.model.qwen3 import LOSS_CHUNK_TOKENS, Qwen3, Qwen3Config
from lmopt.registry import OPTIMIZERS

GIB = 2**30
AUTO_MEMORY_FRACTION = 0.75

# Dense bf16 peak FLOP/s per GPU (vendor data sheets, without sparsity), matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
}


def peak_flops(device_name: str) -> float | None:
    """The table's peak for a device name such as ``"NVIDIA H100 80GB HBM3"`` (longest match first), or None."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def activation_bytes_per_token(cfg: Qwen3Config, dtype: str = "bf16", activation_checkpointing: bool = False
                               ) -> dict[str, int]:
    """Bytes autograd keeps per token: per block (``layer``), after the blocks (``final``) and in all (``total``).

    Eager forward of :class:`lmopt.model.Qwen3`; ``dtype`` "bf16" is bf16 autocast over fp32 weights (the residual
    stream, norms and softmax statistics stay fp32), "fp32" no autocast. Per block, in elements:

    - bf16: 3q + 3kv (q, k, v projections, q and k after rotary, attention output) + 4f (gate, up, silu(gate),
      their product) + 5d (autocast's bf16 copies of the two normed inputs, one per projection reading them)
      at 2 bytes; 4d (residual, normed) + q + kv (fp32 inputs of the q/k norms) + statistics at 4 bytes;
    - fp32: 6d + 4q + 4kv + 4f + statistics at 4 bytes;

    with q = n_heads x head_dim, kv = n_kv_heads x head_dim, f = mlp_dim, statistics = 2 n_heads + n_kv_heads + 2
    (attention's log-sum-exp, the RMSNorm reciprocals). With activation checkpointing a block keeps only its input
    (4d bytes); ``recompute`` is then one block's full activations, alive while that block runs backward.
    """
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"Invalid dtype {dtype!r}; choose bf16 or fp32")
    d, f = cfg.d_model, cfg.mlp_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    stats = 2 * cfg.n_heads + cfg.n_kv_heads + 2
    if dtype == "bf16":
        full_layer = 2 * (3 * q + 3 * kv + 4 * f + 5 * d) + 4 * (4 * d + q + kv + stats)
    else:
        full_layer = 4 * (6 * d + 4 * q + 4 * kv + 4 * f + stats)
    final = 4 * 3 * d + 4 + 4 + 16  # final norm's input, normed and output; its statistic; lse; ids and targets
    layer = 4 * d if activation_checkpointing else full_layer
    recompute = full_layer if activation_checkpointing else 0
    return {"layer": layer, "final": final, "recompute": recompute, "total": cfg.n_layers * layer + final}


def optimizer_state_bytes(model: Qwen3, optimizer: str) -> int:
    """fp32 optimizer state: the registry's bytes/param on the parameters the optimizer owns (for a matrix
    optimizer, the hidden matrices; its AdamW part keeps 8 bytes/param of the rest)."""
    from lmopt.optim.matrix import matrix_param_groups

    spec = OPTIMIZERS.get(optimizer)
    total = model.num_params()
    if spec.kind != "matrix":
        return math.ceil(spec.state_bytes_per_param * total)
    owned = sum(p.numel() for g in matrix_param_groups(model, 0.0) if g["matrix"] for p in g["params"])
    return math.ceil(spec.state_bytes_per_param * owned + 8 * (total - owned))


def estimate_memory(preset: str, seq_len: int, micro_batch_sequences: int, optimizer: str = "adamw",
                    dtype: str = "bf16", activation_checkpointing: bool = False, *, fsdp_ranks: int = 1,
                    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS) -> dict:
    """Peak bytes on one rank for a training step; ``total`` is the peak, the other entries its parts (all of
    them at once, as in the steady state of gradient accumulation, except that ``loss_chunk`` and
    ``backward_workspace`` are never alive together: ``total`` counts the larger).

    ``fsdp_ranks`` > 1: weights, gradients and optimizer state are sharded over that many ranks, and the
    unsharded root (embedding) plus two blocks (the running one and the prefetched one) are added.
    Returns bytes (ints) for: weights, gradients, optimizer_state, weight_casts (autocast's bf16 copies, kept
    for backward), unsharded (FSDP's gathered parameters), activations, loss_chunk, backward_workspace (the
    gradients of one block's activations, or its recomputation), total; and params, tokens,
    activation_bytes_per_token, flops_per_token, total_gib.
    """
    cfg = get_preset(preset).config
    with torch.device("meta"):
        model = Qwen3(cfg)
    params = model.num_params()
    block_params = sum(p.numel() for p in model.layers[0].parameters())
    tokens = seq_len * micro_batch_sequences
    per_token = activation_bytes_per_token(cfg, dtype, activation_checkpointing)
    ranks = max(1, fsdp_ranks)
    chunk = min(tokens, loss_chunk_tokens)
    parts = {
        "weights": 4 * params // ranks,
        "gradients": 4 * params // ranks,
        "optimizer_state": optimizer_state_bytes(model, optimizer) // ranks,
        "weight_casts": 2 * params if dtype == "bf16" else 0,
        "unsharded": 4 * (params - cfg.n_layers * block_params + 2 * block_params) if ranks > 1 else 0,
        "activations": tokens * per_token["total"],
        # the chunk's logits in fp32 (softmax and dz are computed in place) and their bf16 matmul output / copy
        "loss_chunk": chunk * cfg.vocab_size * 6,
        "backward_workspace": tokens * max(per_token["recompute"], per_token["layer"]),
    }
    # the loss's transient and the backward workspace come one after the other, never together
    total = sum(parts.values()) - min(parts["loss_chunk"], parts["backward_workspace"])
    return parts | {
        "total": total,
        "total_gib": total / GIB,
        "params": params,
        "tokens": tokens,
        "activation_bytes_per_token": per_token["total"],
        "flops_per_token": model.flops_per_token(seq_len),
    }


def auto_micro_batch(preset: str, seq_len: int, rank_sequences: int, optimizer: str, dtype: str,
                     activation_checkpointing: bool, device_bytes: int, fsdp_ranks: int = 1) -> int:
    """The largest divisor of ``rank_sequences`` whose estimate fits ``AUTO_MEMORY_FRACTION`` of the device
    (1 if none does: the caller's run then fails with the device's own out-of-memory error, naming the need)."""
    budget = AUTO_MEMORY_FRACTION * device_bytes
    for size in sorted((m for m in range(1, rank_sequences + 1) if rank_sequences % m == 0), reverse=True):
        estimate = estimate_memory(preset, seq_len, size, optimizer, dtype, activation_checkpointing,
                                   fsdp_ranks=fsdp_ranks)
        if estimate["total"] <= budget:
            return size
    return 1


def measure_saved_bytes(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                        autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once; parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            idx.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        model(idx, targets)
    return sum(seen.values())
