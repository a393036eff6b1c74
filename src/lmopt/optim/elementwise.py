"""Per-tensor optimizers and their compiled path.

An optimizer whose update of a tensor reads only that tensor, its gradient and its own state (LAMB,
StableAdamW, ASA, MSAM, AMCS, OrthoAdam) is written here as a few small pieces:

- ``buffers``: the names of its state tensors shaped like ``p`` (created as zeros, passed to ``update``
  first); ``init_state`` and ``tensors`` extend that where an optimizer keeps more (seeds, caches);
- ``scalars(group, state)``: the numbers that change from step to step (lr, bias corrections), as floats;
- ``update(p, grad, tensors, scalars, constants)``: one tensor's update, in place, a pure function of its
  arguments (a ``staticmethod``). ``constants`` are the group's fixed hyper-parameters.

``impl="for-loop"`` runs ``update`` tensor by tensor, as written. ``impl="foreach"`` (where an optimizer defines
``foreach_updates``) runs the same arithmetic as a few multi-tensor ``torch._foreach_*`` calls per set of tensors
that share a device, dtype and hyper-parameters (:func:`foreach_buckets`): on a GPU a handful of kernels for the
whole model instead of several per tensor; per-tensor numbers (norms, clips) come back to the host once per set.
``impl="compiled"`` runs the loop over *every*
tensor of the step as one ``torch.compile``'d function: the per-step numbers travel as one tensor (so a new
lr or step count never recompiles), and Inductor fuses each tensor's elementwise chain into one kernel (C++
on CPU, Triton on GPU), without a host sync. The compiled code is cached per optimizer class and parameter
layout (in the process, and on disk by Inductor's own cache); the first step pays the compilation. Where
``torch.compile`` cannot run (no C++ compiler, an unsupported platform) the optimizer says why once and
falls back to eager; FSDP2-sharded (DTensor) parameters always take the eager path.

The state layout is the same for both paths (``step`` is a Python int per tensor), so a checkpoint written
with one loads into the other.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lmopt.optim import cpu_kernels
from lmopt.optim.common import LmoptOptimizer, state_dtype, working_copy
from lmopt.optim.distributed import is_dtensor
from lmopt.optim.spec import OptionError

IMPLS = ("for-loop", "compiled")
RECOMPILE_LIMIT = 64  # compiled layouts (optimizer class x parameter shapes) per process before falling back

Update = Callable[[Tensor, Tensor, Sequence[Tensor], Sequence, dict], None]


def check_impl(impl: str, impls: Sequence[str] = IMPLS) -> None:
    if impl not in impls:
        raise OptionError(f"Invalid impl: {impl!r}; choose one of {', '.join(impls)}")


def bias_corrections(betas: Sequence[float], step: int) -> tuple[float, ...]:
    """1 - β^t for each β: the divisors of Adam-style bias-corrected moments."""
    return tuple(1 - beta**step for beta in betas)


def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, betas: Sequence[float]) -> None:
    """m <- β1 m + (1 - β1) g,  v <- β2 v + (1 - β2) g², in place (Adam's moments, as torch writes them)."""
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, bias1: float | Tensor, bias2: float | Tensor,
                   eps: float) -> Tensor:
    """Adam's direction m̂ / (√v̂ + ε) with m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t): a fresh tensor."""
    return (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt_().add_(eps))


def add_scaled_(p: Tensor, x: Tensor, alpha: float | Tensor) -> Tensor:
    """p += alpha x, for a float alpha (eager: one kernel) or a 0-d tensor alpha (compiled path)."""
    if isinstance(alpha, Tensor):
        return p.add_(x * alpha)
    return p.add_(x, alpha=alpha)


@functools.cache
def _compiled_loop(update: Update) -> Callable:
    def loop(params: list[Tensor], grads: list[Tensor], tensors: list[list[Tensor]], table: Tensor,
             constants: list[dict]) -> None:
        for i, (p, grad, ts, const) in enumerate(zip(params, grads, tensors, constants, strict=True)):
            update(p, grad, ts, table[i], const)

    return torch.compile(loop, dynamic=False, fullgraph=True)


class ElementwiseOptimizer(LmoptOptimizer):
    """Base class of the per-tensor optimizers (see the module docstring)."""

    impls: tuple[str, ...] = IMPLS  # a subclass with ``fused_update`` (or ``fused_updates``) adds "fused"

    def __init__(self, params, defaults: dict, impl: str = "for-loop") -> None:
        check_impl(impl, self.impls)
        super().__init__(params, defaults)
        self.impl = impl

    buffers: tuple[str, ...] = ()  # the state tensors shaped like the parameter, passed to ``update`` first

    # -- the pieces a subclass defines (state and tensors default to zero ``buffers``) -------------------------
    def init_state(self, p: Tensor, state: dict, group: dict) -> None:
        for key in self.buffers:
            state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)

    def tensors(self, p: Tensor, state: dict, group: dict) -> list[Tensor]:
        return [state[key] for key in self.buffers]

    def scalars(self, group: dict, state: dict) -> tuple[float, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def constants(self, group: dict) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    update: Update

    # -- the step: every group's tensors in one pass -----------------------------------------------------------
    def _step_groups(self) -> None:
        """Every tensor's update; an fp16 parameter is updated through an fp32 copy with fp32 state
        (lmopt.optim.common.state_dtype), rounded into the parameter once at the end."""
        params, work, grads, tensors, scalars, constants = [], [], [], [], [], []
        # every gradient is checked before any state changes, so a refused step leaves the optimizer as it was
        with_grad = [self.params_with_grad(group) for group in self.param_groups]
        for group, group_params in zip(self.param_groups, with_grad, strict=True):
            group_constants = self.constants(group)
            for p in group_params:
                w = working_copy(p)
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    self.init_state(w, state, group)
                state["step"] += 1
                params.append(p)
                work.append(w)
                grads.append(p.grad if w is p else p.grad.float())
                tensors.append(self.tensors(w, state, group))
                scalars.append(self.scalars(group, state))
                constants.append(group_constants)
        if not params:
            return
        compiled = self.impl == "compiled" and not any(is_dtensor(p) for p in params)
        if not (compiled and self._run_compiled(work, tensors, scalars, constants, grads)):
            if self.impl == "fused":
                done = self.fused_updates(work, grads, tensors, scalars, constants)
            elif self.impl == "foreach":
                done = self.foreach_updates(work, grads, tensors, scalars, constants)
            else:
                done = [False] * len(work)
            for w, g, ts, s, c, updated in zip(work, grads, tensors, scalars, constants, done, strict=True):
                if not updated:
                    self.update(w, g, ts, s, c)
        for p, w in zip(params, work, strict=True):
            if w is not p:
                p.copy_(w)

    def fused_updates(self, params: list[Tensor], grads: list[Tensor], tensors: list[list[Tensor]],
                      scalars: list[tuple[float, ...]], constants: list[dict]) -> list[bool]:
        """impl "fused": update what the C++ kernels take, saying which tensors they updated (the others then run
        ``update``); by default tensor by tensor through the subclass's ``fused_update``."""
        return [self.fused_update(*args) for args in zip(params, grads, tensors, scalars, constants, strict=True)]

    def foreach_updates(self, params: list[Tensor], grads: list[Tensor], tensors: list[list[Tensor]],
                        scalars: list[tuple[float, ...]], constants: list[dict]) -> list[bool]:
        """impl "foreach" (a subclass that lists it in ``impls`` defines this): update what the multi-tensor calls
        take, saying which tensors they updated (the others then run ``update``)."""
        raise NotImplementedError  # pragma: no cover - only subclasses that declare "foreach" are asked

    def _run_compiled(self, params, tensors, scalars, constants, grads=None) -> bool:
        return run_compiled(self, type(self).update, params, tensors, scalars, constants, grads=grads)


class AdamFamily(ElementwiseOptimizer):
    """An element-wise optimizer built on Adam's two moments: state ``exp_avg``, ``exp_avg_sq``; per-step
    numbers (lr, 1 - β1^t, 1 - β2^t); constants ``betas``, ``eps``, ``weight_decay`` and ``constant_keys``."""

    buffers = ("exp_avg", "exp_avg_sq")
    constant_keys: tuple[str, ...] = ()

    def scalars(self, group: dict, state: dict) -> tuple[float, ...]:
        return (group["lr"], *bias_corrections(group["betas"], state["step"]))

    def constants(self, group: dict) -> dict[str, Any]:
        return {k: group[k] for k in ("betas", "eps", "weight_decay", *self.constant_keys)}


def foreach_buckets(params: list[Tensor], grads: list[Tensor], tensors: list[list[Tensor]],
                    scalars: list[tuple[float, ...]], constants: list[dict],
                    takes: Callable[[int], bool] = lambda i: True,
                    buffers: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """The tensors one set of multi-tensor calls can update together: the same device and dtype (the parameter,
    its gradient and its first ``buffers`` state tensors alike, all of them by default), the same group
    (``constants``) and per-step numbers; and which tensors are taken at all (``takes`` of their index; never
    DTensor shards, whose per-tensor norms are reductions over ranks, nor mixed dtypes). Returns (index lists,
    taken flags)."""
    buckets: dict[tuple, list[int]] = {}
    taken = []
    for i, (p, g, ts) in enumerate(zip(params, grads, tensors, strict=True)):
        ok = (takes(i) and not is_dtensor(p) and g.dtype == p.dtype and g.device == p.device
              and all(t.dtype == p.dtype and t.device == p.device for t in ts[:buffers]))
        taken.append(ok)
        if ok:
            buckets.setdefault((p.device, p.dtype, id(constants[i]), scalars[i]), []).append(i)
    return list(buckets.values()), taken


def foreach_in_buckets(step: Callable[..., None], buffers: int, params: list[Tensor], grads: list[Tensor],
                       tensors: list[list[Tensor]], scalars: list[tuple[float, ...]], constants: list[dict],
                       takes: Callable[[int], bool] = lambda i: True) -> list[bool]:
    """``step(params, grads, *the first ``buffers`` state lists, scalars, constants)`` once per set of
    :func:`foreach_buckets`; returns which tensors were taken (the others run ``update``)."""
    buckets, taken = foreach_buckets(params, grads, tensors, scalars, constants, takes=takes, buffers=buffers)
    for chosen in buckets:
        step(*([x[i] for i in chosen] for x in (params, grads)),
             *([tensors[i][j] for i in chosen] for j in range(buffers)), scalars[chosen[0]], constants[chosen[0]])
    return taken


def adam_moments_foreach_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor],
                          betas: Sequence[float]) -> None:
    """:func:`adam_moments_` over lists, in three multi-tensor calls."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - betas[0])
    torch._foreach_mul_(exp_avg_sqs, betas[1])
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - betas[1])


def adam_denominators(exp_avg_sqs: list[Tensor], bias2: float, eps: float) -> list[Tensor]:
    """√v̂ + ε per tensor (fresh tensors), v̂ = v / (1 - β2^t)."""
    denominators = torch._foreach_div(exp_avg_sqs, bias2)
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, eps)
    return denominators


def fused_adam_family(params: list[Tensor], grads: list[Tensor], tensors: list[list[Tensor]],
                      ) -> tuple[Any, list[bool]]:
    """The C++ kernels (None where they cannot be built) and which tensors they take: fp32/fp64 CPU tensors
    whose gradient and two moments match them (:func:`lmopt.optim.cpu_kernels.usable`)."""
    kernels = cpu_kernels.kernels()
    return kernels, [kernels is not None and cpu_kernels.usable(p, g, *ts[:2], matrix=False)
                     for p, g, ts in zip(params, grads, tensors, strict=True)]


def adam_settings(chosen: list[int], scalars: list[tuple[float, ...]], constants: list[dict],
                  extra: Sequence[str] = ()) -> Tensor:
    """The C++ multi-tensor steps' settings table: per chosen tensor one float64 row lr, β1, β2, 1 - β1^t,
    1 - β2^t, ε, λ, then the ``extra`` constants."""
    return torch.tensor([[scalars[i][0], *constants[i]["betas"], *scalars[i][1:], constants[i]["eps"],
                          constants[i]["weight_decay"], *(constants[i][key] for key in extra)] for i in chosen],
                        dtype=torch.float64, device="cpu")


def run_compiled(optimizer: torch.optim.Optimizer, update: Update, params: list[Tensor], tensors: list[list[Tensor]],
                 scalars: list[tuple[float, ...]], constants: list[dict], fallback: str = "for-loop",
                 grads: list[Tensor] | None = None) -> bool:
    """Run ``update`` over every tensor as one compiled function; False (after a warning, with
    ``optimizer.impl`` set to ``fallback``) when torch.compile cannot run here, before anything was updated."""
    table = torch.tensor(scalars, dtype=torch.float64, device=params[0].device)
    # Every optimizer class and parameter layout is one more compiled entry of the same ``loop`` frame, so
    # the per-frame limit is raised (a process may hold many optimizers, as the benchmark does), and a
    # limit hit or a graph break raises instead of running silently uncompiled.
    limits = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)
    try:
        with limits:
            _compiled_loop(update)(params, grads if grads is not None else [p.grad for p in params], tensors, table,
                                   constants)
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
        # raised while compiling, before anything ran: say why, then run eagerly
        warnings.warn(f"{type(optimizer).__name__}(impl='compiled'): torch.compile is unavailable here "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); using impl={fallback!r}",
                      stacklevel=4)
        optimizer.impl = fallback
        return False
    return True
