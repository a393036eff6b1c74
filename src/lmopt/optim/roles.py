"""Parameter roles and the parameter groups made from them.

Every parameter gets exactly one role from its module path, by ordered rules (first match wins):

    embedding   input embedding (``embed_tokens``, or any ``nn.Embedding``)
    head        an untied output projection (``lm_head``)
    attn_q/k/v/o    attention projections
    mlp         gate, up and down projections
    norm        every normalisation weight (block norms, the final norm, per-head q/k norms)
    other       anything else (biases, custom parameters)

Optimizers use the roles for weight-decay exclusion, per-role learning-rate scales (the papers' "component
scaling") and for sending hidden matrices to matrix optimizers. Users with other models can pass their own
``rules`` or override :func:`param_role`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

ROLES = ("embedding", "head", "attn_q", "attn_k", "attn_v", "attn_o", "mlp", "norm", "other")
ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o")
HIDDEN_MATRIX_ROLES = (*ATTENTION_ROLES, "mlp")
NO_DECAY_ROLES = ("embedding", "norm", "other")

RoleRules = Sequence[tuple[str, str]]

DEFAULT_RULES: RoleRules = (
    (r"(^|\.)(embed_tokens|wte|tok_embeddings)\.weight$", "embedding"),
    (r"(^|\.)(lm_head|output)\.weight$", "head"),
    (r"norm[^.]*\.weight$|(^|\.)ln_[^.]*\.weight$", "norm"),
    (r"(^|\.)(q_proj|wq)\.weight$", "attn_q"),
    (r"(^|\.)(k_proj|wk)\.weight$", "attn_k"),
    (r"(^|\.)(v_proj|wv)\.weight$", "attn_v"),
    (r"(^|\.)(o_proj|wo|c_proj_attn)\.weight$", "attn_o"),
    (r"(^|\.)(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$", "mlp"),
)


def param_role(name: str, module: nn.Module | None = None, rules: RoleRules = DEFAULT_RULES) -> str:
    """The role of parameter ``name``; ``module`` (its owner) lets type-based fallbacks apply."""
    for pattern, role in rules:
        if re.search(pattern, name):
            return role
    if isinstance(module, nn.Embedding):
        return "embedding"
    if module is not None and "norm" in type(module).__name__.lower():
        return "norm"
    return "other"


def param_roles(
    model: nn.Module, rules: RoleRules = DEFAULT_RULES, role_fn: Callable[..., str] = param_role
) -> dict[str, str]:
    """{parameter name: role} for every trainable parameter (shared parameters appear once)."""
    roles: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            roles.setdefault(full, role_fn(full, module, rules))
    return roles


def role_groups(model: nn.Module, rules: RoleRules = DEFAULT_RULES) -> dict[str, list]:
    """{role: [parameters]} in model order; every trainable parameter lands in exactly one role."""
    named = dict(model.named_parameters())
    groups: dict[str, list] = {}
    for name, role in param_roles(model, rules).items():
        groups.setdefault(role, []).append(named[name])
    return groups


def role_param_groups(model: nn.Module, weight_decay: float, rules: RoleRules = DEFAULT_RULES) -> list[dict]:
    """One parameter group per role, each with keys ``params``, ``role`` and ``weight_decay``.

    Weight decay applies to matrices only: embeddings, norms and 1-D parameters get 0 (a role holding both
    kinds is split in two groups). Any ``torch.optim`` optimizer accepts these groups (it ignores ``role``);
    lmopt's optimizers read ``role`` for their per-role rules.
    """
    groups: list[dict] = []
    for role, params in role_groups(model, rules).items():
        decayed = [p for p in params if role not in NO_DECAY_ROLES and p.dim() >= 2]
        plain = [p for p in params if not (role not in NO_DECAY_ROLES and p.dim() >= 2)]
        if decayed:
            groups.append({"params": decayed, "role": role, "weight_decay": weight_decay})
        if plain:
            groups.append({"params": plain, "role": role, "weight_decay": 0.0})
    return groups
