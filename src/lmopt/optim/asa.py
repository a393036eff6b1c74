"""ASA, Attentive Spectral Adam (Aardvark 2025).

What the paper says (Section 3, Eq. 1): "θ_t = θ_{t-1} − η_t · (1 + λσ) · m̂_t / (√v̂_t + ε), where σ is the
estimated spectral norm of the parameter matrix. For attention layers, we compute this using power iteration
during the optimization step." Also: "Layer-specific learning rates (attention: +20%, embeddings: -20%)",
"Gradient clipping (max norm 1.0)", and that ASA "modifies the standard AdamW update rule". No value of λ, no
number of power iterations, no weight-decay rule.

The update, per tensor, with η_role = role_scale · η:

    m, v: Adam's moments with bias correction (betas (0.9, 0.95))
    s = 1 + λ σ(W)   for attention q/k/v/o matrices (σ by power iteration), else s = 1
    W <- W (1 - η_role λ_wd) - η_role · s · m̂ / (√v̂ + ε)

Our choices where the text is silent:
- "modifies the standard AdamW update rule": AdamW's decoupled weight decay, on matrices. AdamW decays by
  η_t λ_wd θ with the step's own learning rate, and the paper's "layer-specific learning rates" are that
  learning rate: so a layer stepped with η_role also decays with η_role (the attention matrices with 1.2 η),
  exactly what ``torch.optim.AdamW`` does with a per-group lr. The spectral factor s multiplies the Adam
  direction only, as in Eq. 1. (Until issue 20 the decay used the base η; tested in tests/optim/test_papers.py.)
- σ is the spectral norm of the *parameter* W (as written), estimated by one power iteration per step from
  the previous step's right singular vector (``power_iters = 1``, cached in the state as ``power_vector``;
  the first step starts from a seeded random vector and runs ``init_power_iters = 10``). On FSDP2 shards
  the vector is a replicated DTensor, so a step communicates two vectors, never the matrix.
- λ (``spectral_scale``) defaults to 0.1. σ at lmopt's initialisation (seed 0; mean over layers of q / k / v / o):
  qwen3-134m 1.08 / 0.90 / 0.90 / 0.22, tiny 0.63 / 0.54 / 0.54 / 0.22, nano 0.45 / 0.38 / 0.38 / 0.23. So at
  the papers' 134M model λ = 0.1 makes q/k/v steps 9-11% larger and o steps 2% larger on top of the role
  scale (5-6% on tiny, 4-5% on nano), and σ moves as the weights train. Measured with
  ``python -c "import torch; from lmopt.model import Qwen3, get_preset; m = Qwen3(get_preset('qwen3-134m').config);
  m.init_weights(0); print({r: round(sum(torch.linalg.matrix_norm(getattr(l.self_attn, r + '_proj').weight.detach(),
  ord=2).item() for l in m.layers) / len(m.layers), 2) for r in 'qkvo'})"`` (and the same for ``tiny``, ``nano``).
  λ = 0 with ``role_lr_scales`` off is AdamW.
- role lr scales: attention ×1.2, embedding ×0.8 (head, MLP, norms ×1). Gradient clipping is the trainer's
  (default 1.0, as the paper).
"""

from __future__ import annotations

import torch

from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.distributed import replicate_like, replicated
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import (
    AdamFamily,
    adam_denominators,
    adam_direction,
    adam_moments_,
    adam_moments_foreach_,
    add_scaled_,
    bias_corrections,
    foreach_buckets,
)
from lmopt.optim.kernels import power_iteration_sigma
from lmopt.optim.roles import ATTENTION_ROLES
from lmopt.optim.spec import OptionError, register_class

PAPER_ROLE_LR_SCALES = {**{role: 1.2 for role in ATTENTION_ROLES}, "embedding": 0.8}  # every attention matrix


class ASA(AdamFamily):
    """ASA (Attentive Spectral Adam): AdamW whose attention steps are scaled by 1 + λ σ(W), with role lr scales.

    σ(W) is the spectral norm of the attention matrix W, by power iteration warm-started from the previous step's
    right singular vector (kept in the state as ``power_vector``).

    Args:
        params: parameters or parameter groups; the role rules read each group's ``role`` key, as
            ``lmopt.optim.role_param_groups(model, weight_decay)`` makes (a group without one is "other").
        lr: base learning rate (>= 0); a group's step and its weight decay use lr × its role scale.
        betas: (β1, β2) of the first and second moments, each in [0, 1).
        eps: added to the square root of the bias-corrected second moment (> 0).
        weight_decay: decoupled weight decay λ_wd (>= 0), with the role-scaled lr.
        spectral_scale: λ (>= 0) of the factor 1 + λ σ(W), applied to the Adam direction of 2-D attention matrices
            (roles "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"); 0 switches it off.
        power_iters: power iterations per step (>= 1).
        init_power_iters: power iterations in all at the first step, from a seeded random vector
            (>= ``power_iters``).
        role_lr_scales: scale the lr by role: attention ×1.2, embedding ×0.8, every other role ×1 (the paper's
            +20% / -20%). With ``spectral_scale=0`` and this False, ASA is AdamW.
        seed: the seed of the first step's random vectors (combined with each matrix's shape).
        impl: "for-loop" (tensor by tensor), "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop") or "foreach" (Adam's part in multi-tensor
            calls, a few kernels for all tensors on a GPU; the power iterations per attention matrix, their factors
            brought to the host once per group; mixed dtypes and DTensor shards run "for-loop").
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, spectral_scale: float = 0.1, power_iters: int = 1,
                 init_power_iters: int = 10, role_lr_scales: bool = True, seed: int = 0,
                 impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if spectral_scale < 0:
            raise OptionError(f"Invalid spectral_scale: {spectral_scale}")
        if power_iters < 1 or init_power_iters < power_iters:
            raise OptionError("Invalid power_iters: need 1 <= power_iters <= init_power_iters")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      spectral_scale=spectral_scale, power_iters=power_iters,
                                      init_power_iters=init_power_iters, role_lr_scales=role_lr_scales, seed=seed),
                         impl)

    @staticmethod
    def is_spectral(p: torch.Tensor, group: dict) -> bool:
        return group.get("role", "other") in ATTENTION_ROLES and group["spectral_scale"] > 0 and p.dim() == 2

    constant_keys = ("spectral_scale", "power_iters")
    impls = (*ELEMENTWISE_IMPLS, "foreach")

    def foreach_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        """impl "foreach": :func:`asa_foreach_step` per set of tensors sharing dtype, device, group and step."""
        buckets, taken = foreach_buckets(params, grads, tensors, scalars, constants, buffers=2)
        for chosen in buckets:
            asa_foreach_step(*([x[i] for i in chosen] for x in (params, grads)),
                             *([tensors[i][j] for i in chosen] for j in range(2)),
                             [tensors[i][2] if len(tensors[i]) == 3 else None for i in chosen], scalars[chosen[0]],
                             constants[chosen[0]])
        return taken

    def init_state(self, p, state, group):
        super().init_state(p, state, group)
        if self.is_spectral(p, group):
            # A seeded start, refined so that with the step's own iterations the first step runs init_power_iters.
            gen = torch.Generator().manual_seed(group["seed"] + p.shape[0] * 7919 + p.shape[1])
            v = torch.randn(p.shape[1], generator=gen)
            v = replicate_like((v / v.norm()).to(p.device), p)
            extra = group["init_power_iters"] - group["power_iters"]
            if extra:
                v = replicated(power_iteration_sigma(p, v, extra)[1])
            state["power_vector"] = v

    def tensors(self, p, state, group):
        return super().tensors(p, state, group) + ([state["power_vector"]] if "power_vector" in state else [])

    def scalars(self, group, state):
        role_scale = PAPER_ROLE_LR_SCALES.get(group.get("role", "other"), 1.0) if group["role_lr_scales"] else 1.0
        return group["lr"] * role_scale, *bias_corrections(group["betas"], state["step"])

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq = tensors[:2]
        role_lr, bias1, bias2 = scalars  # role_lr = η_role, the lr of the step and of the decay
        adam_moments_(exp_avg, exp_avg_sq, grad, c["betas"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        if len(tensors) == 3:  # an attention matrix: scale by 1 + λ σ(W), σ by warm-started power iteration
            sigma, v = power_iteration_sigma(p, tensors[2], c["power_iters"])
            tensors[2].copy_(replicated(v))  # on shards Wᵀ(Wv) arrives as a pending sum: reduce it once
            direction.mul_(1 + c["spectral_scale"] * sigma)
        decoupled_weight_decay_(p, role_lr, c["weight_decay"])
        add_scaled_(p, direction, -role_lr)


def asa_foreach_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                     exp_avg_sqs: list[torch.Tensor], power_vectors: list[torch.Tensor | None],
                     scalars: tuple[float, ...], c: dict) -> None:
    """One ASA step of tensors sharing dtype, device, hyper-parameters and step: the moments in multi-tensor calls,
    σ(W) by power iteration for each tensor with a ``power_vector`` (before the step, as ``update``), then
    W <- W (1 - η_role λ_wd) - η_role (1 + λ σ) m̂ / (√v̂ + ε) in one ``addcdiv`` (the factors copied to the host
    once)."""
    role_lr, bias1, bias2 = scalars
    adam_moments_foreach_(exp_avgs, exp_avg_sqs, grads, c["betas"])
    sigmas = []
    for p, vector in zip(params, power_vectors, strict=True):
        if vector is None:
            sigmas.append(torch.zeros((), dtype=torch.float64, device=p.device))
            continue
        sigma, v = power_iteration_sigma(p, vector, c["power_iters"])
        vector.copy_(v)
        sigmas.append(sigma.double())
    factors = (1 + c["spectral_scale"] * torch.stack(sigmas)).tolist()
    denominators = adam_denominators(exp_avg_sqs, bias2, c["eps"])
    if c["weight_decay"]:
        torch._foreach_mul_(params, 1 - role_lr * c["weight_decay"])
    torch._foreach_addcdiv_(params, exp_avgs, denominators, [-role_lr * factor / bias1 for factor in factors])


register_class(
    ASA,
    name="asa",
    summary="ASA: AdamW whose attention steps are scaled by (1 + λ·spectral norm), role lr scales",
    source="Aardvark 2025, Attentive Spectral Adam, short paper",
    state_bytes_per_param=8.0,  # plus one vector per attention matrix
    impls=ASA.impls,
)
