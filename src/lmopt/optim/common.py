"""Pieces every lmopt optimizer shares: the ``step`` skeleton, gradient checks, Adam's moments.

The update math lives in pure functions (tensors in, update out) so tests can call them directly; each
optimizer class only keeps state and applies updates, in the shape of ``torch.optim``:
``@torch.no_grad() step(closure)``, lazy state, decoupled weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as torch_adam

from lmopt.optim.distributed import is_dtensor
from lmopt.optim.spec import OptionError


def check_betas(betas: Iterable[float], name: str = "betas") -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise OptionError(f"Invalid {name}[{i}]: {beta} (must lie in [0, 1))")


def check_common(lr: float, eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise OptionError(f"Invalid learning rate: {lr}")
    if eps <= 0:
        raise OptionError(f"Invalid epsilon value: {eps}")
    if weight_decay < 0:
        raise OptionError(f"Invalid weight_decay value: {weight_decay}")


def refuse_sparse_and_complex(owner: str, params: Iterable[Tensor]) -> None:
    """Raise a clear error if one of ``params`` that has a gradient is complex or has a sparse gradient.

    None of lmopt's updates is defined for them (torch's own for-loop and foreach AdamW would treat a complex
    tensor as pairs of reals, a reading no paper here gives). ``owner`` names the optimizer in the message."""
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{owner} does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        if torch.is_complex(p) or torch.is_complex(p.grad):
            raise RuntimeError(f"{owner} does not support complex parameters (got {p.dtype}, shape {tuple(p.shape)})")


class LmoptOptimizer(Optimizer):
    """Base class: the closure handling and gradient checks of every lmopt optimizer.

    Subclasses implement ``_step_group(group)``, or ``_step_groups()`` to step all groups at once.
    """

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles (and deep-copies) only defaults, state and param_groups; the implementation
        # choice goes along, or a copy would fail on its first step
        state = super().__getstate__()
        if "impl" in self.__dict__:
            state["impl"] = self.impl
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups()
        return loss

    def _step_groups(self) -> None:
        for group in self.param_groups:
            self._step_group(group)

    def _step_group(self, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def params_with_grad(self, group: dict) -> list[Tensor]:
        """The group's parameters that have a gradient, after checking it is dense and real."""
        refuse_sparse_and_complex(type(self).__name__, group["params"])
        return [p for p in group["params"] if p.grad is not None]


def decoupled_weight_decay_(p: Tensor, lr: float, weight_decay: float) -> None:
    """p <- p (1 - lr wd), as AdamW (Loshchilov & Hutter 2019)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)


def torch_step(torch_class: type[Optimizer], optimizer: Optimizer, closure=None):
    """``torch_class.step`` on ``optimizer`` without the hook wrapper torch puts on a class's ``step`` once an
    instance of it exists: a subclass overriding ``step`` is wrapped already, and calling the wrapped parent
    would run every step hook twice."""
    step = torch_class.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step(optimizer, closure)


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of an Adam-type moment of ``p``: fp32 for fp16 parameters, whose squared gradients underflow
    fp16 (g² < 6e-8, the smallest fp16 subnormal, is most of a model's entries) and where eps = 1e-8 rounds to 0;
    the parameter's own dtype otherwise (bf16 has fp32's exponent range)."""
    return torch.float32 if p.dtype == torch.float16 else p.dtype


def working_copy(p: Tensor) -> Tensor:
    """What an update computes on: an fp32 copy of an fp16 parameter (written back once), else ``p`` itself."""
    return p.float() if p.dtype == torch.float16 else p


def adamw_step_(params: list[Tensor], states: list[dict], lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> None:
    """One AdamW step on ``params`` by torch's own kernel (fused on plain tensors, its for-loop on DTensor
    shards), with torch's state layout (``step``, ``exp_avg``, ``exp_avg_sq``): the path of the parameters a
    matrix optimizer does not own (embeddings, head, norms), often half of a small model's weights. fp16
    parameters keep fp32 moments and are updated through an fp32 copy (:func:`state_dtype`)."""
    fused = not any(is_dtensor(p) for p in params)
    for p, state in zip(params, states, strict=True):
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
    work = [working_copy(p) for p in params]
    grads = [p.grad if w is p else p.grad.float() for p, w in zip(params, work, strict=True)]
    torch_adam(work, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
               [], [s["step"] for s in states], foreach=False, fused=fused, decoupled_weight_decay=True,
               amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps,
               maximize=False)
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)
