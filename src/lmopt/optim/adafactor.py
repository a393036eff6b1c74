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
"""

from __future__ import annotations

import torch

from lmopt.optim.adamw import impl_flags
from lmopt.optim.roles import role_param_groups
from lmopt.optim.spec import OptimizerSpec, register


def build_adafactor(model, lr, weight_decay, beta2_decay, eps2, d, impl) -> torch.optim.Adafactor:
    flags = impl_flags(impl)
    if flags["fused"]:
        raise ValueError("Invalid impl: torch.optim.Adafactor has no fused implementation; use foreach or for-loop")
    return torch.optim.Adafactor(role_param_groups(model, weight_decay), lr=lr, beta2_decay=beta2_decay,
                                 eps=(None, eps2), d=d, weight_decay=weight_decay, foreach=flags["foreach"])


register(OptimizerSpec(
    name="adafactor",
    summary="Adafactor (torch.optim.Adafactor): factored second moment, relative step capped by lr",
    source="Shazeer & Stern 2018, arXiv:1804.04235",
    builder=build_adafactor,
    defaults={"beta2_decay": -0.8, "eps2": 1e-3, "d": 1.0, "impl": "foreach"},
    default_lr=3e-2,
    default_weight_decay=0.0,
    state_bytes_per_param=0.0,  # O(rows + columns) per matrix: ~0 bytes per parameter
))
