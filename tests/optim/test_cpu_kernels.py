"""The fused C++ kernels (lmopt.optim.cpu_kernels) against torch's arithmetic, on shapes that exercise every path:
more rows than one summation block, and rows whose variance estimate is clamped at the floor."""

import os

import pytest
import torch

from lmopt.optim import cpu_kernels

# a machine with a C++ compiler must build them (a failed build fails here); LMOPT_NO_CPU_KERNELS=1 opts out
pytestmark = pytest.mark.skipif(bool(os.environ.get("LMOPT_NO_CPU_KERNELS")), reason="LMOPT_NO_CPU_KERNELS is set")


def test_the_kernels_build_on_this_machine():
    assert cpu_kernels.kernels() is not None, cpu_kernels.unavailable_reason()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adafactor_passes_match_torch(dtype):
    kernels = cpu_kernels.kernels()
    gen = torch.Generator().manual_seed(0)
    rows, cols = 600, 70  # 600 rows: two full blocks of 256 and a partial one
    p = torch.randn(rows, cols, generator=gen, dtype=dtype)
    g = torch.randn(rows, cols, generator=gen, dtype=dtype)
    row_sq, col_sq, p_sq = kernels.adafactor_stats(p, g)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(row_sq, g.double().square().sum(1), rtol=rtol, atol=0)
    torch.testing.assert_close(col_sq, g.double().square().sum(0), rtol=rtol, atol=0)
    torch.testing.assert_close(p_sq, p.double().square().sum(), rtol=rtol, atol=0)

    row_factor = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    row_factor[::7] = 1e-9  # these rows fall below the floor and take the clamped path
    col = torch.rand(cols, generator=gen, dtype=torch.float64) + 0.5
    floor = 1e-6
    variance = (row_factor[:, None] * col[None, :]).clamp(min=floor)
    expected_sum = (g.double().square() / variance).sum().item()
    assert kernels.adafactor_inverse_variance_sum(g, row_factor, col, floor) == pytest.approx(expected_sum, rel=rtol)
    expected = (p.double() * 0.99 - 0.01 * g.double() / variance.sqrt()).to(dtype)
    kernels.adafactor_update(p, g, row_factor, col, floor, 0.99, 0.01)
    torch.testing.assert_close(p, expected, rtol=rtol, atol=rtol)


def test_only_contiguous_cpu_matrices_of_one_float_dtype_are_taken():
    a = torch.zeros(4, 3)
    assert cpu_kernels.usable(a, torch.zeros(4, 3))
    assert not cpu_kernels.usable(a, torch.zeros(3, 4).mT)  # not contiguous
    assert not cpu_kernels.usable(torch.zeros(4), torch.zeros(4))  # 1-D
    assert not cpu_kernels.usable(a.bfloat16(), a.bfloat16())
    assert not cpu_kernels.usable(a, a.double())


def test_lamb_passes_match_its_eager_update():
    from lmopt.optim.lamb import LAMB

    gen = torch.Generator().manual_seed(1)
    for shape in [(700, 33), (5001,)]:  # several parallel chunks, and a 1-D tensor
        w = torch.randn(shape, generator=gen)
        grads = [torch.randn(shape, generator=gen) for _ in range(3)]
        results = []
        for impl in ("for-loop", "fused"):
            p = torch.nn.Parameter(w.clone())
            opt = LAMB([p], lr=0.05, weight_decay=0.1, impl=impl)
            for g in grads:
                p.grad = g.clone()
                opt.step()
            results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
        for eager, fused in zip(*results, strict=True):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        assert not torch.equal(results[1][0], w)


@pytest.mark.parametrize("stability", ["cosine", "variance"])
def test_msam_passes_match_its_eager_update(stability):
    from lmopt.optim import build
    from tests.optim.infos import Battery

    results = []
    for impl in ("for-loop", "fused"):
        model = Battery()
        opt = build("msam", model, lr=0.01, weight_decay=0.1, impl=impl, stability=stability)
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) + 0.5 * p.detach()  # a stable part: gamma > 0
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
