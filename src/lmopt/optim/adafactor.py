"""Adafactor, torch's own (``torch.optim.Adafactor``; Shazeer & Stern, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost", ICML 2018, arXiv:1804.04235).

Second moment factored into row and column means for matrices (O(m + n) state), no first moment,
β2_t = 1 - t^(-0.8), relative step size:

    ρ_t = min(lr, 1/√t),   α_t = max(ε2, RMS(w)) ρ_t,   w <- w (1 - lr λ) - α_t Û_t

Differences from the paper's recipe, as torch implements it and as the benchmark runs it: the paper's
relative step uses ρ_t = min(1e-2, 1/√t) with no external lr and adds update clipping (d = 1); torch uses
``lr`` as the cap of ρ_t (so the trainer's warm-up and decay scale the cap), applies decoupled weight decay
with ``lr``, and has no momentum (the paper's β1 = 0 default). The benchmark sweeps ``lr`` like every other
optimizer's learning rate.

With ``impl`` "foreach" (the default) or "for-loop", on plain tensors :class:`Adafactor` *is* torch's (it
calls ``torch.optim.Adafactor.step``). torch's step does not run on FSDP2-sharded parameters (it reads scalars
with ``.item()`` and squares a partial column norm in place), so for DTensor parameters the same algorithm runs
out of place, with the column statistics reduced across ranks; the state has torch's layout (``step``,
``row_var``, ``col_var`` / ``variance``), so checkpoints move between the two.

``impl="compiled"`` runs the same step through ``torch.compile`` (the machinery of :mod:`lmopt.optim.elementwise`,
one compiled call per tensor), without torch's per-tensor ``.item()`` reads and full-size temporaries: the
row-by-column variance estimate is an outer product (``row_var * col_var``, what torch's ``row_var @ col_var``
computes for (m, 1) x (1, n) factors) fused into the update. It keeps torch's state layout.

``impl="fused"`` runs each matrix's step as three C++ passes (:mod:`lmopt.optim.cpu_kernels`): the row and
column sums of g² with ‖W‖² (one read of g and W), Σ g²/v̂ for the update's RMS (one read of g), and the update
with weight decay (one read of g and W, one write of W): fewer passes than fused AdamW makes, where the compiled
step takes 3.5x its time (a column reduction reads with a stride; each reduction is its own pass). Other
tensors (1-D, bf16, non-CPU) run the compiled step; where the kernels cannot be built it warns once and runs
"compiled". Same state layout; the same arithmetic up to summation order.
"""

from __future__ import annotations

import math

import torch

from lmopt.optim import cpu_kernels
from lmopt.optim.common import torch_step
from lmopt.optim.distributed import is_dtensor, replicated
from lmopt.optim.elementwise import run_compiled
from lmopt.optim.spec import OptionError, register_class

IMPLS = ("foreach", "for-loop", "compiled", "fused")


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` with lmopt's defaults and a compiled implementation.

    Args:
        params: parameters or parameter groups.
        lr: the cap on the relative step size ρ_t = min(lr, 1/sqrt(t)).
        beta2_decay: the second-moment decay β2_t = 1 - t^beta2_decay.
        eps2: the floor of the parameter RMS that scales the step (torch's ``eps[1]``).
        d: the update clipping threshold (the update's RMS is divided by max(1, RMS/d)).
        weight_decay: decoupled weight decay, multiplied by lr.
        impl: "foreach", "for-loop", "compiled" or "fused" (C++ kernels for fp32/fp64 CPU matrices).
        **torch_options: any other ``torch.optim.Adafactor`` argument (``eps`` as a pair overrides ``eps2``,
            ``foreach`` overrides ``impl``, ``maximize``).
    """

    def __init__(self, params, lr: float = 3e-2, beta2_decay: float = -0.8, eps2: float = 1e-3, d: float = 1.0,
                 weight_decay: float = 0.0, impl: str = "foreach", **torch_options) -> None:
        if impl not in IMPLS:
            raise OptionError(f"Invalid impl: {impl!r}; choose one of {', '.join(map(repr, IMPLS))}")
        if not beta2_decay <= 0:
            raise OptionError(f"Invalid beta2_decay: {beta2_decay} must be <= 0 (beta2_t = 1 - t^beta2_decay)")
        torch_options.setdefault("eps", (None, eps2))
        if "foreach" in torch_options:
            impl = "foreach" if torch_options["foreach"] else "for-loop"
        torch_options["foreach"] = impl == "foreach"
        impl = cpu_kernels.fused_or_fallback(impl, "Adafactor")
        super().__init__(params, lr=lr, beta2_decay=beta2_decay, d=d, weight_decay=weight_decay, **torch_options)
        self.impl = impl

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles (and deep-copies) only defaults, state and param_groups; ``impl`` goes along
        return super().__getstate__() | {"impl": self.impl}

    @torch.no_grad()
    def step(self, closure=None):
        sharded = any(is_dtensor(p) for group in self.param_groups for p in group["params"])
        if not sharded and self.impl not in ("compiled", "fused"):
            return torch_step(torch.optim.Adafactor, self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if sharded:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._sharded_update(p, self.state[p], group)
        else:
            self._compiled_step()
        return loss

    def _compiled_step(self) -> None:
        """One compiled call per tensor: for Adafactor, Inductor's single graph over all of qwen3-134m's
        tensors measured 1.5x slower than a graph per tensor (the other per-tensor optimizers are faster as one
        graph). Where compilation is unavailable the same ``adafactor_update`` runs eagerly."""
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            self._init_group(group, params, [], [], [], [], [])
            eps1, eps2 = group["eps"]
            for p in params:
                state = self.state[p]
                state["step"] += 1
                t = float(state["step"])
                tensors = [state["row_var"], state["col_var"]] if p.grad.dim() > 1 else [state["variance"]]
                scalars = (group["lr"], t ** group["beta2_decay"], min(group["lr"], 1 / t**0.5))
                constants = {"weight_decay": group["weight_decay"], "d": group["d"], "eps2": eps2,
                             "eps1": torch.finfo(p.dtype).eps if eps1 is None else eps1,
                             "maximize": group["maximize"]}
                if self.impl == "fused" and cpu_kernels.usable(p, p.grad):
                    fused_factored_update(p, p.grad, tensors, scalars, constants)
                elif not (self.impl in ("compiled", "fused")
                          and run_compiled(self, adafactor_update, [p], [tensors], [scalars], [constants],
                                           fallback="for-loop")):
                    adafactor_update(p, p.grad, tensors, scalars, constants)

    def _sharded_update(self, p, state: dict, group: dict) -> None:
        """torch's single-tensor Adafactor step, written out of place so that it runs on DTensors."""
        grad = -p.grad if group["maximize"] else p.grad
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
        lr, d = group["lr"], group["d"]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        t = float(state["step"])
        one_minus_beta2 = t ** group["beta2_decay"]
        rho = min(lr, 1 / t**0.5)
        alpha = (replicated(p.norm(2)) / p.numel() ** 0.5).clamp(min=eps2) * rho
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        if grad.dim() > 1:
            row_mean = torch.norm(grad, dim=-1, keepdim=True).square().div(grad.size(-1))
            col_mean = replicated(torch.norm(grad, dim=-2, keepdim=True)).square().div(grad.size(-2))
            if "row_var" not in state:
                state["row_var"], state["col_var"] = torch.zeros_like(row_mean), torch.zeros_like(col_mean)
            state["row_var"] = state["row_var"].lerp(row_mean, one_minus_beta2)
            state["col_var"] = state["col_var"].lerp(col_mean, one_minus_beta2)
            row_scale = replicated(state["row_var"].mean(dim=-2, keepdim=True)).clamp(min=eps1)
            var_estimate = (state["row_var"] @ state["col_var"]) / row_scale
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(grad)
            state["variance"] = state["variance"].lerp(grad * grad, one_minus_beta2)
            var_estimate = state["variance"]
        update = var_estimate.clamp(min=eps1 * eps1).rsqrt() * grad
        denom = (replicated(update.norm(2)) / (math.sqrt(update.numel()) * d)).clamp(min=1.0)
        p.sub_(update * (alpha / denom))


def column_mean_square(grad: torch.Tensor) -> torch.Tensor:
    """mean(g², dim=-2, keepdim=True), summed in blocks of up to 64 consecutive rows first: Inductor's C++
    code for a reduction over the outer dimension reads the matrix column-block by column-block (31 ms on the
    151936 x 512 embedding on 2 threads); blocked, each row is read once, in order (14 ms)."""
    rows = grad.shape[-2]
    block = max(d for d in range(1, 65) if rows % d == 0)
    blocks = grad.unflatten(-2, (rows // block, block))
    return blocks.square().sum(dim=-2).sum(dim=-2, keepdim=True) / rows


def adafactor_update(p, grad, tensors, scalars, c) -> None:
    """torch's single-tensor Adafactor step on one tensor, written for the compiled loop (no host reads).

    v̂ enters twice, in RMS(update) = sqrt(mean(g² / v̂)) and in the update g v̂^(-1/2); it is written as two
    different expressions (the same value up to rounding) so that Inductor computes it where it is used
    instead of storing a full-size v̂: a fresh 311 MB buffer per step cost more than the arithmetic."""
    lr, one_minus_beta2, rho = scalars
    grad = -grad if c["maximize"] else grad
    alpha = (p.norm() / p.numel() ** 0.5).clamp(min=c["eps2"]) * rho
    floor = c["eps1"] ** 2
    if len(tensors) == 2:
        row_var, col_var = tensors
        row_var.lerp_(grad.square().mean(dim=-1, keepdim=True), one_minus_beta2)
        col_var.lerp_(column_mean_square(grad), one_minus_beta2)
        row_scale = row_var.mean(dim=-2, keepdim=True).clamp(min=c["eps1"])
        inverse_var = 1 / torch.maximum(row_var * col_var / row_scale, torch.full_like(row_scale, floor))
        inverse_std = (row_var / row_scale * col_var).clamp(min=floor).rsqrt()
    else:
        (variance,) = tensors
        variance.lerp_(grad * grad, one_minus_beta2)
        inverse_var = 1 / variance.clamp(min=floor)
        inverse_std = variance.clamp(min=floor).rsqrt()
    update_rms = (grad.square() * inverse_var).mean().sqrt()
    step_size = alpha / (update_rms / c["d"]).clamp(min=1.0)
    # p <- p (1 - lr λ) + ... in one expression even when λ = 0 (x·1 is exact): an in-place add alone was
    # compiled as a fresh full-size result copied back into p (2x slower on the embedding)
    p.copy_(p * (1 - lr * c["weight_decay"]) + grad * inverse_std * -step_size)


def fused_factored_update(p, grad, tensors, scalars, c) -> None:
    """:func:`adafactor_update` on a matrix by the three C++ passes of :mod:`lmopt.optim.cpu_kernels`."""
    kernels = cpu_kernels.kernels()
    lr, one_minus_beta2, rho = scalars
    row_var, col_var = tensors
    rows, cols = grad.shape
    row_sq, col_sq, p_sq = kernels.adafactor_stats(p, grad)
    row_var.lerp_(row_sq.view_as(row_var).to(row_var.dtype) / cols, one_minus_beta2)
    col_var.lerp_(col_sq.view_as(col_var).to(col_var.dtype) / rows, one_minus_beta2)
    row_scale = row_var.mean(dim=-2, keepdim=True).clamp(min=c["eps1"])
    row_factor, col = (row_var / row_scale).view(-1).double(), col_var.view(-1).double()
    floor = c["eps1"] ** 2
    alpha = max(math.sqrt(p_sq.item() / p.numel()), c["eps2"]) * rho
    update_rms = math.sqrt(kernels.adafactor_inverse_variance_sum(grad, row_factor, col, floor) / p.numel())
    step_size = alpha / max(update_rms / c["d"], 1.0)
    kernels.adafactor_update(p, grad, row_factor, col, floor, 1 - lr * c["weight_decay"],
                             -step_size if c["maximize"] else step_size)


register_class(
    Adafactor,
    name="adafactor",
    summary="Adafactor (torch.optim.Adafactor): factored second moment, relative step capped by lr",
    source="Shazeer & Stern 2018, arXiv:1804.04235",
    state_bytes_per_param=0.0,  # O(rows + columns) per matrix: ~0 bytes per parameter
    impls=IMPLS,
)
