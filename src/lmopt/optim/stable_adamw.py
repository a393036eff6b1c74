"""StableAdamW: AdamW with AdaFactor-style update clipping per tensor (Wortsman et al., "Stable and
low-precision training for large-scale vision-language models", NeurIPS 2023, arXiv:2304.13013, Algorithm 2).

Per tensor:

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   m̂, v̂ bias-corrected
    RMS = sqrt(mean(g^2 / max(v̂, ε^2)))          (how far this gradient exceeds its running second moment)
    η = lr / max(1, RMS)
    w <- w - lr λ w - η m̂ / (√v̂ + ε)

The clip replaces global gradient clipping in the paper (our trainer still clips at its own setting; set
``grad_clip = 0`` to follow the paper exactly). Weight decay uses the unclipped lr, as in Algorithm 2.
Defaults: betas (0.9, 0.95) like lmopt's AdamW, eps 1e-8 (the paper uses 1e-6 with β2 = 0.99 for CLIP).
"""

from __future__ import annotations

import math

import torch

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import (
    AdamFamily,
    adam_denominators,
    adam_direction,
    adam_moments_,
    adam_moments_foreach_,
    adam_settings,
    add_scaled_,
    foreach_in_buckets,
    fused_adam_family,
)
from lmopt.optim.spec import register_class


def update_rms(grad: torch.Tensor, exp_avg_sq: torch.Tensor, bias2: float, eps: float) -> torch.Tensor:
    """sqrt(mean(g² / max(v̂, ε²))) with v̂ = v / bias2, a 0-d tensor."""
    v_hat = exp_avg_sq / bias2
    return (grad.square() / v_hat.clamp(min=eps * eps)).mean().sqrt()


class StableAdamW(AdamFamily):
    """StableAdamW: AdamW with AdaFactor-style update clipping per tensor.

    Each tensor's Adam step uses lr / max(1, RMS), RMS = sqrt(mean(g² / max(v̂, ε²))): it shrinks when the gradient
    exceeds its running second moment. Weight decay uses the unclipped lr.

    Args:
        params: parameters or parameter groups (``lmopt.optim.role_param_groups(model, weight_decay)`` gives
            weight decay to matrices only).
        lr: learning rate (>= 0).
        betas: (β1, β2) of the first and second moments, each in [0, 1).
        eps: added to the square root of the bias-corrected second moment; ε² is also the floor of v̂ in the RMS
            (> 0).
        weight_decay: decoupled weight decay λ (>= 0): the update subtracts lr·λ·w.
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "fused" (two C++ passes per fp32/fp64
            CPU tensor: the moments with the clip's sum, then the step; other tensors run "for-loop"), or "foreach"
            (multi-tensor calls, a few kernels for all tensors on a GPU, the clips brought to the host once per group;
            mixed dtypes and DTensor shards run "for-loop").
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        impl = cpu_kernels.fused_or_fallback(impl, "StableAdamW")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), impl)

    impls = (*ELEMENTWISE_IMPLS, "fused", "foreach")

    def fused_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """Every fp32/fp64 CPU tensor's step in one C++ call (:mod:`lmopt.optim.cpu_kernels`'
        ``stable_adamw_steps_``): per tensor the moments with sum g²/max(v̂, ε²), then LAMB's step pass with decay
        1 - lr λ and step lr / max(1, RMS)."""
        kernels, fused = fused_adam_family(params, grads, tensors)
        chosen = [i for i, ok in enumerate(fused) if ok]
        if chosen:
            kernels.stable_adamw_steps_(*([x[i] for i in chosen] for x in (params, grads)),
                                        *([tensors[i][j] for i in chosen] for j in range(2)),
                                        adam_settings(chosen, scalars, constants))
        return fused

    def foreach_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """impl "foreach": :func:`stable_adamw_foreach_step` per set of tensors sharing dtype, device, group and
        step."""
        return foreach_in_buckets(stable_adamw_foreach_step, 2, params, grads, tensors, scalars, constants)

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq = tensors
        lr, bias1, bias2 = scalars
        adam_moments_(exp_avg, exp_avg_sq, grad, c["betas"])
        clip = update_rms(grad, exp_avg_sq, bias2, c["eps"]).clamp(min=1.0)
        decoupled_weight_decay_(p, lr, c["weight_decay"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        add_scaled_(p, direction.div_(clip), -lr)


def stable_adamw_foreach_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                              exp_avg_sqs: list[torch.Tensor], scalars: tuple[float, ...], c: dict) -> None:
    """One StableAdamW step of tensors sharing dtype, device and hyper-parameters, in multi-tensor calls: the
    moments, each RMS as ||g / √max(v̂, ε²)|| / √n by ``torch._foreach_norm`` (one copy of the clips to the host),
    the decay, then W <- W - lr / max(1, RMS) · m̂ / (√v̂ + ε) in one ``addcdiv``."""
    lr, bias1, bias2 = scalars
    eps, weight_decay = c["eps"], c["weight_decay"]
    adam_moments_foreach_(exp_avgs, exp_avg_sqs, grads, c["betas"])
    floors = torch._foreach_div(exp_avg_sqs, bias2)
    torch._foreach_clamp_min_(floors, eps * eps)
    torch._foreach_sqrt_(floors)
    scaled = torch._foreach_div(grads, floors)  # g / √max(v̂, ε²)
    del floors
    norms = torch.stack(torch._foreach_norm(scaled)).tolist()
    del scaled
    clips = [max(1.0, norm / math.sqrt(p.numel())) for norm, p in zip(norms, params, strict=True)]
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denominators = adam_denominators(exp_avg_sqs, bias2, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-lr / (clip * bias1) for clip in clips])


register_class(
    StableAdamW,
    name="stable-adamw",
    summary="StableAdamW: AdamW whose per-tensor step shrinks when RMS(g²/v̂) exceeds 1",
    source="Wortsman et al. 2023, arXiv:2304.13013",
    state_bytes_per_param=8.0,
    impls=StableAdamW.impls,
)
