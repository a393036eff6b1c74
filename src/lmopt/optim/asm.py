"""ASM, Attentive Spectral Momentum (Aardvark 2025).

What the paper says (Section 3): "The base optimizer follows m_t = β1 m_{t-1} + (1 - β1) g_t,
v_t = β2 v_{t-1} + (1 - β2) g_t², with bias correction m̂_t = m_t / (1 - β1^t), v̂_t = v_t / (1 - β2^t)."
"For attention query and key matrices: Learning rate: 3.5 × 10⁻⁴ (vs 3 × 10⁻⁴ for others); Momentum: 0.97
(vs 0.95); No weight decay." Nothing else distinguishes it: despite its name, no spectral quantity enters
the update.

So ASM is AdamW with three per-role overrides, and we implement it as exactly that: a subclass of
``torch.optim.AdamW`` (its fused/foreach kernels included; through :class:`lmopt.optim.adamw.AdamW`, which
refuses sparse gradients and complex parameters on every implementation) whose q and k groups get

    lr × 7/6 (3.5e-4 / 3e-4),   β1 = 0.97,   weight decay 0.

Our choices where the text is silent:
- the base β1 is the paper's "0.95" (``betas = (0.95, 0.95)``); β2 is not given, we use 0.95 like our AdamW.
  ``betas`` is an option, so ``betas=(0.9, 0.95)`` gives the reading "same base as AdamW".
- the lr override is a ratio (``qk_lr_scale = 7/6``) so that it follows the schedule and the lr sweep,
  rather than the absolute 3.5e-4.
- ``role_overrides=False`` switches the three overrides off: ASM then is torch AdamW, bit for bit (tested).
- a fused q/k/v matrix (role ``attn_qkv``: GPT-2's ``c_attn``, ``in_proj_weight``) holds v's rows too, and a
  group has one lr: ``fused_qkv="skip"`` (default) leaves it plain AdamW (the paper overrides q and k, not v)
  and warns once; ``fused_qkv="apply"`` gives the whole fused matrix the q/k overrides.

Use on any model: ``ASM(role_param_groups(model, weight_decay), lr=...)``; groups without a ``role`` key
are treated as "other".
"""

from __future__ import annotations

import warnings

from lmopt.optim.adamw import AdamW, impl_flags
from lmopt.optim.spec import OptionError, register_class

QK_ROLES = ("attn_q", "attn_k")
FUSED_QKV = ("skip", "apply")
PAPER_QK_LR_SCALE = 3.5e-4 / 3e-4  # = 7/6
PAPER_QK_BETA1 = 0.97


def asm_groups(groups: list[dict], qk_lr_scale: float, qk_beta1: float, lr: float, betas: tuple,
               fused_qkv: str = "skip") -> list[dict]:
    """Copies of ``groups`` with the paper's overrides on attention q and k groups (and on fused q/k/v groups
    with ``fused_qkv="apply"``)."""
    roles = QK_ROLES + (("attn_qkv",) if fused_qkv == "apply" else ())
    fused = sum(len(g["params"]) for g in groups if g.get("role") == "attn_qkv")
    if fused and fused_qkv == "skip":
        warnings.warn(f"ASM: {fused} fused q/k/v matrices (role attn_qkv) get no q/k override, since they hold v "
                      "as well; pass fused_qkv='apply' to give them the overrides whole", stacklevel=3)
    out = []
    for group in groups:
        group = dict(group)
        if group.get("role") in roles:
            group["lr"] = group.get("lr", lr) * qk_lr_scale
            group["betas"] = (qk_beta1, group.get("betas", betas)[1])
            group["weight_decay"] = 0.0
        out.append(group)
    return out


class ASM(AdamW):
    """ASM (Attentive Spectral Momentum): torch's AdamW with the paper's overrides on attention q and k.

    Groups whose ``role`` is "attn_q" or "attn_k" get lr × ``qk_lr_scale``, β1 = ``qk_beta1`` and no weight decay;
    every other group is plain AdamW.

    Args:
        params: parameters or parameter groups; the overrides need groups with a ``role`` key, as
            ``lmopt.optim.role_param_groups(model, weight_decay)`` makes (a group without one is "other", and a
            plain list of parameters gets no override).
        lr: base learning rate (a group's own ``lr`` replaces it; on q and k it is scaled too).
        betas: base (β1, β2) (the paper's β1 0.95; its β2 is not given, 0.95 like lmopt's AdamW).
        eps: added to the square root of the second moment.
        weight_decay: decoupled weight decay λ (the update subtracts lr·λ·w); 0 on q and k with ``role_overrides``.
        role_overrides: apply the q/k overrides; False makes ASM torch's AdamW exactly.
        qk_lr_scale: the factor on the q and k groups' lr (default 7/6, the paper's 3.5e-4 against 3e-4, as a ratio
            so that it follows the schedule and the lr sweep).
        qk_beta1: β1 of the q and k groups (the paper's 0.97); their β2 stays the base one.
        fused_qkv: what a fused q/k/v matrix (role "attn_qkv") gets: "skip" (plain AdamW, with a warning) or
            "apply" (the q/k overrides on the whole matrix, v's rows included).
        impl: "fused" (torch's fused kernel), "foreach" (multi-tensor) or "for-loop".
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, role_overrides: bool = True, qk_lr_scale: float = PAPER_QK_LR_SCALE,
                 qk_beta1: float = PAPER_QK_BETA1, fused_qkv: str = "skip", impl: str = "fused") -> None:
        if fused_qkv not in FUSED_QKV:
            raise OptionError(f"Invalid fused_qkv {fused_qkv!r}; choose one of {', '.join(FUSED_QKV)}")
        params = list(params)
        if role_overrides and params and isinstance(params[0], dict):
            params = asm_groups(params, qk_lr_scale, qk_beta1, lr, betas, fused_qkv)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl_flags(impl))


register_class(
    ASM,
    name="asm",
    summary="ASM: AdamW with attention q/k overrides (lr x7/6, beta1 0.97, no weight decay)",
    source="Aardvark 2025, Attentive Spectral Momentum, short paper",
    state_bytes_per_param=8.0,
    impls=("fused", "foreach", "for-loop"),
)
