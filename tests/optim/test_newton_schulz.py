"""Muon's orthogonalisation: Polar Express coefficients, and every Newton–Schulz setting against the exact polar
factor U Vᵀ of real gradients (a nano model on the Brown corpus), so a faster setting is known to give the same
update."""

import numpy as np
import pytest
import torch

from lmopt.analysis.collect import hidden_matrix_gradients
from lmopt.optim import Muon
from lmopt.optim.kernels import (
    NS_COEFFICIENTS,
    gram_is_cheaper,
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


def test_muon_takes_the_gram_space_by_default_where_it_is_cheaper_and_in_fp32():
    assert gram_is_cheaper((2048, 512)) and gram_is_cheaper((512, 2048)) and not gram_is_cheaper((512, 512))
    gen = torch.Generator().manual_seed(0)
    grads = {"mlp": torch.randn(256, 64, generator=gen), "square": torch.randn(64, 64, generator=gen)}
    for name, g in grads.items():
        steps = {}
        for method in ("standard", "gram", None):  # None: Muon's default
            W = torch.nn.Parameter(torch.zeros_like(g))
            W.grad = g.clone()
            options = {} if method is None else {"ns_method": method}
            Muon([W], lr=1.0, weight_decay=0.0, ns_dtype="float32", **options).step()
            steps[method] = W.detach().clone()
        assert torch.equal(steps[None], steps["gram"])  # fp32 Newton–Schulz takes the Gram space by default
        if name == "square":  # not cheaper: the plain iteration, bit for bit
            assert torch.equal(steps["standard"], steps["gram"])
        else:
            assert not torch.equal(steps["standard"], steps["gram"])
            torch.testing.assert_close(steps["gram"], steps["standard"], rtol=0, atol=1e-5)
    with pytest.raises(OptionError, match="ns_method"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_method="fast")
