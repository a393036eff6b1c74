"""MSAM, Multi-Scale Adaptive Momentum (Aardvark 2025).

What the paper says (Section 3.2): "MSAM maintains: Fast momentum m^f_t = β1 m^f_{t-1} + (1 − β1) g_t;
Slow momentum m^s_t = β2 m^s_{t-1} + (1 − β2) g_t; Variance estimate v_t = β3 v_{t-1} + (1 − β3) g_t²."
"Update combines momenta based on gradient stability γ_t: m_t = α(γ_t) m^f_t + (1 − α(γ_t)) m^s_t", with
"Layer-specific α values: Attention: 0.85 + 0.1 γ_t; MLP: 0.6 + 0.3 γ_t; Embeddings/Norms: 0.05 γ_t".
β1 = 0.9 and β2 = 0.95 are given; β3, γ_t and the update that uses m_t are not.

The update, per tensor:

    m^f, m^s, v as above (β_fast 0.9, β_slow 0.95, β_v 0.999), each bias-corrected: m̂^f, m̂^s, v̂
    γ = stability(g, m^s_{t-1}) ∈ [0, 1]
    m̂ = α_role(γ) m̂^f + (1 − α_role(γ)) m̂^s
    W <- W (1 − η λ) − η m̂ / (√v̂ + ε)                          (Adam-style, decoupled weight decay)

Our choices where the text is silent:
- γ, per tensor (``stability``): ``"cosine"`` (default) = max(0, cos(g_t, m^s_{t-1})), the agreement of the
  new gradient with its long-run average (0 at the first step, where m^s is empty); or ``"variance"`` =
  1 − ||g_t − m^s_{t-1}||² / (||g_t||² + ||m^s_{t-1}||²), which is 1 when g equals the average and 0 when
  they are orthogonal (clamped to [0, 1]). Both are computed on-device, without a host sync.
- roles not named by the paper: the untied head and "other" follow the MLP rule; norms and embeddings the
  "Embeddings/Norms" rule. α is clamped to [0, 1].
- when γ is measured (``gamma_from``): ``"current"`` compares this step's gradient with the slow momentum
  before this step's update (the most literal reading of γ_t); ``"previous"`` (default) uses the same measure
  taken one step earlier (γ_t from g_{t-1} and m^s_{t-2}; 0 at the first two steps), which the update's own pass can
  compute, so that the fused step reads each operand once: 9 operand reads and writes to AdamW's 7, against 11
  with ``"current"`` (whose γ needs a pass over g and m^s before the update). A per-tensor stability statistic
  that drifts slowly, one step older. Its final loss on 10 paired seeds of cpu-full: Δ -0.0043 nats [-0.0105,
  +0.0019] against ``"current"`` (results/cpu-full/variants.md), equivalent within ±0.01, so the one-pass
  reading is the default (the paper defines γ_t no further than "gradient stability"); cpu-full's MSAM row
  itself ran with ``"current"``, the default before that evidence.
- β3 = 0.999 (Adam's default); the paper's "learning rates based on layer type" are not specified, so all
  roles share the lr.
Memory: three buffers per parameter (12 bytes for fp32 and fp16 parameters, 6 for bf16), 1.5x AdamW's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.distributed import replicate_like, replicated
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import (
    ElementwiseOptimizer,
    adam_denominators,
    add_scaled_,
    bias_corrections,
    foreach_buckets,
)
from lmopt.optim.roles import ATTENTION_ROLES
from lmopt.optim.spec import OptionError, register_class

STABILITY_MEASURES = ("cosine", "variance")
GAMMA_TIMINGS = ("current", "previous")


def alpha_for_role(role: str, gamma: Tensor) -> Tensor:
    """The paper's layer-specific mixing weight of the fast momentum."""
    if role in ATTENTION_ROLES:
        alpha = 0.85 + 0.1 * gamma
    elif role in ("embedding", "norm"):
        alpha = 0.05 * gamma
    else:  # mlp, head, other
        alpha = 0.6 + 0.3 * gamma
    return alpha.clamp(0.0, 1.0)


def stability_sums(grad: Tensor, slow: Tensor) -> Tensor:
    """[g·m_slow, ||g||², ||m_slow||²] (float32, shape (3,)): everything either stability measure needs."""
    g, s = grad.flatten().float(), slow.flatten().float()
    return torch.stack([g @ s, g @ g, s @ s])


def stability_from_sums(sums: Tensor, measure: str = "cosine") -> Tensor:
    """γ ∈ [0, 1] (0-d tensor) from :func:`stability_sums`: "cosine" max(0, cos(g, m_slow)), "variance"
    1 - ||g - m_slow||² / (||g||² + ||m_slow||²), with ||g - m_slow||² = ||g||² + ||m_slow||² - 2 g·m_slow."""
    gs, gg, ss = sums.unbind()
    if measure == "cosine":
        gamma = gs / (gg.sqrt() * ss.sqrt()).clamp(min=1e-30)
    elif measure == "variance":
        gamma = 1 - (gg + ss - 2 * gs) / (gg + ss).clamp(min=1e-30)
    else:
        raise OptionError(f"Invalid stability measure {measure!r}; choose one of {', '.join(STABILITY_MEASURES)}")
    return gamma.clamp(0.0, 1.0)


def gradient_stability(grad: Tensor, slow: Tensor, measure: str = "cosine") -> Tensor:
    """γ ∈ [0, 1] from the gradient and the slow momentum before this step's update (0-d tensor)."""
    return stability_from_sums(replicated(stability_sums(grad, slow)), measure)


class MSAM(ElementwiseOptimizer):
    """MSAM (Multi-Scale Adaptive Momentum): Adam with a fast and a slow momentum, mixed per role by gradient stability.

    m̂ = α m̂_fast + (1 - α) m̂_slow, with α = 0.85 + 0.1 γ on attention, 0.05 γ on embeddings and norms and
    0.6 + 0.3 γ on every other role (clamped to [0, 1]); γ ∈ [0, 1] is the agreement of the gradient with the slow
    momentum before this step (see ``stability``). The step is lr · m̂ / (√v̂ + ε).

    Args:
        params: parameters or parameter groups; the role rules read each group's ``role`` key, as
            ``lmopt.optim.role_param_groups(model, weight_decay)`` makes (a group without one is "other").
        lr: learning rate (>= 0), the same for every role.
        betas: (β_fast, β_slow, β_v): the decays of the fast momentum, the slow momentum and the second moment,
            each in [0, 1).
        eps: added to the square root of the bias-corrected second moment (> 0).
        weight_decay: decoupled weight decay λ (>= 0): the update subtracts lr·λ·w.
        stability: the measure γ: "cosine" (max(0, cos(g, m_slow))) or "variance"
            (1 - ||g - m_slow||² / (||g||² + ||m_slow||²), clamped to [0, 1]).
        gamma_from: "current" (this step's gradient against the slow momentum before the update) or "previous"
            (the same, one step older: the fused step then needs one pass instead of two; see the module
            docstring).
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "fused" (C++ passes per fp32/fp64 CPU
            tensor: γ's three sums, then the moments and the step, the first skipped with ``gamma_from="previous"``;
            other tensors run "for-loop") or "foreach" (multi-tensor calls, a few kernels for all tensors on a GPU,
            the mixing weights brought to the host once per group; bf16 tensors, mixed dtypes and DTensor shards
            run "for-loop").
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float, float] = (0.9, 0.95, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.1, stability: str = "cosine",
                 gamma_from: str = "previous", impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if stability not in STABILITY_MEASURES:
            raise OptionError(f"Invalid stability {stability!r}; choose one of {', '.join(STABILITY_MEASURES)}")
        if gamma_from not in GAMMA_TIMINGS:
            raise OptionError(f"Invalid gamma_from {gamma_from!r}; choose one of {', '.join(GAMMA_TIMINGS)}")
        impl = cpu_kernels.fused_or_fallback(impl, "MSAM")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stability=stability,
                                      gamma_from=gamma_from), impl)

    buffers = ("fast", "slow", "exp_avg_sq")
    impls = (*ELEMENTWISE_IMPLS, "fused", "foreach")

    def tensors(self, p, state, group):
        """The three buffers, and with ``gamma_from="previous"`` the stability sums of the previous step (3,)."""
        if group["gamma_from"] == "current":
            return super().tensors(p, state, group)
        if "stability_sums" not in state:  # also where a checkpoint made with "current" is resumed
            state["stability_sums"] = replicate_like(torch.zeros(3, device=p.device), p)
        return [*super().tensors(p, state, group), state["stability_sums"]]

    def fused_update(self, p, grad, tensors, scalars, c) -> bool:
        """C++ passes (:mod:`lmopt.optim.cpu_kernels`): g·m_slow, ‖g‖², ‖m_slow‖² for γ (skipped with
        ``gamma_from="previous"``, which takes the sums the update's pass returned at the previous step); then the
        moments and the step, returning this step's sums."""
        fast, slow, exp_avg_sq = tensors[:3]
        kernels = cpu_kernels.kernels_for(p, grad, fast, slow, exp_avg_sq, matrix=False)
        if kernels is None:
            return False
        lr, bias_fast, bias_slow, bias_v = scalars
        previous = c["gamma_from"] == "previous"
        sums = tensors[3] if previous else kernels.dot_norms_(grad, slow)
        alpha = alpha_for_role(c["role"], stability_from_sums(sums, c["stability"])).item()
        new_sums = kernels.msam_apply_(p, grad, fast, slow, exp_avg_sq, *c["betas"], alpha / bias_fast,
                                       (1 - alpha) / bias_slow, 1 / bias_v, c["eps"], 1 - lr * c["weight_decay"], lr)
        if previous:
            tensors[3].copy_(new_sums)
        return True

    def foreach_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """impl "foreach": :func:`msam_foreach_step` per set of tensors sharing dtype, device, group and step (the
        float32 stability sums of ``gamma_from="previous"`` beside them). bf16 tensors run ``update``, which sums
        in float32 (fp16 parameters arrive here as float32 working copies)."""
        buckets, taken = foreach_buckets(params, grads, tensors, scalars, constants, buffers=3,
                                         takes=lambda i: params[i].dtype in (torch.float32, torch.float64))
        for chosen in buckets:
            previous = constants[chosen[0]]["gamma_from"] == "previous"
            msam_foreach_step(*([x[i] for i in chosen] for x in (params, grads)),
                              *([tensors[i][j] for i in chosen] for j in range(3)),
                              [tensors[i][3] for i in chosen] if previous else None, scalars[chosen[0]],
                              constants[chosen[0]])
        return taken

    def scalars(self, group, state):
        return (group["lr"], *bias_corrections(group["betas"], state["step"]))

    def constants(self, group):
        return {k: group[k] for k in ("betas", "eps", "weight_decay", "stability", "gamma_from")} | {
            "role": group.get("role", "other")}

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        fast, slow, exp_avg_sq = tensors[:3]
        lr, bias_fast, bias_slow, bias_v = scalars
        beta_fast, beta_slow, beta_v = c["betas"]
        if c["gamma_from"] == "previous":
            sums = tensors[3]
            gamma = stability_from_sums(sums, c["stability"])
            sums.copy_(replicated(stability_sums(grad, slow)))
        else:
            gamma = gradient_stability(grad, slow, c["stability"])
        fast.lerp_(grad, 1 - beta_fast)
        slow.lerp_(grad, 1 - beta_slow)
        exp_avg_sq.mul_(beta_v).addcmul_(grad, grad, value=1 - beta_v)
        alpha = alpha_for_role(c["role"], gamma)
        m_hat = (fast / bias_fast) * alpha + (slow / bias_slow) * (1 - alpha)
        denom = (exp_avg_sq / bias_v).sqrt_().add_(c["eps"])
        decoupled_weight_decay_(p, lr, c["weight_decay"])
        add_scaled_(p, m_hat.div_(denom), -lr)


def stability_sums_foreach(grads: list[Tensor], slows: list[Tensor]) -> Tensor:
    """:func:`stability_sums` of every tensor, (n, 3) float32, from four ``_foreach_norm`` calls (there is no
    multi-tensor sum): with p = g ⊙ m_slow, g·m_slow = 2 Σ max(p, 0) - Σ |p|, two 1-norms. Exactly 0 while m_slow
    is 0, and the cosine's error stays at the sums' rounding relative to Σ |p| <= ||g|| ||m_slow||, whatever the
    ratio of the two norms (a polarised ||g + m_slow||² would lose it as that ratio grows). Summed in the tensors'
    dtype (float64 for float64 tensors, where the loop sums in float32)."""
    grad_sq = torch.stack(torch._foreach_norm(grads)).square()
    slow_sq = torch.stack(torch._foreach_norm(slows)).square()
    products = torch._foreach_mul(grads, slows)
    absolute = torch.stack(torch._foreach_norm(products, 1))
    torch._foreach_clamp_min_(products, 0.0)
    dots = 2 * torch.stack(torch._foreach_norm(products, 1)) - absolute
    return torch.stack([dots, grad_sq, slow_sq], dim=1).float()


def msam_foreach_step(params: list[Tensor], grads: list[Tensor], fasts: list[Tensor], slows: list[Tensor],
                      exp_avg_sqs: list[Tensor], previous_sums: list[Tensor] | None, scalars: tuple[float, ...],
                      c: dict) -> None:
    """One MSAM step of tensors sharing dtype, device, hyper-parameters (the role among them) and step, in
    multi-tensor calls: γ's sums for every tensor (:func:`stability_sums_foreach`; with ``previous_sums`` γ comes
    from those and this step's are stored), the mixing weights α (one copy to the host), the moments, then
    W <- W (1 - lr λ) - lr (α/b_f m_f + (1 - α)/b_s m_s) / (√v̂ + ε)."""
    lr, bias_fast, bias_slow, bias_v = scalars
    beta_fast, beta_slow, beta_v = c["betas"]
    sums = stability_sums_foreach(grads, slows)
    if previous_sums is not None:
        gamma_sums = torch.stack(previous_sums)
        torch._foreach_copy_(previous_sums, list(sums.unbind(0)))
    else:
        gamma_sums = sums
    alphas = alpha_for_role(c["role"], stability_from_sums(gamma_sums.T, c["stability"])).tolist()
    torch._foreach_lerp_(fasts, grads, 1 - beta_fast)
    torch._foreach_lerp_(slows, grads, 1 - beta_slow)
    torch._foreach_mul_(exp_avg_sqs, beta_v)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta_v)
    mixed = torch._foreach_mul(fasts, [alpha / bias_fast for alpha in alphas])
    slow_part = torch._foreach_mul(slows, [(1 - alpha) / bias_slow for alpha in alphas])
    torch._foreach_add_(mixed, slow_part)
    del slow_part
    denominators = adam_denominators(exp_avg_sqs, bias_v, c["eps"])
    if c["weight_decay"]:
        torch._foreach_mul_(params, 1 - lr * c["weight_decay"])
    torch._foreach_addcdiv_(params, mixed, denominators, value=-lr)


register_class(
    MSAM,
    name="msam",
    summary="MSAM: Adam with fast+slow momenta mixed per role by gradient stability",
    source="Aardvark 2025, Multi-Scale Adaptive Momentum, short paper",
    state_bytes_per_param=12.0,
    impls=MSAM.impls,
)
