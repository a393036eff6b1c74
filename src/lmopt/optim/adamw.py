"""AdamW, torch's own (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019).

    m_t = b1 m + (1 - b1) g,   v_t = b2 v + (1 - b2) g^2
    w  <- w (1 - lr wd) - lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

Groups: weight decay on matrices (attention, MLP, untied head), none on embeddings, norms and 1-D parameters.
``impl``: "fused" (torch's fused kernel, CPU and CUDA), "foreach" (multi-tensor) or "for-loop".

:class:`AdamW` is ``torch.optim.AdamW`` with one guard: sparse gradients and complex parameters are refused with
the same message on every implementation (torch's for-loop and foreach paths would step a complex tensor as
pairs of reals, and its fused path refuses it with a message about floating-point dtypes).
"""

from __future__ import annotations

import torch
from torch import nn

from lmopt.optim.common import refuse_sparse_and_complex
from lmopt.optim.roles import role_param_groups
from lmopt.optim.spec import OptimizerSpec, OptionError, register

IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def impl_flags(impl: str) -> dict:
    if impl not in IMPLEMENTATIONS:
        raise OptionError(f"Invalid impl: {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return {"fused": impl == "fused" or None, "foreach": impl == "foreach"}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, refusing sparse gradients and complex parameters on every implementation."""

    def _init_group(self, group, *args, **kwargs):
        # torch's step calls this once per group, after the closure and before it updates the group
        refuse_sparse_and_complex(type(self).__name__, group["params"])
        return super()._init_group(group, *args, **kwargs)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float,
                impl: str) -> torch.optim.AdamW:
    return AdamW(role_param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **impl_flags(impl))


ADAMW = register(OptimizerSpec(
    name="adamw",
    summary="AdamW (torch.optim.AdamW): Adam with decoupled weight decay",
    source="Loshchilov & Hutter 2019, arXiv:1711.05101",
    builder=build_adamw,
    defaults={"betas": (0.9, 0.95), "eps": 1e-8, "impl": "fused"},
    default_lr=5e-3,
    default_weight_decay=0.1,
    state_bytes_per_param=8.0,
    impls=("fused", "foreach", "for-loop"),
))
