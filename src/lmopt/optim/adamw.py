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

from lmopt.optim.common import adamw_step_, refuse_sparse_and_complex, torch_step
from lmopt.optim.spec import OptionError, register_class

IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def impl_flags(impl: str) -> dict:
    if impl not in IMPLEMENTATIONS:
        raise OptionError(f"Invalid impl: {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return {"fused": impl == "fused" or None, "foreach": impl == "foreach"}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with lmopt's defaults, refusing sparse gradients and complex parameters on every
    implementation.

    Args:
        params: parameters or parameter groups (``lmopt.optim.role_param_groups(model, weight_decay)`` gives
            weight decay to matrices only).
        lr: peak learning rate.
        betas: (β1, β2) of the first and second moments.
        eps: added to the square root of the second moment.
        weight_decay: decoupled weight decay λ (the update subtracts lr·λ·w).
        impl: "fused" (torch's fused kernel), "foreach" (multi-tensor) or "for-loop".
        **torch_options: any other ``torch.optim.AdamW`` argument (``amsgrad``, ``maximize``...); ``fused`` or
            ``foreach`` given here override ``impl``.
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, impl: str = "fused", **torch_options) -> None:
        flags = impl_flags(impl) if not {"fused", "foreach"} & set(torch_options) else {}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags, **torch_options)

    @torch.no_grad()
    def step(self, closure=None):
        """torch's step; fp16 parameters take lmopt's AdamW with fp32 moments instead (torch keeps them in fp16,
        where most squared gradients underflow to 0: lmopt.optim.common.state_dtype). Same state layout."""
        half = {p: p.grad for group in self.param_groups for p in group["params"]
                if p.dtype == torch.float16 and p.grad is not None}
        if not half:
            return torch_step(torch.optim.AdamW, self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in half:
            p.grad = None  # hidden from torch's step
        try:
            torch_step(torch.optim.AdamW, self)
        finally:
            for p, grad in half.items():
                p.grad = grad
        for group in self.param_groups:
            params = [p for p in group["params"] if p in half]
            if params:
                if group["amsgrad"] or group["maximize"]:
                    raise NotImplementedError("AdamW on fp16 parameters supports neither amsgrad nor maximize")
                refuse_sparse_and_complex(type(self).__name__, params)
                adamw_step_(params, [self.state[p] for p in params], group["lr"], group["betas"], group["eps"],
                            group["weight_decay"])
        return loss

    def _init_group(self, group, *args, **kwargs):
        # torch's step calls this once per group, after the closure and before it updates the group
        refuse_sparse_and_complex(type(self).__name__, group["params"])
        return super()._init_group(group, *args, **kwargs)


ADAMW = register_class(
    AdamW,
    name="adamw",
    summary="AdamW (torch.optim.AdamW): Adam with decoupled weight decay",
    source="Loshchilov & Hutter 2019, arXiv:1711.05101",
    state_bytes_per_param=8.0,
    impls=IMPLEMENTATIONS,
)
