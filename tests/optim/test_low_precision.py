"""Every registered optimizer on bf16 and fp16 parameters (a model after ``.bfloat16()`` / ``.half()``).

A few steps of the nano model on one fixed batch must keep the parameters' dtype and give finite losses that fall.

fp16: Adam-type moments kept in fp16 underflow (g² < 6e-8, the smallest fp16 subnormal: 1.24M of nano's 1.54M
entries were 0 after the first step while g was not) and eps = 1e-8 rounds to 0, so m / (sqrt(v) + eps) blows
up; torch's own AdamW does this. lmopt keeps the moments of fp16 parameters in fp32 and updates them through an
fp32 copy (lmopt.optim.common.state_dtype): :func:`test_fp16_parameters_get_fp32_moments` checks the state, and
the training test below runs every optimizer on fp16 parameters.
"""

import math

import pytest
import torch

from lmopt.model import build_model, get_preset
from lmopt.optim import Muon, Spectra, build
from lmopt.registry import OPTIMIZERS

STEPS = 6


def losses_on_one_batch(model: torch.nn.Module, step, steps: int = STEPS) -> list[float]:
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    out = []
    for _ in range(steps):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        step()
        model.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def assert_trains(losses: list[float], model: torch.nn.Module, dtype: torch.dtype) -> None:
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
    assert max(losses) <= losses[0] + 1e-3, losses
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_steps_on_low_precision_parameters(name, dtype):
    model = build_model(get_preset("nano").config, seed=0).to(dtype)
    optimizer = build(name, model, total_steps=10)
    assert_trains(losses_on_one_batch(model, optimizer.step), model, dtype)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS.names() if n != "adafactor"])
def test_fp16_parameters_get_fp32_moments(name):
    """The second-moment-like state of fp16 parameters is fp32 (bf16 parameters keep bf16 state)."""
    for dtype, expected in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model = build_model(get_preset("nano").config, seed=0).to(dtype)
        optimizer = build(name, model, total_steps=10)
        losses_on_one_batch(model, optimizer.step, 1)
        moments = [v for s in optimizer.state.values() for k, v in s.items() if k == "exp_avg_sq"]
        assert moments and all(v.dtype == expected for v in moments), (name, dtype)


@pytest.mark.parametrize("impl", ["foreach", "for-loop"])
def test_spectra_keeps_an_fp32_basis_and_tracks_fp32_on_bf16(impl):
    """bf16 parameters: the basis stays fp32, the momentum bf16, and the losses follow an fp32 model's."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(get_preset("nano").config, seed=0).to(dtype)
        optimizer = build("spectra", model, impl=impl, refresh_interval=2, total_steps=10)
        runs[dtype] = losses_on_one_batch(model, optimizer.step, 4)
        bases = [s["basis"] for s in optimizer.state.values() if "basis" in s]
        assert bases and all(b.dtype == torch.float32 for b in bases)
        assert all(s["momentum_buffer"].dtype == dtype for s in optimizer.state.values() if "momentum_buffer" in s)
    torch.testing.assert_close(runs[torch.bfloat16], runs[torch.float32], rtol=0.02, atol=0)


@pytest.mark.parametrize("cls", [Muon, Spectra])
def test_matrix_updates_in_fp16(cls):
    """Muon's and Spectra's own updates (hidden matrices only, no AdamW part) train fp16 parameters."""
    model = build_model(get_preset("nano").config, seed=0).half()
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    optimizer = cls(matrices, lr=0.02)
    assert_trains(losses_on_one_batch(model, optimizer.step, 8), model, torch.float16)
