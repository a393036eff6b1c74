"""Muon's orthogonalisation: Polar Express coefficients, and every Newton–Schulz setting against the exact polar
factor U Vᵀ of real gradients (a nano model on the Brown corpus), so a faster setting is known to give the same
update."""

import math

import numpy as np
import pytest
import torch

from lmopt.analysis.collect import hidden_matrix_gradients
from lmopt.optim import Muon
from lmopt.optim.kernels import (
    GRAM_GROWTH_LIMIT,
    NS_COEFFICIENTS,
    gram_is_cheaper,
    gram_segments,
    minimax_odd_quintic,
    newton_schulz,
    newton_schulz_gram,
    polar_express,
)
from lmopt.optim.muon import ns_schedule
from lmopt.optim.spec import OptionError
from lmopt.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def quintic(coefficients, x):
    a, b, c = coefficients
    return a * x + b * x**3 + c * x**5


@pytest.mark.parametrize(("lo", "hi"), [(0.02, 1.0), (0.3, 1.2), (0.88, 1.12)])
def test_the_minimax_quintic_equioscillates(lo, hi):
    a, b, c, err = minimax_odd_quintic(lo, hi)
    x = np.linspace(lo, hi, 200_001)
    deviation = quintic((a, b, c), x) - 1
    assert np.abs(deviation).max() == pytest.approx(err, rel=1e-6)
    # four alternating extremes: at lo (below 1), an interior max, an interior min, hi (above 1)
    assert deviation[0] == pytest.approx(-err, rel=1e-6) and deviation[-1] == pytest.approx(err, rel=1e-6)
    assert deviation.max() == pytest.approx(err, rel=1e-6) and deviation.min() == pytest.approx(-err, rel=1e-6)
    # no other odd quintic does better: perturbing the coefficients raises the max error
    gen = np.random.default_rng(0)
    for _ in range(50):
        other = np.array([a, b, c]) + gen.normal(scale=1e-3, size=3) * np.abs([a, b, c])
        assert np.abs(quintic(other, x) - 1).max() >= err * (1 - 1e-9)


def band(schedule, lo=1e-3, hi=1.0):
    """The image of [lo, hi] under the composed quintics."""
    x = np.linspace(lo, hi, 100_001)
    for coefficients in schedule:
        x = quintic(coefficients, x)
    return x.min(), x.max()


def test_polar_express_maps_the_interval_closer_to_one_than_kellers_coefficients():
    for steps in (4, 5, 6):
        ours = band(polar_express(steps))
        keller = band([NS_COEFFICIENTS] * steps)
        assert max(1 - ours[0], ours[1] - 1) < max(1 - keller[0], keller[1] - 1)
    low, high = band(polar_express(5))
    assert low > 0.85 and high < 1.15
    # a singular value slightly above 1 (rounding) does not blow up
    assert band(polar_express(5), 1.0, 1.01)[1] < 1.2


def test_ns_coefficients_options_are_checked():
    assert len(ns_schedule("polar-express", 4)) == 4
    assert ns_schedule(NS_COEFFICIENTS, 3) == [NS_COEFFICIENTS] * 3
    assert ns_schedule([list(t) for t in polar_express(5)], 5) == list(polar_express(5))
    for bad in ("keller", [(1.0, 2.0, 3.0)] * 2, (1.0, 2.0)):
        with pytest.raises(OptionError, match="ns_coefficients"):
            Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_coefficients=bad)


@pytest.fixture(scope="module")
def real_gradients():
    """The hidden matrices' gradients of a nano model after 8 AdamW steps on Brown."""
    return hidden_matrix_gradients("nano", steps=8)


def polar_error(G: torch.Tensor, O: torch.Tensor) -> float:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    return ((O.double() - polar).norm() / polar.norm()).item()


SETTINGS = {  # name: (dtype, coefficient schedule)
    "bf16 (torch.optim.Muon)": (torch.bfloat16, NS_COEFFICIENTS),
    "fp32 (auto on this CPU)": (torch.float32, NS_COEFFICIENTS),
    "fp32 polar-express": (torch.float32, polar_express(5)),
}


def test_every_newton_schulz_setting_gives_the_polar_factor_of_real_gradients(real_gradients):
    """Equal results: the fp32 iteration is the bf16 one without its rounding (so at least as close to U Vᵀ), and
    Polar Express is closer still. Measured: ||O - U Vᵀ|| / ||U Vᵀ|| is 0.18-0.82 for Keller's five steps in either
    precision (these gradients have many singular values below 1e-3 of the largest, which no five-step iteration
    lifts to 1), 0.09-0.74 for Polar Express; fp32 is at or below bf16 on every matrix."""
    errors = {name: [] for name in SETTINGS}
    to_exact = []
    for G in real_gradients:
        exact_iteration = newton_schulz(G, coefficients=NS_COEFFICIENTS, dtype=torch.float64)
        for name, (dtype, coefficients) in SETTINGS.items():
            O = newton_schulz(G.float(), coefficients=coefficients, dtype=dtype)
            errors[name].append(polar_error(G, O))
            if name.startswith("fp32 (auto"):
                to_exact.append(((O.double() - exact_iteration).norm() / exact_iteration.norm()).item())
    bf16, fp32, express = (np.array(errors[name]) for name in SETTINGS)
    assert max(to_exact) < 1e-4  # fp32 is the iteration itself; bf16 rounds it
    assert np.all(fp32 <= bf16 + 0.01)
    assert np.all(express < fp32)


def test_muon_auto_precision_is_fp32_on_a_cpu_without_bf16_products(real_gradients):
    from lmopt.optim.kernels import fast_matmul_dtype

    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert fast_matmul_dtype(torch.device("cpu")) == expected
    W = torch.nn.Parameter(torch.zeros_like(real_gradients[0], dtype=torch.float32))
    auto, explicit = Muon([W], lr=1.0, weight_decay=0.0), Muon([W], lr=1.0, weight_decay=0.0,
                                                                 ns_dtype={torch.float32: "float32",
                                                                           torch.bfloat16: "bfloat16"}[expected])
    steps = []
    for opt in (auto, explicit):
        with torch.no_grad():
            W.zero_()
        W.grad = real_gradients[0].float()
        opt.step()
        steps.append(W.detach().clone())
    assert torch.equal(steps[0], steps[1])


def test_every_form_of_ns_coefficients_passes_the_registry_and_a_train_config():
    from lmopt.model import get_preset
    from lmopt.model.qwen3 import Qwen3
    from lmopt.optim import build

    model = Qwen3(get_preset("nano").config)
    for value in ("polar-express", [list(t) for t in polar_express(5)], list(NS_COEFFICIENTS)):
        opt = build("muon", model, ns_coefficients=value)
        assert len(ns_schedule(opt.param_groups[0]["ns_coefficients"], 5)) == 5
    cfg = TrainConfig(preset="nano", data="brown", optimizer="muon", optim={"ns_coefficients": "polar-express"})
    assert cfg.validate().optim["ns_coefficients"] == "polar-express"
    with pytest.raises(OptionError, match="ns_coefficients"):
        build("muon", model, ns_coefficients="keller")


@pytest.mark.parametrize("coefficients", [NS_COEFFICIENTS, polar_express(5)], ids=["keller", "polar-express"])
def test_the_gram_space_iteration_is_the_same_iteration(real_gradients, coefficients):
    """Exactly the plain iteration in float64; in fp32, its rounding on real gradients stays far below the bf16
    rounding torch.optim.Muon accepts. Measured (relative to float64): ~1e-5 on Gaussian matrices; on these
    gradients 5e-5 to 7e-4 (1.5e-3 with Polar Express, whose large first coefficients amplify it, on an AVX2 CPU;
    3.0e-3 on an AVX-512/AMX one), against 2e-2 to 2e-1 for bf16 and ~1e-5 for the plain fp32 iteration. Batched,
    tall and wide alike."""
    for G in real_gradients:
        plain = newton_schulz(G, coefficients=coefficients, dtype=torch.float64)
        exact = newton_schulz_gram(G, coefficients=coefficients, dtype=torch.float64)
        assert ((exact - plain).norm() / plain.norm()).item() < 1e-10
        fp32 = newton_schulz_gram(G.float(), coefficients=coefficients, dtype=torch.float32).double()
        bf16 = newton_schulz(G.float(), coefficients=coefficients, dtype=torch.bfloat16).double()
        gram_error = ((fp32 - plain).norm() / plain.norm()).item()
        assert gram_error < 5e-3 and gram_error < ((bf16 - plain).norm() / plain.norm()).item() / 10
    batch = torch.stack([real_gradients[0], real_gradients[0].flip(0)])
    assert torch.allclose(newton_schulz_gram(batch, dtype=torch.float64)[1],
                          newton_schulz_gram(batch[1], dtype=torch.float64), atol=1e-12)


def test_gram_segments_bound_the_growth_of_each_run_in_bf16_only():
    keller = [NS_COEFFICIENTS] * 5
    assert [len(s) for s in gram_segments(keller, torch.bfloat16)] == [3, 2]  # a³ = 41 <= 64 < a⁴
    assert [len(s) for s in gram_segments(keller, torch.float32)] == [5]
    assert [len(s) for s in gram_segments(keller, torch.bfloat16, growth_limit=math.inf)] == [5]
    assert [len(s) for s in gram_segments(keller, torch.bfloat16, growth_limit=1.0)] == [1] * 5
    for segment in gram_segments(polar_express(5), torch.bfloat16):
        assert len(segment) == 1 or math.prod(abs(a) for a, _, _ in segment) <= GRAM_GROWTH_LIMIT[torch.bfloat16]
    assert sum(map(len, gram_segments(polar_express(5), torch.bfloat16))) == 5


@pytest.mark.parametrize("growth_limit", [1.0, 41.0, 64.0, math.inf])
def test_the_gram_space_iteration_in_segments_is_the_same_iteration(real_gradients, growth_limit):
    """Any segmentation is the plain iteration exactly (float64), contiguous in G's layout (a tall G's last product is
    taken transposed), batched as matrix by matrix; in bf16 a batch gives
    its matrices' results up to bf16 rounding (the GPU path stacks same-shape matrices)."""
    assert any(G.size(0) > G.size(1) for G in real_gradients)
    for G in real_gradients:
        plain = newton_schulz(G, dtype=torch.float64)
        segmented = newton_schulz_gram(G, dtype=torch.float64, growth_limit=growth_limit)
        assert ((segmented - plain).norm() / plain.norm()).item() < 1e-10
        assert segmented.is_contiguous()  # tall or wide: in G's own layout, cheap to add to the parameter
    batch = torch.stack([real_gradients[0], real_gradients[0].flip(0)]).float()
    together = newton_schulz_gram(batch, dtype=torch.bfloat16, growth_limit=growth_limit).double()
    for i in range(2):
        alone = newton_schulz_gram(batch[i], dtype=torch.bfloat16, growth_limit=growth_limit).double()
        if growth_limit <= 64:
            assert ((together[i] - alone).norm() / alone.norm()).item() < 0.05
    with pytest.raises(ValueError, match="add up"):
        gram_is_cheaper((512, 2048), 5, [3, 3])


@pytest.mark.parametrize("coefficients", [NS_COEFFICIENTS, polar_express(5)], ids=["keller", "polar-express"])
def test_the_bf16_gram_space_iteration_keeps_the_bf16_iterations_accuracy(real_gradients, coefficients):
    """Equal results for lmopt's bf16 default: in segments (Keller's five: 3 + 2), the Gram-space iteration in bf16 is
    as far from the exact (float64) iteration as torch's bf16 iteration is, and as close to U Vᵀ. Measured on these
    gradients (Keller's / Polar Express): mean distance to the exact iteration 0.104 / 0.148 against 0.097 / 0.129
    for the standard bf16 iteration, at most 0.04 / 0.05 more on any matrix; to U Vᵀ at most 0.006 / 0.011 more.
    Without restarts (one segment) it diverges: the reason for the segments."""
    to_exact = {"standard": [], "gram": [], "one segment": []}
    to_polar = {"standard": [], "gram": []}
    for G in real_gradients:
        exact = newton_schulz(G, coefficients=coefficients, dtype=torch.float64)
        outputs = {"standard": newton_schulz(G.float(), coefficients=coefficients, dtype=torch.bfloat16),
                   "gram": newton_schulz_gram(G.float(), coefficients=coefficients, dtype=torch.bfloat16),
                   "one segment": newton_schulz_gram(G.float(), coefficients=coefficients, dtype=torch.bfloat16,
                                                     growth_limit=math.inf)}
        for name, O in outputs.items():
            to_exact[name].append(((O.double() - exact).norm() / exact.norm()).item())
            if name in to_polar:
                to_polar[name].append(polar_error(G, O))
    standard, gram = np.array(to_exact["standard"]), np.array(to_exact["gram"])
    assert gram.mean() <= 1.25 * standard.mean()
    assert np.all(gram <= standard + 0.08)
    assert np.all(np.array(to_polar["gram"]) <= np.array(to_polar["standard"]) + 0.02)
    assert max(to_exact["one segment"]) > 1.0


def test_muon_auto_takes_the_gram_space_except_half_precision_on_a_gpu():
    from lmopt.optim.muon import uses_gram

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert uses_gram("auto", torch.bfloat16, cpu) and uses_gram("auto", torch.float32, gpu)
    assert not uses_gram("auto", torch.bfloat16, gpu) and uses_gram("gram", torch.bfloat16, gpu)
    assert not uses_gram("standard", torch.float32, cpu)
    assert Muon([torch.nn.Parameter(torch.zeros(4, 4))]).defaults["ns_method"] == "auto"


def test_muon_takes_the_gram_space_by_default_where_it_is_cheaper():
    assert gram_is_cheaper((2048, 512)) and gram_is_cheaper((512, 2048)) and not gram_is_cheaper((512, 512))
    assert gram_is_cheaper((1024, 512), 5, [3, 2]) and not gram_is_cheaper((512, 512), 5, [3, 2])
    gen = torch.Generator().manual_seed(0)
    grads = {"mlp": torch.randn(256, 64, generator=gen), "square": torch.randn(64, 64, generator=gen)}
    for ns_dtype, tolerance in (("float32", 1e-5), ("bfloat16", 0.08)):  # relative Frobenius distance
        for name, g in grads.items():
            steps = {}
            for method in ("standard", "gram", None):  # None: Muon's default
                W = torch.nn.Parameter(torch.zeros_like(g))
                W.grad = g.clone()
                options = {} if method is None else {"ns_method": method}
                Muon([W], lr=1.0, weight_decay=0.0, ns_dtype=ns_dtype, **options).step()
                steps[method] = W.detach().clone()
            assert torch.equal(steps[None], steps["gram"])  # Newton–Schulz takes the Gram space by default
            if name == "square":  # not cheaper: the plain iteration, bit for bit
                assert torch.equal(steps["standard"], steps["gram"])
            else:
                assert not torch.equal(steps["standard"], steps["gram"])
                distance = (steps["gram"] - steps["standard"]).norm() / steps["standard"].norm()
                assert distance < tolerance
    with pytest.raises(OptionError, match="ns_method"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_method="fast")
