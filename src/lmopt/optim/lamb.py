"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes", ICLR 2020, arXiv:1904.00962, Algorithm 2).

Per tensor:

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    r = m̂ / (√v̂ + ε) + λ w                      (Adam direction plus weight decay, inside the ratio)
    trust = φ(||w||) / ||r||,  φ(z) = min(z, max_trust);   trust = 1 when ||w|| or ||r|| is 0
    w <- w - lr · trust · r

Defaults: betas (0.9, 0.999), eps 1e-6, weight decay 0.01, as in the paper's BERT runs; max_trust 10
(the clip of the NVIDIA/apex implementation; the paper's φ is any bounded function). Bias correction is on,
as in the paper's Algorithm 2.
"""

from __future__ import annotations

import math

import torch

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import AdamFamily, adam_direction, adam_moments_
from lmopt.optim.spec import OptionError, register_class


def lamb_trust(direction: torch.Tensor, p: torch.Tensor, weight_decay: float, max_trust: float) -> torch.Tensor:
    """The trust ratio min(||w||, max_trust) / ||direction + λ w|| (1 when either norm is 0), a 0-d tensor."""
    r = direction.add(p, alpha=weight_decay) if weight_decay else direction
    w_norm = p.norm().clamp(max=max_trust)
    r_norm = r.norm()
    return torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))


class LAMB(AdamFamily):
    """LAMB: Adam's direction plus weight decay, rescaled per tensor by the trust ratio.

    Each tensor steps by lr · trust · r, with r = m̂ / (√v̂ + ε) + λ w and trust = min(||w||, max_trust) / ||r||
    (1 when either norm is 0).

    Args:
        params: parameters or parameter groups (``lmopt.optim.role_param_groups(model, weight_decay)`` gives
            weight decay to matrices only).
        lr: learning rate (>= 0), multiplied by each tensor's trust ratio.
        betas: (β1, β2) of the first and second moments, each in [0, 1).
        eps: added to the square root of the bias-corrected second moment (> 0).
        weight_decay: λ (>= 0), added to the Adam direction inside the trust ratio (so also scaled by it).
        max_trust: the cap on ||w|| in the trust ratio's numerator (> 0; the NVIDIA/apex clip).
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "fused" (two C++ passes per fp32/fp64
            CPU tensor: the moments with both norms, then the step; other tensors run "for-loop").
    """

    def __init__(self, params, lr: float = 2e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_trust: float = 10.0, impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if max_trust <= 0:
            raise OptionError(f"Invalid max_trust: {max_trust}")
        impl = cpu_kernels.fused_or_fallback(impl, "LAMB")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust=max_trust),
                         impl)

    constant_keys = ("max_trust",)
    impls = (*ELEMENTWISE_IMPLS, "fused")

    def fused_update(self, p, grad, tensors, scalars, c) -> bool:
        """Two C++ passes (:mod:`lmopt.optim.cpu_kernels`): the moments with ||r||² and ||w||², then the step."""
        exp_avg, exp_avg_sq = tensors
        kernels = cpu_kernels.kernels_for(p, grad, exp_avg, exp_avg_sq, matrix=False)
        if kernels is None:
            return False
        lr, bias1, bias2 = scalars
        r_sq, w_sq = kernels.lamb_moments_(p, grad, exp_avg, exp_avg_sq, *c["betas"], bias1, bias2, c["eps"],
                                           c["weight_decay"]).tolist()
        w_norm, r_norm = min(math.sqrt(w_sq), c["max_trust"]), math.sqrt(r_sq)
        step = lr * (w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0)
        kernels.lamb_apply_(p, exp_avg, exp_avg_sq, bias1, bias2, c["eps"], 1 - step * c["weight_decay"], step)
        return True

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq = tensors
        lr, bias1, bias2 = scalars
        adam_moments_(exp_avg, exp_avg_sq, grad, c["betas"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        step = lamb_trust(direction, p, c["weight_decay"], c["max_trust"]) * lr
        # W <- W (1 - step λ) - step m̂ / (√v̂ + ε), the direction written afresh from the stored moments: the
        # compiled step then recomputes it instead of keeping it in a fresh full-size buffer, whose first touch
        # alone cost more than fused AdamW's whole step on the 152k x 512 embedding.
        decoupled_weight_decay_(p, step, c["weight_decay"])
        p.sub_(exp_avg * step / (((exp_avg_sq / bias2).sqrt() + c["eps"]) * bias1))


register_class(
    LAMB,
    name="lamb",
    summary="LAMB: Adam direction rescaled per tensor by the trust ratio ||w|| / ||update||",
    source="You et al. 2020, arXiv:1904.00962",
    state_bytes_per_param=8.0,
    impls=LAMB.impls,
)
