"""Every optimizer against its reference (tests/optim/reference.py: NumPy, written from the papers, sharing no
code with lmopt), on a model with a parameter of every role, tall and wide matrices, over several steps; plus the
checks a reference alone cannot make: Spectra's tail scale and shaped spectrum on a matrix with a real tail,
Newton–Schulz against the exact polar factor, StableAdamW's update clipping."""

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lmopt.optim import Muon, Spectra, StableAdamW, build, param_roles
from lmopt.optim.ortho_adam import kronecker_sizes, random_orthogonal, rotate, rotation_factors
from lmopt.optim.roles import ROLES
from lmopt.optim.spectra import tail_scale
from lmopt.registry import OPTIMIZERS
from tests.optim import reference

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WD, STEPS, TOTAL_STEPS = 0.01, 0.1, 4, 5
VOCAB, D = 12, 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(D, 8, bias=False)  # (8, 6) tall
        self.self_attn.k_proj = nn.Linear(D, 4, bias=False)  # (4, 6) wide
        self.self_attn.v_proj = nn.Linear(D, 4, bias=False)  # (4, 6) wide
        self.self_attn.o_proj = nn.Linear(8, D, bias=False)  # (6, 8) wide
        if "attn_qkv" in ROLES:  # a fused q/k/v projection, where lmopt's roles know one
            self.self_attn.c_attn = nn.Linear(D, 3 * D, bias=False)  # (18, 6) tall
        self.input_layernorm = nn.RMSNorm(D)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(D, 10)  # (10, 6) tall, and a bias: role "other"
        self.mlp.down_proj = nn.Linear(10, D, bias=False)  # (6, 10) wide


class EveryRole(nn.Module):
    """One parameter per role (two for "other": a bias and a free 2-D parameter), no forward: the gradients are
    given. Weights have a planted dominant direction, so that power iterations converge fast."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)  # (12, 6) tall
        self.layers = nn.ModuleList([Block()])
        self.norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)  # (12, 6) tall, untied
        self.scale = nn.Parameter(torch.zeros(3, 5))  # (3, 5) wide, role "other"
        gen = np.random.default_rng(0)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    value = 0.3 * gen.standard_normal(p.shape) + 3.0 * np.outer(_unit(gen, p.shape[0]),
                                                                                 _unit(gen, p.shape[1]))
                else:
                    value = (1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * gen.standard_normal(p.shape)
                p.copy_(torch.from_numpy(value))


def _unit(gen, n):
    x = gen.standard_normal(n)
    return x / np.linalg.norm(x)


EXPECTED_ROLES = {
    "embed_tokens.weight": "embedding",
    "layers.0.self_attn.q_proj.weight": "attn_q",
    "layers.0.self_attn.k_proj.weight": "attn_k",
    "layers.0.self_attn.v_proj.weight": "attn_v",
    "layers.0.self_attn.o_proj.weight": "attn_o",
    **({"layers.0.self_attn.c_attn.weight": "attn_qkv"} if "attn_qkv" in ROLES else {}),
    "layers.0.input_layernorm.weight": "norm",
    "layers.0.mlp.up_proj.weight": "mlp",
    "layers.0.mlp.up_proj.bias": "other",
    "layers.0.mlp.down_proj.weight": "mlp",
    "norm.weight": "norm",
    "lm_head.weight": "head",
    "scale": "other",
}


def gradients(model, steps=STEPS, seed=1):
    """A fixed rank-one 'spike' plus noise for matrices (their momentum then has a clear top direction), noise
    for vectors; {name: float64 array} per step."""
    gen = np.random.default_rng(seed)
    spikes = {name: 3.0 * np.outer(_unit(gen, p.shape[0]), _unit(gen, p.shape[1]))
              for name, p in model.named_parameters() if p.dim() == 2}
    out = []
    for step in range(steps):
        grads = {}
        for name, p in model.named_parameters():
            noise = gen.standard_normal(tuple(p.shape))
            grads[name] = spikes[name] * (1 + 0.1 * step) + 0.3 * noise if name in spikes else noise
        out.append(grads)
    return out


def ortho_adam_reference(w, grads, roles, lr, wd, order, seed=0, rotation="haar"):
    # OrthoAdam's documented rotation: a Haar-random Q per tensor from torch.Generator seeded with seed + the
    # parameter's position in the optimizer (QR of a float64 Gaussian, signs fixed by R's diagonal); "kronecker":
    # Q = A ⊗ B (np.kron) for a matrix whose last dimension n = n1 n2 has a divisor 1 < n1 <= sqrt(n), A drawn
    # with that seed and B with seed + 1
    def haar(n, s):
        gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        return reference.haar_orthogonal(gaussian.numpy())

    rotations = {}
    for index, name in enumerate(order):
        n = w[name].shape[-1]
        n1 = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
        if rotation == "kronecker" and w[name].ndim > 1 and n1 > 1:
            rotations[name] = np.kron(haar(n1, seed + index), haar(n // n1, seed + index + 1))
        else:
            rotations[name] = haar(n, seed + index)
    return reference.ortho_adam(w, grads, roles, lr, wd, rotations)


# name -> (reference, build options). Power iterations run long enough to converge on these small matrices:
# the reference takes exact singular values and vectors (the iterations themselves are tested below and in
# test_papers.py); Muon's Newton–Schulz runs in float64 here (bf16 and fp32 against the polar factor below).
REFERENCES = {
    "adamw": (reference.adamw, {}),
    "adafactor": (reference.adafactor, {}),
    "lamb": (reference.lamb, {}),
    "stable-adamw": (reference.stable_adamw, {}),
    "ortho-adam": (ortho_adam_reference, {}),
    "muon": (reference.muon, {"ns_dtype": "float64"}),
    "asm": (reference.asm, {}),
    "asa": (reference.asa, {"power_iters": 60, "init_power_iters": 60}),
    "msam": (functools.partial(reference.msam, gamma_lag=1), {}),  # gamma_from="previous", the default
    "amcs": (functools.partial(reference.amcs, total_steps=TOTAL_STEPS), {}),
    "spectra": (reference.spectra, {"power_iters": 60}),
}
# MSAM computes its stability gamma in float32 (gradient_stability casts to .float()), a 1e-7 relative error
TOLERANCE = {"msam": 1e-9}

EAGER_CASES = [(name, impl) for name in OPTIMIZERS.names()
               for impl in (OPTIMIZERS.get(name).impls or (None,)) if impl != "compiled"]
# named options with their own arithmetic, checked against the reference too: (registry name, reference, options)
OPTION_CASES = {"ortho-adam-kronecker": ("ortho-adam", functools.partial(ortho_adam_reference, rotation="kronecker"),
                                         {"rotation": "kronecker"}),
                "msam-gamma-current": ("msam", reference.msam, {"gamma_from": "current"}),
                "msam-gamma-current-fused": ("msam", reference.msam, {"gamma_from": "current", "impl": "fused"}),
                "lamb-trust-previous": ("lamb", functools.partial(reference.lamb, trust_from="previous"),
                                        {"trust_from": "previous"}),
                "lamb-trust-previous-fused": ("lamb", functools.partial(reference.lamb, trust_from="previous"),
                                              {"trust_from": "previous", "impl": "fused"}),
                "lamb-reuse-grad-fused": ("lamb", reference.lamb, {"reuse_grad": True, "impl": "fused"})}


def test_every_optimizer_has_a_reference():
    assert set(REFERENCES) == set(OPTIMIZERS.names())


def test_the_model_has_every_role():
    roles = param_roles(EveryRole())
    assert roles == EXPECTED_ROLES
    assert set(roles.values()) == set(ROLES)


@pytest.mark.parametrize(("name", "impl"), EAGER_CASES + [(case, None) for case in OPTION_CASES],
                         ids=[f"{n}-{i}" if i else n for n, i in EAGER_CASES] + list(OPTION_CASES))
def test_every_role_matches_the_reference_over_several_steps(name, impl):
    # (compiled implementations are compared with their eager counterpart in test_elementwise.py and the battery)
    model = EveryRole().double()
    roles = param_roles(model)
    w0 = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    grads = gradients(model)
    name, ref, options = OPTION_CASES[name] if name in OPTION_CASES else (name, *REFERENCES[name])
    opt = build(name, model, lr=LR, weight_decay=WD, total_steps=TOTAL_STEPS,
                **({"impl": impl} if impl else {}), **options)
    named = dict(model.named_parameters())
    for step_grads in grads:
        for n, p in named.items():
            p.grad = torch.from_numpy(step_grads[n].copy())  # a copy: reuse_grad writes over the gradient
        opt.step()
    if name == "ortho-adam":
        names = {id(p): n for n, p in named.items()}
        ref = functools.partial(ref, order=[names[id(p)] for g in opt.param_groups for p in g["params"]])
    expected = ref(w0, grads, roles, LR, WD)
    for n, p in named.items():
        moved = np.abs(expected[n] - w0[n]).max()
        assert moved > 1e-3, f"{n} barely moves: the comparison would say little"
        np.testing.assert_allclose(p.detach().numpy(), expected[n], rtol=0, atol=TOLERANCE.get(name, 1e-11),
                                   err_msg=f"{name} {impl} {n} ({roles[n]})")


# --- Spectra: a matrix with a real tail --------------------------------------------------------------------------


def planted(m, n, strengths, noise, seed):
    gen = np.random.default_rng(seed)
    U = np.linalg.qr(gen.standard_normal((m, len(strengths))))[0]
    V = np.linalg.qr(gen.standard_normal((n, len(strengths))))[0]
    return (U * np.asarray(strengths)) @ V.T + noise * gen.standard_normal((m, n)) / math.sqrt(max(m, n))


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["tall", "wide"])
def test_spectra_clips_a_planted_spike_to_the_tail_scale(shape, impl):
    m, n = shape
    rank_fraction = 0.05
    k = math.ceil(rank_fraction * min(shape))  # 3
    assert k >= 2
    spike = planted(m, n, [30.0, 24.0, 18.0], 1.0, seed=3)
    W = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Spectra([{"params": [W], "matrix": True}], lr=LR, weight_decay=0.0, rank_fraction=rank_fraction,
                  power_iters=20, impl=impl)
    M = np.zeros(shape)
    gen = np.random.default_rng(4)
    for _ in range(3):
        g = spike + 0.2 * gen.standard_normal(shape) / math.sqrt(max(shape))
        M = 0.95 * M + 0.05 * g
        before = W.detach().numpy().copy()
        W.grad = torch.from_numpy(g)
        opt.step()
        update = (before - W.detach().numpy()) / LR  # = 0.2 O / RMS(O)
        O, tau, s, shaped = reference.spectra_shape(M, k)
        assert s[0] > 10 * tau and s[k] < tau * 3  # a spike far above a real tail (r - k = 45 directions)
        c = 0.2 / math.sqrt(float(np.mean(O * O)))
        np.testing.assert_allclose(update, c * O, rtol=0, atol=1e-10)
        # tau, and the spectrum: the k spike values clipped to tau, the tail's unchanged
        out = np.linalg.svd(update, compute_uv=False) / c
        np.testing.assert_allclose(np.sort(out), np.sort(shaped), rtol=1e-9, atol=1e-12)
        assert np.sum(np.isclose(out, tau, rtol=1e-9)) == k
        wide = torch.from_numpy(M if m <= n else M.T)
        U = torch.from_numpy(np.linalg.svd(wide.numpy())[0][:, :k])
        assert tail_scale(wide, U.mT @ wide, k).item() == pytest.approx(tau, rel=1e-12)


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_spectra_with_its_default_single_power_iteration_stays_close_to_the_exact_shaping(impl):
    shape, k = (64, 48), 3
    spike = planted(*shape, [30.0, 24.0, 18.0], 1.0, seed=3)
    W = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Spectra([{"params": [W], "matrix": True}], lr=LR, weight_decay=0.0, rank_fraction=0.05, impl=impl)
    M = np.zeros(shape)
    gen = np.random.default_rng(4)
    for _ in range(6):
        g = spike + 0.2 * gen.standard_normal(shape) / math.sqrt(max(shape))
        M = 0.95 * M + 0.05 * g
        before = W.detach().numpy().copy()
        W.grad = torch.from_numpy(g)
        opt.step()
        O = reference.spectra_shape(M, k)[0]
        expected = 0.2 * O / math.sqrt(float(np.mean(O * O)))
        np.testing.assert_allclose((before - W.detach().numpy()) / LR, expected, rtol=0, atol=1e-4)


def shape_in_basis(M, U):
    """Spectra's clip shaping of a wide M (r x c) in the orthonormal basis U (r x k), in numpy."""
    r, k = M.shape[0], U.shape[1]
    C = U.T @ M
    A, s, Bt = np.linalg.svd(C, full_matrices=False)
    tau = math.sqrt(max(float(np.sum(M * M) - np.sum(C * C)), 0.0) / (r - k))
    return M + (U @ A) @ ((np.minimum(s, tau) - s)[:, None] * Bt)


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=["tall", "wide"])
def test_spectra_refreshing_after_the_step_shapes_with_the_cached_basis(shape, impl):
    """refresh_timing="after": step t shapes M_t in the basis refined at the previous refresh, then refines it
    with M_t for the next step (U <- qr(M Mᵀ U)); the first step uses M_1's exact top-k subspace."""
    k = 3
    spike = planted(*shape, [30.0, 24.0, 18.0], 1.0, seed=3)
    W = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Spectra([{"params": [W], "matrix": True}], lr=LR, weight_decay=0.0, rank_fraction=0.05, impl=impl,
                  refresh_interval=2, refresh_timing="after")
    M, U = np.zeros(shape), None
    gen = np.random.default_rng(4)
    for step in range(1, 7):
        g = spike + 0.2 * gen.standard_normal(shape) / math.sqrt(max(shape))
        M = 0.95 * M + 0.05 * g
        wide = M if shape[0] <= shape[1] else M.T
        if U is None:
            U = np.linalg.svd(wide)[0][:, :k]
        used = U
        if step > 1 and (step - 1) % 2 == 0:
            U = np.linalg.qr(wide @ (wide.T @ U))[0]
        O = shape_in_basis(wide, used)
        O = O if shape[0] <= shape[1] else O.T
        before = W.detach().numpy().copy()
        W.grad = torch.from_numpy(g)
        opt.step()
        expected = 0.2 * O / math.sqrt(float(np.mean(O * O)))
        np.testing.assert_allclose((before - W.detach().numpy()) / LR, expected, rtol=0, atol=1e-10)


# --- Newton–Schulz against the exact polar factor -----------------------------------------------------------------

# Measured on these matrices: five quintic steps give singular values in [0.68, 1.14] (the iteration's band, by
# design: it does not converge to 1), so ||O - U Vᵀ||_F / ||U Vᵀ||_F is 0.16-0.21 in fp32 and in bf16 alike; the
# singular vectors are U's and V's to 1e-6 in fp32 (largest off-diagonal of Uᵀ O V), 1.1e-2 in bf16 with torch's
# iteration and 3.1e-2 with lmopt's default, bf16 Gram-space segments (these 1.6:1 matrices take them; ||O - U Vᵀ||
# 0.22-0.23 against 0.21-0.23).
NS_DIRECTION_TOLERANCE = {("float32", "auto"): 1e-5, ("bfloat16", "standard"): 2e-2, ("bfloat16", "auto"): 4e-2}


@pytest.mark.parametrize(("ns_dtype", "ns_method"), list(NS_DIRECTION_TOLERANCE))
@pytest.mark.parametrize("shape", [(64, 40), (40, 64)], ids=["tall", "wide"])
def test_muon_update_is_the_polar_factor_of_its_nesterov_momentum(shape, ns_dtype, ns_method):
    W = nn.Parameter(torch.zeros(shape))
    opt = Muon([{"params": [W], "matrix": True}], lr=LR, weight_decay=0.0, ns_dtype=ns_dtype, ns_method=ns_method)
    gen = np.random.default_rng(5)
    buf = np.zeros(shape)
    for _ in range(3):
        g = gen.standard_normal(shape)
        buf = 0.95 * buf + 0.05 * g
        nesterov = g + 0.95 * (buf - g)
        before = W.detach().double().clone()
        W.grad = torch.from_numpy(g).float()
        opt.step()
        O = (before - W.detach().double()) / (LR * 0.2 * math.sqrt(max(shape)))
        U, _, Vh = torch.linalg.svd(torch.from_numpy(nesterov), full_matrices=False)
        polar = U @ Vh
        assert ((O - polar).norm() / polar.norm()).item() < 0.25
        core = U.mT @ O @ Vh.mT  # diagonal when O has the polar factor's singular vectors
        singular = torch.diagonal(core)
        assert singular.min() > 0.6 and singular.max() < 1.2
        assert (core - torch.diag(singular)).abs().max() < NS_DIRECTION_TOLERANCE[ns_dtype, ns_method]
        expected = reference.newton_schulz5(nesterov)
        np.testing.assert_allclose(O.numpy(), expected, rtol=0, atol=2e-5 if ns_dtype == "float32" else 3e-2)


def test_a_kronecker_rotation_is_the_kronecker_product_and_spreads_every_coordinate():
    assert kronecker_sizes(768) == (24, 32) and kronecker_sizes(2048) == (32, 64) and kronecker_sizes(7) == (1, 7)
    A, B = rotation_factors(12, seed=5, rotation="kronecker", dim=2, dtype=torch.float64)
    Q = torch.kron(A, B)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-6)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, (A, B)), x @ Q, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(x, (A, B), inverse=True), x @ Q.mT, rtol=0, atol=1e-12)
    assert (Q.abs() > 1e-6).all()  # one coordinate's image reaches every coordinate
    assert len(rotation_factors(12, 5, "kronecker", dim=1)) == 1 and len(rotation_factors(13, 5, "kronecker", 2)) == 1


def test_ortho_adam_rotations_are_orthogonal():
    for n, seed in [(8, 0), (64, 3)]:
        Q = random_orthogonal(n, seed).double()
        torch.testing.assert_close(Q.mT @ Q, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)  # fp32 rounding
        assert torch.linalg.det(Q).abs().item() == pytest.approx(1.0, abs=1e-5)


# --- StableAdamW: the update clipping must act ----------------------------------------------------------------------


def test_stable_adamw_clips_the_step_when_the_gradient_outgrows_its_second_moment():
    # Twenty small gradients, then one 50x larger: v̂ still remembers the small ones, so RMS(g²/v̂) is well above
    # 1 and the step is divided by it. Without the clip the update would be that many times larger.
    gen = np.random.default_rng(6)
    grads = [0.01 * gen.standard_normal((5, 7)) for _ in range(20)] + [0.5 * gen.standard_normal((5, 7))]
    W = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    opt = StableAdamW([W], lr=LR, weight_decay=0.0)
    m, v = np.zeros((5, 7)), np.zeros((5, 7))
    for t, g in enumerate(grads, 1):
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        before = W.detach().numpy().copy()
        W.grad = torch.from_numpy(g)
        opt.step()
        clip = reference.stable_adamw_clip(g, v, t, 0.95, 1e-8)
        unclipped = LR * reference.adam_direction(m, v, t, 0.9, 0.95, 1e-8)
        np.testing.assert_allclose(before - W.detach().numpy(), unclipped / clip, rtol=1e-10, atol=0)
    assert clip > 3  # the last step was clipped by a factor > 3
