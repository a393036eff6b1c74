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

import torch

from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import ElementwiseOptimizer, add_scaled_, bias_corrections
from lmopt.optim.spec import OptimizerSpec, grouped_builder, register


def update_rms(grad: torch.Tensor, exp_avg_sq: torch.Tensor, bias2: float, eps: float) -> torch.Tensor:
    """sqrt(mean(g² / max(v̂, ε²))) with v̂ = v / bias2, a 0-d tensor."""
    v_hat = exp_avg_sq / bias2
    return (grad.square() / v_hat.clamp(min=eps * eps)).mean().sqrt()


class StableAdamW(ElementwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, impl: str = "eager") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), impl)

    buffers = ("exp_avg", "exp_avg_sq")

    def scalars(self, group, state):
        return (group["lr"], *bias_corrections(group["betas"], state["step"]))

    def constants(self, group):
        return {k: group[k] for k in ("betas", "eps", "weight_decay")}

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq = tensors
        lr, bias1, bias2 = scalars
        beta1, beta2 = c["betas"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        clip = update_rms(grad, exp_avg_sq, bias2, c["eps"]).clamp(min=1.0)
        decoupled_weight_decay_(p, lr, c["weight_decay"])
        direction = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(c["eps"]))
        add_scaled_(p, direction.div_(clip), -lr)


register(OptimizerSpec(
    name="stable-adamw",
    summary="StableAdamW: AdamW whose per-tensor step shrinks when RMS(g²/v̂) exceeds 1",
    source="Wortsman et al. 2023, arXiv:2304.13013",
    builder=grouped_builder(StableAdamW),
    defaults={"betas": (0.9, 0.95), "eps": 1e-8, "impl": "eager"},
    default_lr=5e-3,
    default_weight_decay=0.1,
    state_bytes_per_param=8.0,
    impls=ELEMENTWISE_IMPLS,
))
