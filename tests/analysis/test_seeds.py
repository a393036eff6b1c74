"""The seed-spread diagnostics: separation detector on synthetic curves, per-role RMS on a small model, and a
2-step run on nano (twice: deterministic)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lmopt.analysis import seeds
from lmopt.analysis.seeds import (
    CONFIGS,
    RunSpec,
    config_specs,
    jitter_,
    moving_average,
    plateau_exit,
    role_grad_norms,
    role_rms,
    separation_step,
    step_noise,
    truncate,
)
from lmopt.model import build_model
from lmopt.model.qwen3 import Qwen3Config
from lmopt.optim.roles import param_roles

SMALL = Qwen3Config(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)


def synthetic(n_seeds=3, steps=300, sigma=0.05, offset=0.0, start=None, seed=0):
    """A shared decaying trend plus independent per-step noise; seed index 1 drifts up by ``offset`` after
    ``start`` (a ramp over 10 steps)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    trend = 7.0 + 2.0 * np.exp(-t / 30.0)
    curves = trend + sigma * rng.standard_normal((n_seeds, steps))
    if start is not None:
        curves[1] += offset * np.clip((t - start) / 10.0, 0.0, 1.0)
    return curves


def test_moving_average_is_a_trailing_mean():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert moving_average(x, 2).tolist() == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average(x, 10).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]


def test_step_noise_recovers_sigma():
    assert step_noise(synthetic(sigma=0.05, steps=2000)) == pytest.approx(0.05, rel=0.1)


def test_no_separation_without_a_difference():
    assert separation_step(synthetic(sigma=0.05))["step"] is None


@pytest.mark.parametrize("start", [40, 120])
def test_separation_found_where_planted(start):
    result = separation_step(synthetic(sigma=0.05, offset=0.3, start=start))
    assert start <= result["step"] <= start + 15
    assert result["final_spread"] == pytest.approx(0.3, abs=0.1)


def test_plateau_exit_is_the_first_smoothed_step_below_the_level():
    loss = [9.0] * 10 + [7.2] * 30 + [6.0] * 30
    assert plateau_exit(loss, level=7.15, margin=0.1, window=1) == 41
    assert plateau_exit(loss, level=7.15, margin=0.1, window=10) == 42  # the mean of 7.2 x 9 and 6.0 < 7.05
    assert plateau_exit(loss[:40], level=7.15) is None


def test_role_rms_groups_by_role():
    model = build_model(SMALL, seed=0)
    roles = param_roles(model)
    value = {role: float(i + 1) for i, role in enumerate(sorted(set(roles.values())))}
    tensors = {name: torch.full_like(p, value[roles[name]]) for name, p in model.named_parameters()}
    assert role_rms(tensors, roles) == pytest.approx(value)
    assert set(value) == {"embedding", "attn_q", "attn_k", "attn_v", "attn_o", "mlp", "norm"}


def test_role_grad_norms_make_the_global_norm():
    model = build_model(SMALL, seed=0)
    x = torch.randint(0, 64, (2, 8))
    model(x, x)[1].backward()
    per_role = role_grad_norms(model, param_roles(model))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    assert math.sqrt(sum(v * v for v in per_role.values())) == pytest.approx(float(total), rel=1e-5)


def test_jitter_is_relative_and_tiny():
    model, ref = build_model(SMALL, seed=0), build_model(SMALL, seed=0)
    jitter_(model, 1e-6, seed=1)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        rel = ((p - q) / q).abs()
        assert 0 < rel.max() < 1e-5


def test_seed_zero_runs_are_shared_between_configs():
    ids = {config_specs(name, [0])[0].physics_id() for name in ("baseline", "jitter", "init-varies", "data-varies")}
    assert len(ids) == 1
    assert config_specs("init-varies", [1])[0].data_seed == 0 and config_specs("data-varies", [1])[0].init_seed == 0
    distinct = [name for name in CONFIGS if not name.endswith("-full")]  # "-full": a longer run of another config
    assert len({config_specs(name, [1])[0].physics_id() for name in distinct}) == len(distinct)
    assert config_specs("warmup0.2-full", [1])[0].physics_id() == config_specs("warmup0.2", [1])[0].physics_id()


def test_truncate_keeps_the_prefix():
    record = {"physics": {}, "steps": 4, "seconds": 1.0, "loss": [4, 3, 2, 1], "role_update_rms": {"mlp": [1, 2, 3, 4]},
              "val": [(2, 5.0), (4, 4.0)]}
    cut = truncate(record, 2)
    assert cut["loss"] == [4, 3] and cut["role_update_rms"] == {"mlp": [1, 2]} and cut["val"] == [(2, 5.0)]


@pytest.mark.slow
def test_two_steps_on_nano_are_deterministic(monkeypatch):
    from lmopt.data import load_prepared

    monkeypatch.setattr(seeds, "EVAL_TOKENS", 2048)
    torch.set_num_threads(1)
    data = load_prepared("brown", "bpe-8192")
    spec = replace(RunSpec(), steps=2)
    a, b = seeds.run(spec, data, log=lambda _: None), seeds.run(spec, data, log=lambda _: None)
    assert a["loss"] == b["loss"] and a["val"] == b["val"] and len(a["loss"]) == 2
    assert a["lr"] == pytest.approx([0.0025 * k / 20 for k in (1, 2)], rel=1e-4)
    assert set(a["role_update_rms"]) == set(seeds.ROLE_ORDER)
    # step 1 of Adam: an element moves by lr * g / (|g| + eps), i.e. by lr unless its gradient is near eps
    assert a["role_update_rms"]["embedding"][0] == pytest.approx(0.0025 / 20, rel=1e-2)
