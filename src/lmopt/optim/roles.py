"""Parameter roles and the parameter groups made from them.

Every trainable parameter gets exactly one role, from the model's structure (names are only hints):

    embedding   the weight of an ``nn.Embedding`` (a head tied to it shares its role and appears once)
    head        an untied output projection: a linear layer whose output size is the vocabulary
    attn_q/k/v/o    attention projections inside an attention module (told apart by name hints: q_proj, wq,
                query, ...), ``attn_qkv`` for a fused or unrecognised one (c_attn, in_proj_weight, Wqkv)
    mlp         every other hidden matrix of a linear or conv-like layer (gate/up/down, c_fc, linear1, ...)
    norm        every normalisation weight and bias (LayerNorm, RMSNorm, q/k norms: any module whose class
                name contains "norm")
    other       anything else: biases, scalars, custom parameters

Optimizers use the roles for weight-decay exclusion, per-role learning-rate scales (the papers' "component
scaling") and for sending hidden matrices to matrix optimizers. ``rules`` (regex on the parameter name, first
match wins) override the structure for models it reads wrongly; :func:`split_table` shows the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

ROLES = ("embedding", "head", "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp", "norm", "other")
ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv")
HIDDEN_MATRIX_ROLES = (*ATTENTION_ROLES, "mlp")
NO_DECAY_ROLES = ("embedding", "norm", "other")

RoleRules = Sequence[tuple[str, str]]

# Name rules (the override mechanism, and what :func:`param_role` applies to one name).
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

# Name hints inside an attention module: the owner module's own name -> sub-role.
ATTENTION_HINTS = (
    (r"^(q|q_proj|wq|query|to_q|q_lin)$", "attn_q"),
    (r"^(k|k_proj|wk|key|to_k|k_lin)$", "attn_k"),
    (r"^(v|v_proj|wv|value|to_v|v_lin)$", "attn_v"),
    (r"^(o|o_proj|out_proj|wo|c_proj|dense|proj|to_out|out_lin|output)$", "attn_o"),
)
_ATTENTION_NAMES = re.compile(r"attn|attention", re.IGNORECASE)
_LINEAR_LIKE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def param_role(name: str, module: nn.Module | None = None, rules: RoleRules = DEFAULT_RULES) -> str:
    """The role of one parameter from its name (``rules``) and its owner's type alone (no model structure)."""
    for pattern, role in rules:
        if re.search(pattern, name):
            return role
    if isinstance(module, nn.Embedding):
        return "embedding"
    if module is not None and _is_norm(module):
        return "norm"
    return "other"


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, _LINEAR_LIKE) or type(module).__name__ in ("Conv1D", "LoRACompatibleLinear")


def _output_size(module: nn.Module, param) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and param.dim() == 2:  # HF GPT-2 style: weight is (in, out)
        return param.shape[1]
    return None


def _in_attention(path: str, modules: dict[str, nn.Module]) -> bool:
    parts = path.split(".") if path else []
    for i in range(len(parts)):  # the owner's ancestors, not the owner itself
        ancestor = ".".join(parts[:i])
        module = modules.get(ancestor)
        if isinstance(module, nn.MultiheadAttention) or (module is not None and i > 0 and (
                _ATTENTION_NAMES.search(type(module).__name__) or _ATTENTION_NAMES.search(parts[i - 1]))):
            return True
    return False


def _attention_role(owner_name: str, param_name: str) -> str:
    if param_name == "in_proj_weight":  # nn.MultiheadAttention's fused q, k, v
        return "attn_qkv"
    for pattern, role in ATTENTION_HINTS:
        if re.match(pattern, owner_name, re.IGNORECASE):
            return role
    return "attn_qkv"


def _structural_role(path: str, pname: str, module: nn.Module, param, modules: dict, vocab: set[int],
                     tied_to_embedding: bool) -> str:
    if isinstance(module, nn.Embedding) or tied_to_embedding:
        return "embedding"
    if _is_norm(module):
        return "norm"
    if param.dim() < 2:
        return "other"
    if isinstance(module, nn.MultiheadAttention):
        return "attn_qkv" if pname == "in_proj_weight" else "attn_o"
    if not _is_linear_like(module):
        return "other"
    if _output_size(module, param) in vocab and not _in_attention(path, modules):
        return "head"
    if _in_attention(path, modules):
        return _attention_role(path.rsplit(".", 1)[-1], pname)
    return "mlp"


def param_roles(model: nn.Module, rules: RoleRules | None = None,
                role_fn: Callable[..., str] | None = None) -> dict[str, str]:
    """{parameter name: role} for every trainable parameter; a shared (tied) parameter appears once, under the
    first name ``model.named_parameters()`` gives it. ``rules`` are tried first (an override), then the
    structure decides; ``role_fn(name, module, rules)`` replaces the whole decision when given."""
    modules = dict(model.named_modules())
    embeddings = [m for m in modules.values() if isinstance(m, nn.Embedding)]
    # the vocabulary: the largest embedding table (a position embedding is smaller than the token one)
    vocab = {max(m.num_embeddings for m in embeddings)} if embeddings else set()
    embedding_ids = {id(m.weight) for m in embeddings}
    canonical = {}
    for name, param in model.named_parameters():
        canonical.setdefault(id(param), name)
    roles: dict[str, str] = {}
    for path, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            name = canonical.get(id(param))
            if not param.requires_grad or name is None or name in roles:
                continue
            full = f"{path}.{pname}" if path else pname
            roles[name] = _role(full, path, pname, module, param, modules, vocab, id(param) in embedding_ids,
                                rules, role_fn)
    return roles


def _role(full, path, pname, module, param, modules, vocab, tied, rules, role_fn) -> str:
    if role_fn is not None:
        return role_fn(full, module, rules if rules is not None else DEFAULT_RULES)
    for pattern, role in rules or ():
        if re.search(pattern, full):
            return role
    return _structural_role(path, pname, module, param, modules, vocab, tied)


def role_groups(model: nn.Module, rules: RoleRules | None = None) -> dict[str, list]:
    """{role: [parameters]} in model order; every trainable parameter lands in exactly one role."""
    named = dict(model.named_parameters())
    groups: dict[str, list] = {}
    for name, role in param_roles(model, rules).items():
        groups.setdefault(role, []).append(named[name])
    return groups


def role_param_groups(model: nn.Module, weight_decay: float, rules: RoleRules | None = None) -> list[dict]:
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
