"""The battery's view of the registry, in the manner of torch's ``OptimizerInfo``
(torch/testing/_internal/common_optimizers.py): one case per registered optimizer and implementation it declares
(``OPTIMIZERS.get(name).impls``; one case for an optimizer that declares none). Nothing here names an optimizer,
so a new one gets every battery test by registering.

The fixture is small on purpose: four tensors, one of each kind of update. Every test that compiles (the
``compiled`` implementations) then sees one of two parameter layouts, all four tensors or the first three, so a
whole run compiles each optimizer at most twice (~10 s a layout on a 2-core CPU, cached on disk by Inductor).

    embed_tokens.weight   (16, 8)  embedding  tall, no weight decay (AdamW's part in Muon and Spectra)
    self_attn.q_proj      (6, 8)   attn_q     wide, decayed; its group carries its own betas (below)
    norm.weight           (8,)     norm       1-D, no weight decay; its group carries its own betas too
    mlp.down_proj         (12, 8)  mlp        tall, decayed; last, so that it can be left out or added later

Gradients are synthetic and depend on the parameter: g = G(step, shape) + 0.5 w, the gradient of
<w, G> + w²/4 (what :func:`closure` computes by autograd), so every parameter's update is its own.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import torch
from torch import nn

from lmopt.optim import build
from lmopt.registry import OPTIMIZERS

LR, WEIGHT_DECAY, TOTAL_STEPS = 1e-2, 0.1, 20
ALTERED_ROLES = ("attn_q", "norm")  # groups whose beta-like hyper-parameters differ from the defaults
FIXTURE_ROLES = {"embed_tokens.weight": "embedding", "self_attn.q_proj.weight": "attn_q", "norm.weight": "norm",
                 "mlp.down_proj.weight": "mlp"}


def _cases() -> list[tuple[str, str | None]]:
    return [(name, impl) for name in OPTIMIZERS.names() for impl in (OPTIMIZERS.get(name).impls or (None,))]


CASES = _cases()
CASE_IDS = [name if impl is None else f"{name}-{impl}" for name, impl in CASES]


def eager_counterpart(name: str, impl: str | None) -> str | None:
    """The implementation a ``compiled`` case is compared with: the first one the optimizer declares that is not
    compiled (the compiled path runs the same update function through ``torch.compile``)."""
    if impl != "compiled":
        return impl
    return next(i for i in OPTIMIZERS.get(name).impls if i != "compiled")


def uses_compiler(impl: str | None) -> bool:
    return impl == "compiled"


class Battery(nn.Module):
    """The battery's fixture (see the module docstring); the same values for the same ``seed``."""

    def __init__(self, with_mlp: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8, dtype=dtype)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 6, bias=False, dtype=dtype)
        self.norm = nn.RMSNorm(8, dtype=dtype)
        if with_mlp:
            self.mlp = nn.Module()
            self.mlp.down_proj = nn.Linear(8, 12, bias=False, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in Battery._full_shapes():
                if name in dict(self.named_parameters()):
                    value = torch.randn(p, generator=gen, dtype=torch.float64) * 0.5
                    if name == "norm.weight":
                        value = 1 + value * 0.2
                    self.get_parameter(name).copy_(value.to(dtype))
                else:
                    torch.randn(p, generator=gen)  # keep the others' values independent of ``with_mlp``

    @staticmethod
    def _full_shapes():
        return [("embed_tokens.weight", (16, 8)), ("self_attn.q_proj.weight", (6, 8)), ("norm.weight", (8,)),
                ("mlp.down_proj.weight", (12, 8))]

    @property
    def mlp_weight(self) -> nn.Parameter:
        return self.mlp.down_proj.weight


def synthetic(step: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G(step, shape): a fixed random tensor per step and shape (the fixture's shapes are all different)."""
    seed = 10_000 * step + sum((i + 1) * 131 * s for i, s in enumerate(shape))
    value = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return value.to(dtype) if not dtype.is_complex else torch.complex(value, value.flip(-1)).to(dtype)


def set_grads(params, step: int, skip=()) -> None:
    """g = G(step, shape) + 0.5 w on every parameter but those in ``skip`` (which get ``grad = None``)."""
    skipped = {id(p) for p in skip}
    for p in params:
        p.grad = None if id(p) in skipped else synthetic(step, tuple(p.shape), p.dtype) + 0.5 * p.detach()


def closure_for(params, step: int, calls: list | None = None) -> Callable[[], torch.Tensor]:
    """A closure in torch's sense: zero the grads, compute the loss <w, G> + w²/4, backpropagate, return it."""

    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(torch.is_grad_enabled())
        for p in params:
            p.grad = None
        loss = sum((p * synthetic(step, tuple(p.shape), p.dtype)).sum() + 0.25 * p.square().sum() for p in params)
        loss.backward()
        return loss

    return closure


def alter(value):
    """A different but valid value of a beta-like hyper-parameter (a β in [0, 1), or Adafactor's negative decay)."""
    if isinstance(value, tuple | list):
        return type(value)(alter(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    return value - 0.05 if value > 0 else value + 0.1


def beta_keys(group: dict) -> list[str]:
    """The group's beta-like hyper-parameters: every key that names a β or a momentum."""
    return sorted(k for k, v in group.items() if ("beta" in k or k == "momentum") and isinstance(v, float | tuple))


def alter_betas(opt: torch.optim.Optimizer, roles=ALTERED_ROLES) -> None:
    for group in opt.param_groups:
        if roles is None or group.get("role") in roles:
            for key in beta_keys(group):
                group[key] = alter(group[key])


def make(name: str, impl: str | None, model: nn.Module, lr: float = LR, altered: bool = True,
         **options) -> torch.optim.Optimizer:
    """The registered optimizer over ``model`` (role groups from the registry's builder), with ``impl``;
    ``altered``: the groups of :data:`ALTERED_ROLES` get their own beta-like hyper-parameters."""
    if impl is not None:
        options["impl"] = impl
    opt = build(name, model, lr=lr, weight_decay=WEIGHT_DECAY, total_steps=TOTAL_STEPS, **options)
    if altered:
        alter_betas(opt)
    return opt


def group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def train(opt: torch.optim.Optimizer, params, steps: range, skip: Callable[[int], tuple] = lambda step: ()) -> None:
    for step in steps:
        set_grads(params, step, skip(step))
        opt.step()


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def state_snapshot(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return copy.deepcopy({k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()})


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_equal(actual, expected, atol: float = 0.0, msg: str = "") -> None:
    """Bitwise equal when ``atol`` is 0, else within ``atol``."""
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        if atol == 0:
            assert torch.equal(a, b), f"{msg} tensor {i}: max difference {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"{msg} tensor {i}")


def through_bytes(state_dict: dict) -> dict:
    """A state_dict as a checkpoint stores it: saved to bytes, loaded back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def impl_in_use(opt: torch.optim.Optimizer) -> str | None:
    """Which implementation the optimizer object will run: lmopt's ``impl`` attribute, or torch's flags."""
    if hasattr(opt, "impl"):
        return opt.impl
    flags = opt.param_groups[0]
    if "fused" in flags or "foreach" in flags:
        return "fused" if flags.get("fused") else ("foreach" if flags.get("foreach") else "for-loop")
    return None
