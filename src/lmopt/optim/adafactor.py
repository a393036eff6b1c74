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

On plain tensors :class:`Adafactor` *is* torch's (it calls ``torch.optim.Adafactor.step``). torch's step does
not run on FSDP2-sharded parameters (it reads scalars with ``.item()`` and squares a partial column norm in
place), so for DTensor parameters the same algorithm runs out of place, with the column statistics reduced
across ranks; the state has torch's layout (``step``, ``row_var``, ``col_var`` / ``variance``), so
checkpoints move between the two.
"""

from __future__ import annotations

import math

import torch

from lmopt.optim.distributed import is_dtensor, replicated
from lmopt.optim.roles import role_param_groups
from lmopt.optim.spec import OptimizerSpec, register


class Adafactor(torch.optim.Adafactor):
    @torch.no_grad()
    def step(self, closure=None):
        if not any(is_dtensor(p) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._sharded_update(p, self.state[p], group)
        return loss

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


def build_adafactor(model, lr, weight_decay, beta2_decay, eps2, d, impl) -> Adafactor:
    return Adafactor(role_param_groups(model, weight_decay), lr=lr, beta2_decay=beta2_decay, eps=(None, eps2), d=d,
                     weight_decay=weight_decay, foreach=impl == "foreach")


register(OptimizerSpec(
    name="adafactor",
    summary="Adafactor (torch.optim.Adafactor): factored second moment, relative step capped by lr",
    source="Shazeer & Stern 2018, arXiv:1804.04235",
    builder=build_adafactor,
    defaults={"beta2_decay": -0.8, "eps2": 1e-3, "d": 1.0, "impl": "foreach"},
    default_lr=3e-2,
    default_weight_decay=0.0,
    state_bytes_per_param=0.0,  # O(rows + columns) per matrix: ~0 bytes per parameter
    impls=("foreach", "for-loop"),
))
