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

``trust_from``: ``"current"`` (default, the paper's) takes both norms from this step's r and w, which needs a
pass over the tensor before the update can be written (the fused step reads m, v and w twice: 10 full-size
streams against fused AdamW's 7, a floor of 1.43x). Without weight decay (the embedding's and the norms' groups
under ``role_param_groups``) the fused step needs one stream fewer and computes the same ratio: r is then the
direction alone, and φ(||w||) is max_trust as soon as Σw² over w's first elements reaches max_trust², so pass 1
reads w only that far (looking at most at the larger of an eighth of the tensor and 2^16 elements; qwen3-134m's
embedding, ||w|| = 97 at initialisation, reaches it after 1%) and reads all of it only where the norm stays below
the clip. For finite w the ratio is the same up to summation rounding. ``"previous"`` (our option,
not in the paper) uses the trust ratio of the previous step, ||w_{t-1}|| and ||r_{t-1}||, which the previous
update's own pass summed; the first step takes its own (there is no previous one). A trust ratio is one number
per tensor and the norms behind it move slowly from step to step, so the step stays LAMB's but is one pass, like
fused AdamW's. Whether it changes the loss is measured by ``lmopt bench variant`` (results/cpu-full/variants.md).

``reuse_grad`` (our option, off by default; the fused step only): at the paper's timing, pass 1 writes the
direction m̂ / (√v̂ + ε) over the gradient it has just read, and pass 2 reads that and w instead of m, v and w: 6
full-size reads and 4 writes instead of 7 and 3 (5 and 4 instead of 6 and 3 where pass 1 skips w), and pass 2
no longer recomputes the square root and division. On this project's CPU it took LAMB's step from 1.23x to 1.06x
fused AdamW's on qwen3-134m's embedding and from 1.31x to 1.22x on its other tensors
(results/step/lamb-cpu-probe.md, at 0f6ad40). The step is the same, bit for bit (tested). The price:
``p.grad`` holds the direction after the step, not the gradient, for every fp32/fp64 contiguous CPU tensor the
fused kernel takes (others are left as they were); a gradient tensor shared by two parameters, or memory it
aliases outside torch, would be overwritten as well. A torch optimizer leaves gradients as they were, hence off by
default; a training loop that zeroes or discards gradients after the step loses nothing: ``lmopt train`` sets them
to None right after it, so ``optim.reuse_grad=true`` is safe there.
"""

from __future__ import annotations

import torch

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.distributed import replicate_like, replicated
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import (
    AdamFamily,
    adam_denominators,
    adam_direction,
    adam_moments_,
    adam_moments_foreach_,
    adam_settings,
    foreach_in_buckets,
    fused_adam_family,
)
from lmopt.optim.spec import OptionError, register_class

TRUST_TIMINGS = ("current", "previous")


def trust_norms(direction: torch.Tensor, p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """[||w||², ||direction + λ w||²] (shape (2,)): what the trust ratio needs."""
    r = direction.add(p, alpha=weight_decay) if weight_decay else direction
    return replicated(torch.stack([p.square().sum(), r.square().sum()]))


def trust_from_norms(norms: torch.Tensor, max_trust: float) -> torch.Tensor:
    """min(||w||, max_trust) / ||r|| from [||w||², ||r||²] (1 when either norm is 0), a 0-d tensor."""
    w_norm, r_norm = norms[0].sqrt().clamp(max=max_trust), norms[1].sqrt()
    return torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))


def lamb_trust(direction: torch.Tensor, p: torch.Tensor, weight_decay: float, max_trust: float) -> torch.Tensor:
    """The trust ratio min(||w||, max_trust) / ||direction + λ w|| (1 when either norm is 0), a 0-d tensor."""
    return trust_from_norms(trust_norms(direction, p, weight_decay), max_trust)


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
        trust_from: "current" (this step's norms, as the paper) or "previous" (the previous step's trust ratio;
            the fused step is then one pass; see the module docstring).
        reuse_grad: let the fused step (at the paper's timing) keep its direction in ``p.grad``'s buffer (one
            full-size read fewer, no recomputation in the second pass); ``p.grad`` then no longer holds the gradient
            after the step (see the module docstring). Other impls leave the gradient as it was.
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "fused" (two C++ passes per fp32/fp64
            CPU tensor: the moments with both norms, then the step, or one pass with ``trust_from="previous"``;
            other tensors run "for-loop"), or "foreach" (the paper's timing as multi-tensor calls, a few kernels for
            all tensors on a GPU, the trust ratios brought to the host once per group; ``trust_from="previous"``,
            mixed dtypes and DTensor shards run "for-loop").
    """

    def __init__(self, params, lr: float = 2e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_trust: float = 10.0, trust_from: str = "current",
                 reuse_grad: bool = False, impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if max_trust <= 0:
            raise OptionError(f"Invalid max_trust: {max_trust}")
        if trust_from not in TRUST_TIMINGS:
            raise OptionError(f"Invalid trust_from {trust_from!r}; choose one of {', '.join(TRUST_TIMINGS)}")
        impl = cpu_kernels.fused_or_fallback(impl, "LAMB")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust=max_trust,
                                      trust_from=trust_from, reuse_grad=bool(reuse_grad)), impl)

    constant_keys = ("max_trust", "trust_from", "reuse_grad")
    impls = (*ELEMENTWISE_IMPLS, "fused", "foreach")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints made before the options existed
            group.setdefault("trust_from", "current")
            group.setdefault("reuse_grad", False)

    def tensors(self, p, state, group):
        """The two moments, and with ``trust_from="previous"`` [||w||², ||r||²] of the previous step (zeros before
        the first: the first step then takes its own)."""
        if group.get("trust_from", "current") == "current":
            return super().tensors(p, state, group)
        if "trust_norms" not in state:  # also where a checkpoint made with "current" is resumed
            dtype = torch.promote_types(p.dtype, torch.float32)
            state["trust_norms"] = replicate_like(torch.zeros(2, dtype=dtype, device=p.device), p)
        return [*super().tensors(p, state, group), state["trust_norms"]]

    def fused_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """Every fp32/fp64 CPU tensor's step in one C++ call per ``trust_from`` (:mod:`lmopt.optim.cpu_kernels`'
        ``lamb_steps_``): per tensor the moments with ||r||² and ||w||², the trust ratio, then the step; with
        ``trust_from="previous"`` after the first step, one pass that steps by the previous ratio and sums this
        step's norms. ``reuse_grad``: the direction kept in the gradient's buffer between the paper's two passes.
        One call per timing and ``reuse_grad`` for the whole step (scripts/lamb_cpu_probe.py times a call per
        tensor against it on qwen3-134m)."""
        kernels, fused = fused_adam_family(params, grads, tensors)
        previous = [c["trust_from"] == "previous" for c in constants]  # anything else: the paper's, as ``update``
        reuse = [c.get("reuse_grad", False) and not prev for c, prev in zip(constants, previous, strict=True)]
        fused = [ok and (not prev or cpu_kernels.usable(p, ts[2], matrix=False, same_shape=False))
                 for ok, prev, p, ts in zip(fused, previous, params, tensors, strict=True)]
        for timing, in_grad in ((False, False), (False, True), (True, False)):
            chosen = [i for i, ok in enumerate(fused) if ok and previous[i] == timing and reuse[i] == in_grad]
            if chosen:
                kernels.lamb_steps_(*([x[i] for i in chosen] for x in (params, grads)),
                                    *([tensors[i][j] for i in chosen] for j in range(2)),
                                    [tensors[i][2] for i in chosen] if timing else [],
                                    adam_settings(chosen, scalars, constants, extra=["max_trust"]), in_grad)
        return fused

    def foreach_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """impl "foreach": :func:`lamb_foreach_step` per set of tensors sharing dtype, device, group and step."""
        return foreach_in_buckets(lamb_foreach_step, 2, params, grads, tensors, scalars, constants,
                                  takes=lambda i: constants[i]["trust_from"] == "current")

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq = tensors[:2]
        lr, bias1, bias2 = scalars
        adam_moments_(exp_avg, exp_avg_sq, grad, c["betas"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        if c["trust_from"] == "previous":
            previous, norms = tensors[2], trust_norms(direction, p, c["weight_decay"])
            # the previous step's norms, or this step's on the first (no previous ones: zeros)
            step = trust_from_norms(torch.where(previous[1] > 0, previous, norms.to(previous.dtype)),
                                    c["max_trust"]) * lr
            previous.copy_(norms)
        else:
            step = lamb_trust(direction, p, c["weight_decay"], c["max_trust"]) * lr
        # W <- W (1 - step λ) - step m̂ / (√v̂ + ε), the direction written afresh from the stored moments: the
        # compiled step then recomputes it instead of keeping it in a fresh full-size buffer, whose first touch
        # alone cost more than fused AdamW's whole step on the 152k x 512 embedding.
        decoupled_weight_decay_(p, step, c["weight_decay"])
        p.sub_(exp_avg * step / (((exp_avg_sq / bias2).sqrt() + c["eps"]) * bias1))


def lamb_foreach_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], scalars: tuple[float, ...], c: dict) -> None:
    """One LAMB step (the paper's timing) of tensors sharing dtype, device and hyper-parameters, in multi-tensor
    calls: the moments, r = m̂ / (√v̂ + ε) + λ w, every ||w|| and ||r|| by ``torch._foreach_norm``, the trust
    ratios as one vector (one copy to the host), then W <- W - lr · trust · r."""
    lr, bias1, bias2 = scalars
    adam_moments_foreach_(exp_avgs, exp_avg_sqs, grads, c["betas"])
    denominators = adam_denominators(exp_avg_sqs, bias2, c["eps"])
    torch._foreach_mul_(denominators, bias1)
    directions = torch._foreach_div(exp_avgs, denominators)  # r = m̂ / (√v̂ + ε) (+ λ w below)
    del denominators
    if c["weight_decay"]:
        torch._foreach_add_(directions, params, alpha=c["weight_decay"])
    norms = torch.stack([torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(directions))])
    steps = (trust_from_norms(norms.square(), c["max_trust"]) * -lr).tolist()
    torch._foreach_mul_(directions, steps)
    torch._foreach_add_(params, directions)


register_class(
    LAMB,
    name="lamb",
    summary="LAMB: Adam direction rescaled per tensor by the trust ratio ||w|| / ||update||",
    source="You et al. 2020, arXiv:1904.00962",
    state_bytes_per_param=8.0,
    impls=LAMB.impls,
)
