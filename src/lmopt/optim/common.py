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


def check_betas(betas: Iterable[float], name: str = "betas") -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid {name}[{i}]: {beta} (must lie in [0, 1))")


def check_common(lr: float, eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps <= 0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class LmoptOptimizer(Optimizer):
    """Base class: the closure handling and gradient checks of every lmopt optimizer.

    Subclasses implement ``_step_group(group)``.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def params_with_grad(self, group: dict) -> list[Tensor]:
        """The group's parameters that have a gradient, after checking it is dense and real."""
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            params.append(p)
        return params


def decoupled_weight_decay_(p: Tensor, lr: float, weight_decay: float) -> None:
    """p <- p (1 - lr wd), as AdamW (Loshchilov & Hutter 2019)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)


def adam_moments_(state: dict, grad: Tensor, beta1: float, beta2: float) -> int:
    """Update (lazily create) ``exp_avg`` and ``exp_avg_sq`` in ``state``; returns the new step count."""
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return state["step"]


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """m̂ / (√v̂ + ε) with Adam's bias corrections m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t)."""
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    return (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(eps))


def adamw_step_(p: Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> None:
    """One AdamW step on one tensor (the fallback for parameters a matrix optimizer does not own)."""
    step = adam_moments_(state, p.grad, *betas)
    decoupled_weight_decay_(p, lr, weight_decay)
    p.add_(adam_direction(state["exp_avg"], state["exp_avg_sq"], step, *betas, eps), alpha=-lr)
