"""AMCS, Adaptive Momentum with Component Scaling (Aardvark 2025).

What the paper says (Section 3): "m_t = α(t) m_fast + (1 − α(t)) m_slow where α(t) transitions from 1 to 0
during training, and component-specific learning rates η_c = γ_c η_base"; "Dual momentum buffers
(β1 = 0.9, β2 = 0.95)"; "Component scales: attention (1.2x), FFN (1.0x), embeddings (0.8x)"; "Linear warmup
over first 10% of training"; "Gradient clipping at 1.0". It reports more memory than AdamW: 41.8 vs 31.5 GB, +10.3 GB.

The update, per tensor at step t of T:

    m_fast <- 0.9 m_fast + 0.1 g,   m_slow <- 0.95 m_slow + 0.05 g,   v <- β_v v + (1 − β_v) g²  (bias-corrected)
    α(t) = 1 − (t − 1) / (T − 1)      (linear from 1 at the first step to 0 at the last; or cosine)
    m̂ = α m̂_fast + (1 − α) m̂_slow
    W <- W (1 − γ_role η λ) − γ_role η m̂ / (√v̂ + ε)

Our choices where the text is silent:
- "Adaptive Momentum": Adam's second-moment normalisation, β_v = 0.999 (the paper's two betas are the two
  momenta); decoupled weight decay as AdamW, with the component's learning rate: the paper calls η_c = γ_c η
  the component's *learning rate* (Eq. 2), and AdamW decays by the learning rate times λ, so a component
  stepped with η_c decays with η_c λ (what ``torch.optim.AdamW`` does with a per-group lr). Until issue 20 the
  decay used the base η; tested in tests/optim/test_papers.py.
- memory: three buffers (12 bytes per fp32 parameter against AdamW's 8; bf16 parameters keep bf16
  buffers). On qwen3-134m that is 1.61 GB of state against AdamW's 1.08 GB, +0.54 GB (134,430,208
  parameters x 4 bytes; measured by stepping both once on the model built on the meta device and summing
  the state tensors' bytes). The paper's +10.3 GB is 19 times that: the third buffer does not explain it,
  and the paper does not say what does.
- α's shape: ``alpha_schedule = "linear"`` (default) or ``"cosine"``; T is the run's step count, which
  ``lmopt train`` passes as ``total_steps`` (required).
- roles: attention ×1.2, MLP ×1.0, embeddings ×0.8; norms, head and other ×1.0.
- the warm-up and clipping are the trainer's settings (``warmup_frac = 0.1`` and ``grad_clip = 1.0``
  reproduce the paper's recipe; the benchmark gives every optimizer the same schedule).
"""

from __future__ import annotations

import math

import torch

from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import (
    ElementwiseOptimizer,
    adam_denominators,
    add_scaled_,
    foreach_in_buckets,
)
from lmopt.optim.roles import ATTENTION_ROLES
from lmopt.optim.spec import OptionError, register_class

PAPER_COMPONENT_SCALES = {**{r: 1.2 for r in ATTENTION_ROLES}, "mlp": 1.0, "embedding": 0.8}
ALPHA_SCHEDULES = ("linear", "cosine")


def mixing_weight(step: int, total_steps: int, schedule: str = "linear") -> float:
    """α(t): 1 at step 1, 0 at step ``total_steps`` (held at 0 beyond)."""
    progress = min(1.0, (step - 1) / max(1, total_steps - 1))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise OptionError(f"Invalid alpha_schedule {schedule!r}; choose one of {', '.join(ALPHA_SCHEDULES)}")


class AMCS(ElementwiseOptimizer):
    """AMCS (Adaptive Momentum with Component Scaling): Adam whose momentum slides from fast to slow over the run.

    m̂ = α(t) m̂_fast + (1 - α(t)) m̂_slow, with α going from 1 at the first step to 0 at step ``total_steps`` (and
    held at 0 beyond); the step is lr_role · m̂ / (√v̂ + ε), with per-role lr scales.

    Args:
        params: parameters or parameter groups; the role rules read each group's ``role`` key, as
            ``lmopt.optim.role_param_groups(model, weight_decay)`` makes (a group without one is "other").
        total_steps: T, the run's number of optimizer steps (>= 1; required, ``lmopt train`` passes it).
        lr: base learning rate (>= 0); a group's step and its weight decay use lr × its component scale.
        betas: (β_fast, β_slow, β_v): the decays of the fast momentum, the slow momentum and the second moment,
            each in [0, 1).
        eps: added to the square root of the bias-corrected second moment (> 0).
        weight_decay: decoupled weight decay λ (>= 0), with the component-scaled lr.
        alpha_schedule: α's shape over the run: "linear" (α = 1 - (t - 1) / (T - 1)) or "cosine"
            (α = (1 + cos(π (t - 1) / (T - 1))) / 2).
        component_scales: scale the lr by role: attention ×1.2, embedding ×0.8, every other role ×1.0; False
            gives every group the base lr.
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "foreach" (multi-tensor calls, a few
            kernels for all tensors on a GPU; mixed dtypes and DTensor shards run "for-loop").
    """

    def __init__(self, params, total_steps: int, lr: float = 5e-3,
                 betas: tuple[float, float, float] = (0.9, 0.95, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.1, alpha_schedule: str = "linear", component_scales: bool = True,
                 impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if total_steps < 1:
            raise OptionError(f"Invalid total_steps: {total_steps} (AMCS needs the run's length)")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise OptionError(f"Invalid alpha_schedule {alpha_schedule!r}; choose one of {', '.join(ALPHA_SCHEDULES)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      total_steps=total_steps, alpha_schedule=alpha_schedule,
                                      component_scales=component_scales), impl)

    buffers = ("fast", "slow", "exp_avg_sq")
    impls = (*ELEMENTWISE_IMPLS, "foreach")

    def foreach_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """impl "foreach": :func:`amcs_foreach_step` per set of tensors sharing dtype, device, group and step."""
        return foreach_in_buckets(amcs_foreach_step, 3, params, grads, tensors, scalars, constants)

    def scalars(self, group, state):
        beta_fast, beta_slow, beta_v = group["betas"]
        t = state["step"]
        scale = PAPER_COMPONENT_SCALES.get(group.get("role", "other"), 1.0) if group["component_scales"] else 1.0
        alpha = mixing_weight(t, group["total_steps"], group["alpha_schedule"])
        return group["lr"] * scale, alpha / (1 - beta_fast**t), (1 - alpha) / (1 - beta_slow**t), 1 - beta_v**t

    def constants(self, group):
        return {k: group[k] for k in ("betas", "eps", "weight_decay")}

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        fast, slow, exp_avg_sq = tensors
        component_lr, fast_weight, slow_weight, bias_v = scalars  # η_c = γ_c η: the lr of the step and the decay
        beta_fast, beta_slow, beta_v = c["betas"]
        fast.lerp_(grad, 1 - beta_fast)
        slow.lerp_(grad, 1 - beta_slow)
        exp_avg_sq.mul_(beta_v).addcmul_(grad, grad, value=1 - beta_v)
        m_hat = add_scaled_(fast * fast_weight, slow, slow_weight)  # α m̂_fast + (1 - α) m̂_slow
        denom = (exp_avg_sq / bias_v).sqrt_().add_(c["eps"])
        decoupled_weight_decay_(p, component_lr, c["weight_decay"])
        add_scaled_(p, m_hat.div_(denom), -component_lr)


def amcs_foreach_step(params: list[torch.Tensor], grads: list[torch.Tensor], fasts: list[torch.Tensor],
                      slows: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], scalars: tuple[float, ...],
                      c: dict) -> None:
    """One AMCS step of tensors sharing dtype, device, hyper-parameters and step, in multi-tensor calls (the
    per-tensor update has no reduction, so nothing comes back to the host)."""
    component_lr, fast_weight, slow_weight, bias_v = scalars
    beta_fast, beta_slow, beta_v = c["betas"]
    torch._foreach_lerp_(fasts, grads, 1 - beta_fast)
    torch._foreach_lerp_(slows, grads, 1 - beta_slow)
    torch._foreach_mul_(exp_avg_sqs, beta_v)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta_v)
    mixed = torch._foreach_mul(fasts, fast_weight)
    torch._foreach_add_(mixed, slows, alpha=slow_weight)  # α m̂_fast + (1 - α) m̂_slow
    denominators = adam_denominators(exp_avg_sqs, bias_v, c["eps"])
    if c["weight_decay"]:
        torch._foreach_mul_(params, 1 - component_lr * c["weight_decay"])
    torch._foreach_addcdiv_(params, mixed, denominators, value=-component_lr)


register_class(
    AMCS,
    name="amcs",
    summary="AMCS: Adam whose momentum slides from fast (0.9) to slow (0.95) over the run; role lr scales",
    source="Aardvark 2025, Adaptive Momentum with Component Scaling, short paper",
    state_bytes_per_param=12.0,
    impls=AMCS.impls,
)
