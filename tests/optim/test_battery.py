"""Generic properties checked for every registered optimizer (in the spirit of torch's OptimizerInfo tests)."""

import copy
import io

import numpy as np
import pytest
import torch

from lmopt.model import Qwen3Config, build_model
from lmopt.optim import build
from lmopt.optim.ortho_adam import random_orthogonal
from lmopt.registry import OPTIMIZERS
from tests.optim import reference

NAMES = OPTIMIZERS.names()
TOY = Qwen3Config(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)


def toy_model(seed=0, dtype=torch.float32):
    return build_model(TOY, seed=seed).to(dtype)


def batch(step, n=4, t=12):
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, TOY.vocab_size, (n, t + 1), generator=gen)
    return idx[:, :-1], idx[:, 1:]


def make(name, model, **kw):
    return build(name, model, lr=kw.pop("lr", 1e-2), total_steps=20, **kw)


def run(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    model = toy_model()
    opt = make(name, model)
    run(model, opt, 3)
    saved_model = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # through bytes and a weights_only load, as checkpoints do
    run(model, opt, 3, start=3)
    expected = params(model)

    resumed = toy_model(seed=9)
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, opt2, 3, start=3)
    assert_same(expected, params(resumed))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_bit_identical_results(name):
    results = []
    for _ in range(2):
        model = toy_model()
        run(model, make(name, model), 4)
        results.append(params(model))
    assert_same(*results)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_skipped(name):
    model = toy_model()
    opt = make(name, model)
    frozen = model.layers[0].mlp.up_proj.weight
    before = frozen.detach().clone()
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_leaves_parameters_unchanged(name):
    model = toy_model()
    before = params(model)
    run(model, make(name, model, lr=0.0), 3)
    assert_same(before, params(model))


@pytest.mark.parametrize("name", NAMES)
def test_groups_keep_their_own_lr(name):
    model = toy_model()
    opt = make(name, model)
    frozen_group = next(g for g in opt.param_groups if g.get("role") == "mlp")
    frozen_group["lr"] = 0.0
    frozen_before = [p.detach().clone() for p in frozen_group["params"]]
    moving = [p for g in opt.param_groups if g is not frozen_group for p in g["params"]]
    moving_before = [p.detach().clone() for p in moving]
    run(model, opt, 2)
    assert_same(frozen_before, [p.detach() for p in frozen_group["params"]])
    assert any(not torch.equal(a, b) for a, b in zip(moving_before, moving, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_and_complex_gradients_are_refused(name):
    model = toy_model()
    opt = make(name, model)
    run(model, opt, 1)
    p = model.layers[0].self_attn.q_proj.weight
    p.grad = p.detach().clone().to_sparse()
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step()
    w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    w.grad = torch.randn_like(w)
    spec = OPTIMIZERS.get(name)
    holder = torch.nn.Module()
    holder.weight = w
    with pytest.raises((RuntimeError, ValueError), match="(?i)complex"):
        spec.builder(holder, lr=1e-3, weight_decay=0.0, **({"total_steps": 5} if spec.needs_total_steps else {}),
                     **spec.defaults).step()


# --- one step on a 3x2 matrix against a NumPy reference written from the paper --------------------------------

W0 = np.array([[0.5, -0.3], [0.2, 0.8], [-0.6, 0.1]])
GRADS = [np.array([[0.1, -0.2], [0.05, 0.3], [-0.15, 0.02]]), np.array([[0.12, -0.1], [0.0, 0.25], [-0.2, 0.05]])]

HAND = {
    "adamw": (reference.adamw, {}),
    "adafactor": (reference.adafactor, {"impl": "for-loop"}),
    "lamb": (reference.lamb, {}),
    "stable-adamw": (reference.stable_adamw, {}),
    "ortho-adam": (lambda w, g: reference.ortho_adam(w, g, random_orthogonal(2, 0, torch.float64).numpy()), {}),
    "muon": (reference.muon, {"ns_dtype": "float64"}),
    "asm": (reference.asm, {}),
    "asa": (reference.asa, {"power_iters": 50, "init_power_iters": 50}),
    "msam": (reference.msam, {}),
    "amcs": (reference.amcs, {}),
    "spectra": (reference.spectra, {"power_iters": 50}),
}


TORCH_STEP_COUNT_IN_FLOAT32 = {"adamw", "asm", "adafactor"}


def test_every_optimizer_has_a_hand_reference():
    assert set(HAND) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_two_steps_on_a_3x2_matrix_match_the_reference(name):
    ref, options = HAND[name]
    holder = torch.nn.Module()
    holder.q_proj = torch.nn.Linear(2, 3, bias=False, dtype=torch.float64)  # role attn_q
    with torch.no_grad():
        holder.q_proj.weight.copy_(torch.tensor(W0))
    spec = OPTIMIZERS.get(name)
    if name == "adamw":
        options = {"impl": "for-loop"}
    weight_decay = {"lamb": 0.01, "adafactor": reference.WD}.get(name, reference.WD)
    opt = build(name, holder, lr=reference.LR, weight_decay=weight_decay, total_steps=4, **options)
    for g in GRADS:
        holder.q_proj.weight.grad = torch.tensor(g)
        opt.step()
    expected = ref(W0, GRADS)
    # torch's own AdamW keeps its step count as a float32 tensor, so its bias corrections carry ~1e-8 error
    atol = 1e-7 if name in TORCH_STEP_COUNT_IN_FLOAT32 else 1e-10
    np.testing.assert_allclose(holder.q_proj.weight.detach().numpy(), expected, rtol=0, atol=atol)
    assert spec.name == name
