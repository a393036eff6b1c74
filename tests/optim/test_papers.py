"""Tests of what each paper's optimizer specifically claims or needs."""

import math

import pytest
import torch

from lmopt.model import get_preset
from lmopt.model.qwen3 import Qwen3
from lmopt.optim import ASM, Muon, Spectra, build, matrix_param_groups, param_roles, role_param_groups
from lmopt.optim import asa as asa_module
from lmopt.optim.amcs import mixing_weight
from lmopt.optim.asa import ASA
from lmopt.optim.kernels import block_power_iteration, newton_schulz, power_iteration_sigma, refined_basis
from lmopt.optim.msam import gradient_stability
from lmopt.optim.spectra import shape_spike
from tests.optim.test_battery import batch, make, params, run, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")


def train_steps(model, opt, steps):
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()


# --- ASM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_asm_without_overrides_is_torch_adamw_bit_for_bit(impl):
    a, b = toy_model(), toy_model()
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[impl]
    asm = ASM(role_param_groups(a, 0.1), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, role_overrides=False,
              impl=impl)
    adamw = torch.optim.AdamW(role_param_groups(b, 0.1), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, **flags)
    train_steps(a, asm, 50)
    train_steps(b, adamw, 50)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_asm_overrides_touch_only_attention_q_and_k():
    opt = build("asm", toy_model(), lr=3e-4)
    for group in opt.param_groups:
        if group["role"] in ("attn_q", "attn_k"):
            assert group["lr"] == pytest.approx(3.5e-4) and group["betas"][0] == 0.97
            assert group["weight_decay"] == 0.0
        else:
            assert group["lr"] == 3e-4 and group["betas"][0] == 0.95


# --- Muon -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon_step_for_step(adjust, nesterov):
    """lmopt's batched Muon against torch.optim.Muon on the same settings: bf16 Newton–Schulz, torch's (standard)
    iteration (lmopt's default takes the Gram space for these 2:1 matrices: the same iteration, other bf16
    rounding; tests/optim/test_newton_schulz.py)."""
    a, b = toy_model(), toy_model()
    mats_a = [p for p in a.parameters() if p.dim() == 2 and p is not a.embed_tokens.weight]
    mats_b = [p for p in b.parameters() if p.dim() == 2 and p is not b.embed_tokens.weight]
    ours = Muon(mats_a, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr=adjust, ns_dtype="bfloat16",
                 ns_method="standard")
    theirs = torch.optim.Muon(mats_b, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    for step in range(5):
        for model, opt in ((a, ours), (b, theirs)):
            x, y = batch(step)
            opt.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            opt.step()
        for p, q in zip(mats_a, mats_b, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_newton_schulz_against_svd():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4, 64, 160, generator=gen, dtype=torch.float64)  # well conditioned (aspect 0.4)
    O = newton_schulz(G, dtype=torch.float32).double()
    U, _S, Vh = torch.linalg.svd(G, full_matrices=False)
    out_singular = torch.linalg.svdvals(O)
    assert out_singular.min() > 0.5 and out_singular.max() < 1.5  # the quintic's band around 1
    # the singular directions are kept: Uᵀ O V is (nearly) diagonal
    core = U.mT @ O @ Vh.mT
    off_diagonal = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() < 1e-3
    # batched equals one at a time, bit for bit, and a tall matrix is handled through its transpose
    assert torch.equal(newton_schulz(G[1]), newton_schulz(G)[1])
    assert torch.equal(newton_schulz(G[0].mT), newton_schulz(G[0]).mT)


# --- ASA ------------------------------------------------------------------------------------------------------


def test_warm_started_power_iteration_tracks_the_spectral_norm():
    gen = torch.Generator().manual_seed(1)
    U, _, Vh = torch.linalg.svd(torch.randn(48, 32, generator=gen), full_matrices=False)
    W = (U * torch.linspace(2.0, 0.1, 32)) @ Vh  # a decaying spectrum, sigma2/sigma1 = 0.97
    v = torch.randn(32, generator=gen)
    v = v / v.norm()
    for _ in range(100):  # one iteration per call, warm-started, as ASA does once per step
        sigma, v = power_iteration_sigma(W, v, iters=1)
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(W, ord=2).item(), rel=1e-3)


def test_asa_state_holds_the_spectral_norm_vector_of_attention_matrices_only():
    model = toy_model()
    opt = build("asa", model, init_power_iters=500, power_iters=500)
    q = model.layers[0].self_attn.q_proj.weight
    train_steps(model, opt, 1)
    before_second_step = q.detach().clone()  # sigma is estimated on the weights the step starts from
    x, y = batch(1)
    opt.zero_grad()
    model(x, y)[1].backward()
    opt.step()
    sigma = (before_second_step @ opt.state[q]["power_vector"]).norm()
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(before_second_step, ord=2).item(), rel=1e-4)
    assert "power_vector" not in opt.state[model.layers[0].mlp.up_proj.weight]
    assert isinstance(opt, ASA)


def test_asa_docstring_states_the_measured_spectral_norms_at_init():
    # The docstring's nano figures, measured again (the qwen3-134m ones come from the command it states, which
    # takes minutes here): mean sigma over layers of q, k, v, o at lmopt's initialisation, seed 0.
    model = Qwen3(get_preset("nano").config)
    model.init_weights(0)
    measured = {r: sum(torch.linalg.matrix_norm(getattr(layer.self_attn, f"{r}_proj").weight.detach(), ord=2).item()
                       for layer in model.layers) / len(model.layers) for r in "qkvo"}
    assert {r: round(v, 2) for r, v in measured.items()} == {"q": 0.45, "k": 0.38, "v": 0.38, "o": 0.23}
    doc = " ".join(asa_module.__doc__.split())
    assert "nano 0.45 / 0.38 / 0.38 / 0.23" in doc and "qwen3-134m 1.08 / 0.90 / 0.90 / 0.22" in doc


# --- weight decay with the role-scaled lr (ASA, AMCS; issue 20) --------------------------------------------------


@pytest.mark.parametrize("name", ["asa", "amcs"])
@pytest.mark.parametrize("scaled", [True, False])
def test_weight_decay_uses_the_roles_lr(name, scaled):
    # A zero gradient leaves only the decay: W <- W (1 - lr_role λ), with lr_role = 1.2 lr for attention and
    # 0.8 lr for the embedding (given a weight decay here, which the builder would not), lr otherwise.
    model = toy_model(dtype=torch.float64)
    option = {"asa": "role_lr_scales", "amcs": "component_scales"}[name]
    opt = build(name, model, lr=0.01, weight_decay=0.1, total_steps=10, **{option: scaled})
    for group in opt.param_groups:
        group["weight_decay"] = 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    roles = param_roles(model)
    for n, p in model.named_parameters():
        role = roles[n]
        scale = (1.2 if role.startswith("attn_") else 0.8 if role == "embedding" else 1.0) if scaled else 1.0
        torch.testing.assert_close(p.detach(), before[n] * (1 - scale * 0.01 * 0.1), rtol=0, atol=1e-15, msg=n)


def test_amcs_keeps_one_buffer_more_than_adamw():
    # 12 bytes per parameter against 8: on qwen3-134m +0.54 GB (the docstring), not the paper's +10.3 GB
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    model = toy_model()
    sizes = {}
    for name in ("adamw", "amcs"):
        opt = build(name, model, total_steps=10)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sizes[name] = state_bytes(opt)
    assert sizes["amcs"] - sizes["adamw"] == 4 * sum(p.numel() for p in model.parameters())


# --- MSAM / AMCS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["cosine", "variance"])
def test_msam_stability_lies_in_unit_interval(measure):
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        g, s = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen) * torch.rand(1, generator=gen)
        gamma = gradient_stability(g, s, measure)
        assert 0.0 <= gamma.item() <= 1.0
    g = torch.randn(7, 5, generator=gen)
    assert gradient_stability(g, g, measure).item() == pytest.approx(1.0)
    assert gradient_stability(g, -g, measure).item() == pytest.approx(0.0)
    assert gradient_stability(g, torch.zeros_like(g), "cosine").item() == 0.0


def test_amcs_mixing_goes_from_fast_to_slow():
    assert mixing_weight(1, 100) == 1.0 and mixing_weight(100, 100) == 0.0
    assert mixing_weight(51, 101) == pytest.approx(0.5)
    assert mixing_weight(1, 100, "cosine") == 1.0 and mixing_weight(100, 100, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total_steps"):
        build("amcs", toy_model())


# --- Spectra --------------------------------------------------------------------------------------------------


def planted_spike(m=96, n=160, k=3, spike=30.0, noise=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    strengths = spike * torch.tensor([1.0, 0.8, 0.6][:k], dtype=torch.float64)
    return U, (U * strengths) @ V.mT + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)


def test_block_power_iteration_converges_to_a_planted_spike():
    U_true, M = planted_spike()
    gen = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(96, 3, generator=gen, dtype=torch.float64)).Q  # a cold start
    for _ in range(5):
        U = block_power_iteration(M, U, iters=1)
    cos_angles = torch.linalg.svdvals(U_true.mT @ U)  # cosines of the principal angles
    assert cos_angles.min() > 0.999


def spread_columns(rows: int, k: int, batch: int, condition: float, seed: int = 0) -> torch.Tensor:
    """(batch, rows, k) float32 matrices whose singular values spread from 1 down to 1/condition."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(batch, rows, k, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(batch, k, k, generator=gen, dtype=torch.float64)).Q
    sigma = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return ((left * sigma) @ right.mT).float()


def orthonormal_basis_of(rows: int, k: int, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(batch, rows, k, generator=gen)).Q


@pytest.mark.parametrize("condition", [1.0, 1e3, 1e6])
def test_refined_basis_spans_what_a_householder_qr_spans(condition):
    """The GPU step's CholeskyQR3 against torch.linalg.qr on products of every spread: orthonormal to float64
    rounding (returned in float32) and the same span (projectors 10x closer than fp32 knows the product)."""
    grown = spread_columns(512, 8, 6, condition)
    Q = refined_basis(grown, orthonormal_basis_of(512, 8, 6, seed=1))
    assert Q.dtype == torch.float32 and Q.shape == grown.shape
    eye = torch.eye(8).expand(6, 8, 8)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=1e-6, rtol=0)
    householder = torch.linalg.qr(grown.double()).Q
    projector = Q.double() @ Q.double().mT
    # fp32 knows the product's weakest direction to ~1e-7 x condition; the completion moves it 10x less
    assert (projector - householder @ householder.mT).abs().max() < 1e-8 * condition


def test_refined_basis_stays_orthonormal_where_the_product_loses_rank():
    """A rank-deficient product (M Mᵀ U of rank 3 of 8, and a zero one): an orthonormal basis all the same (no NaN,
    no lost dimension) holding the product's directions; for the zero product, the previous basis; a product with
    a NaN keeps the previous basis too."""
    previous = orthonormal_basis_of(256, 8, 2, seed=2)
    low_rank = spread_columns(256, 8, 2, 10.0, seed=3)
    low_rank[..., 3:] = low_rank[..., :3] @ torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    zero = torch.zeros(1, 256, 8)
    for grown, basis in ((low_rank, previous), (zero, previous[:1])):
        Q = refined_basis(grown, basis)
        assert torch.isfinite(Q).all()
        torch.testing.assert_close(Q.mT @ Q, torch.eye(8).expand_as(Q.mT @ Q), atol=1e-6, rtol=0)
    Q = refined_basis(low_rank, previous)
    inside = torch.linalg.vector_norm(Q @ (Q.mT @ low_rank), dim=-2) / torch.linalg.vector_norm(low_rank, dim=-2)
    torch.testing.assert_close(inside, torch.ones_like(inside))  # the product's span lies in the basis
    torch.testing.assert_close(refined_basis(zero, previous[:1]).abs(), previous[:1].abs(), atol=1e-6, rtol=0)
    broken = low_rank.clone()
    broken[1, 0, 0] = float("nan")
    Q = refined_basis(broken, previous)
    assert torch.isfinite(Q[0]).all() and torch.equal(Q[1], previous[1])  # only the broken matrix keeps its basis


def test_spectra_tracks_the_spike_of_its_momentum():
    U_true, G = planted_spike(k=1)
    W = torch.nn.Parameter(torch.zeros(96, 160, dtype=torch.float64))
    opt = Spectra([W], lr=1e-3, rank_fraction=0.01)  # k = ceil(0.96) = 1
    for step in range(6):
        W.grad = G + 0.05 * torch.randn(96, 160, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        opt.step()
    basis = opt.state[W]["basis"]
    assert basis.shape == (96, 1)
    assert torch.linalg.svdvals(U_true.mT @ basis).min() > 0.99


def test_spectral_shaping_clips_the_spike_and_keeps_the_tail():
    _U_true, M = planted_spike()
    U = torch.linalg.svd(M, full_matrices=False).U[:, :3]
    shaped, tau = shape_spike(M, U, "clip")
    tail_projector = torch.eye(96, dtype=torch.float64) - U @ U.mT
    torch.testing.assert_close(tail_projector @ shaped, tail_projector @ M)  # the tail is untouched
    spike_values = torch.linalg.svdvals(U.mT @ shaped)
    assert spike_values.max() <= tau * (1 + 1e-9)
    assert torch.linalg.svdvals(M)[0] > 10 * tau  # the planted spike really was far above the tail
    removed, _ = shape_spike(M, U, "remove")
    assert torch.linalg.svdvals(U.mT @ removed).max() < 1e-10


def test_spectra_state_is_about_half_of_adamws_on_the_matrices():
    def state_bytes(opt, params):
        return sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values()
                   if isinstance(t, torch.Tensor))

    model = Qwen3(get_preset("tiny").config)
    model.init_weights(0)
    x, y = batch(0)
    x, y = x % 8192, y % 8192
    matrices = [p for g in matrix_param_groups(model, 0.1) if g["matrix"] for p in g["params"]]
    results = {}
    for name in ("adamw", "spectra"):
        opt = build(name, model)
        model.zero_grad()
        model(x, y)[1].backward()
        opt.step()
        results[name] = state_bytes(opt, matrices)
    assert results["spectra"] <= 0.52 * results["adamw"]


@pytest.mark.parametrize("shaping", ["clip", "remove", "scale"])
@pytest.mark.parametrize("refresh_interval", [1, 3])
def test_spectra_batched_path_equals_the_per_matrix_update(shaping, refresh_interval):
    # Same math, different order (||O|| from singular values, the low-rank term inside addmm): fp32 rounding only.
    # The toy model has wide and tall matrices and several of each shape; rank_fraction 0.2 gives k = 2-4.
    models = {impl: toy_model() for impl in ("foreach", "for-loop")}
    for impl, model in models.items():
        opt = make("spectra", model, impl=impl, shaping=shaping, refresh_interval=refresh_interval,
                   rank_fraction=0.2)
        run(model, opt, 6)
    for a, b in zip(params(models["foreach"]), params(models["for-loop"]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("timing, power_iters", [("before", 1), ("after", 1), ("before", 2), ("after", 2)])
@pytest.mark.parametrize("shaping", ["clip", "scale"])
def test_spectra_stacked_gpu_path_equals_the_per_matrix_update(monkeypatch, timing, power_iters, shaping):
    """The GPU's stacked "foreach" step (one batch per shape, multi-tensor writes), forced on the CPU here, against
    the per-matrix update: the same math in another order (fp32 rounding only), refresh every other step."""
    import lmopt.optim.spectra as spectra

    monkeypatch.setattr(spectra, "stacks", lambda params: bool(params))
    models = {impl: toy_model() for impl in ("foreach", "for-loop")}
    for impl, model in models.items():
        opt = make("spectra", model, impl=impl, shaping=shaping, refresh_interval=2, refresh_timing=timing,
                   power_iters=power_iters, rank_fraction=0.2)
        run(model, opt, 6)
    for a, b in zip(params(models["foreach"]), params(models["for-loop"]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_spectra_stacked_step_refreshes_alike_by_householder_or_cholesky_qr(monkeypatch):
    """The stacked step's two refresh QRs (the GPU row "spectra (householder qr)" against the default): the same
    weights to fp32 rounding (bases differ in column signs only, which the shaping ignores)."""
    import lmopt.optim.spectra as spectra

    monkeypatch.setattr(spectra, "stacks", lambda params: bool(params))
    models = {name: toy_model() for name in ("cholesky", "householder")}
    for name, model in models.items():
        opt = make("spectra", model, refresh_interval=1, rank_fraction=0.2)
        if name == "householder":
            opt.refine = spectra.householder_basis
        run(model, opt, 6)
    for a, b in zip(params(models["cholesky"]), params(models["householder"]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the stacked step is the GPU's")
@pytest.mark.parametrize("timing", ["before", "after"])
def test_spectra_stacked_step_on_a_gpu_equals_the_per_matrix_update(timing):
    """On a GPU, as it runs there (stacked, CholeskyQR3 in the refresh): the per-matrix update's weights after 6
    steps, wide and tall matrices, three of each shape, refreshed every other step."""
    weights = {}
    for impl in ("foreach", "for-loop"):
        torch.manual_seed(0)
        shapes = [(48, 96)] * 3 + [(96, 48)] * 3 + [(64, 64)] * 3
        weights[impl] = [torch.nn.Parameter(torch.randn(*shape, device="cuda")) for shape in shapes]
        opt = Spectra(weights[impl], lr=0.05, weight_decay=0.04, rank_fraction=0.1, refresh_interval=2,
                      refresh_timing=timing, impl=impl)
        for step in range(6):
            gen = torch.Generator().manual_seed(step)
            for w in weights[impl]:
                w.grad = torch.randn(w.shape, generator=gen).cuda()
            opt.step()
    for a, b in zip(weights["foreach"], weights["for-loop"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_spectra_stacked_gpu_path_keeps_bf16_weights_like_the_batched_path(monkeypatch):
    """bf16 matrices: the same decay (not rounded to bf16) and the update rounded once, as the batched path."""
    import lmopt.optim.spectra as spectra

    models = {}
    for name, stacked in (("stacked", True), ("batched", False)):
        monkeypatch.setattr(spectra, "stacks", lambda params, stacked=stacked: stacked and bool(params))
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(8, 24).bfloat16()) for _ in range(3)]
        opt = Spectra(weights, lr=0.05, weight_decay=0.04, rank_fraction=0.2)
        for step in range(5):
            torch.manual_seed(step)
            for w in weights:
                w.grad = torch.randn_like(w)
            opt.step()
        models[name] = weights
    for a, b in zip(models["stacked"], models["batched"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_asm_leaves_a_fused_qkv_matrix_alone_unless_told_and_says_so():
    from lmopt.optim.asm import asm_groups

    groups = [{"params": [torch.nn.Parameter(torch.zeros(6, 2))], "role": "attn_qkv", "weight_decay": 0.1},
              {"params": [torch.nn.Parameter(torch.zeros(2, 2))], "role": "attn_q", "weight_decay": 0.1}]
    with pytest.warns(UserWarning, match="fused_qkv='apply'"):
        skipped = asm_groups(groups, 7 / 6, 0.97, 1e-3, (0.95, 0.95))
    assert "lr" not in skipped[0] and skipped[1]["lr"] == pytest.approx(7e-3 / 6)
    applied = asm_groups(groups, 7 / 6, 0.97, 1e-3, (0.95, 0.95), fused_qkv="apply")
    assert applied[0]["lr"] == pytest.approx(7e-3 / 6) and applied[0]["weight_decay"] == 0.0
    assert applied[0]["betas"] == (0.97, 0.95)
    with pytest.raises(ValueError, match="fused_qkv"):
        ASM(groups, fused_qkv="v-too")


def test_spectra_refuses_a_spike_scale_that_would_grow_the_spike():
    W = torch.nn.Parameter(torch.zeros(4, 4))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="spike_scale"):
            Spectra([W], shaping="scale", spike_scale=bad)
    with pytest.raises(ValueError, match="refresh_timing"):
        Spectra([W], refresh_timing="lagged")
