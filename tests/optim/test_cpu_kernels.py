"""The fused C++ kernels (lmopt.optim.cpu_kernels) against torch's arithmetic, on shapes that exercise every path:
more rows than one summation block, and rows whose variance estimate is clamped at the floor."""

import os
import sys
import threading

import pytest
import torch

from lmopt.optim import cpu_kernels

# a machine with a C++ compiler must build them (a failed build fails here); LMOPT_NO_CPU_KERNELS=1 opts out
pytestmark = pytest.mark.skipif(bool(os.environ.get("LMOPT_NO_CPU_KERNELS")), reason="LMOPT_NO_CPU_KERNELS is set")


def test_the_kernels_build_on_this_machine():
    assert cpu_kernels.kernels() is not None, cpu_kernels.unavailable_reason()


def test_a_stale_torch_build_lock_is_removed_under_the_os_lock(tmp_path):
    """A killed build leaves torch's ``lock`` file; with it there, torch's loader waits forever. lmopt's build
    removes it (with a warning) once it holds its own OS lock, and leaves other files alone."""
    (tmp_path / "lock").touch()
    (tmp_path / "main.cpp").touch()
    with pytest.warns(UserWarning, match="stale torch build lock"), cpu_kernels.stale_torch_lock_cleared(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert (tmp_path / "main.cpp").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_build_waits_for_the_first_instead_of_touching_its_lock(tmp_path):
    """While one build holds the OS lock (and torch's ``lock`` file, which is then live), another waits."""
    entered, release = threading.Event(), threading.Event()

    def first_build():
        with cpu_kernels.stale_torch_lock_cleared(tmp_path):
            (tmp_path / "lock").touch()  # torch's marker of a build in progress
            entered.set()
            release.wait(30)
            (tmp_path / "lock").unlink()  # a build that finishes removes its marker

    second_saw_lock = []

    def second_build():
        with cpu_kernels.stale_torch_lock_cleared(tmp_path):
            second_saw_lock.append((tmp_path / "lock").exists())

    first = threading.Thread(target=first_build)
    first.start()
    assert entered.wait(30)
    second = threading.Thread(target=second_build)
    second.start()
    second.join(0.5)
    assert second.is_alive() and (tmp_path / "lock").exists()  # waiting, the live marker untouched
    release.set()
    first.join(30)
    second.join(30)
    assert second_saw_lock == [False]


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


@pytest.mark.parametrize("name", ["lamb", "stable-adamw"])
def test_two_pass_adam_family_matches_its_eager_update(name):
    """LAMB (trust ratio) and StableAdamW (update clipping), on gradients that grow 3x per step: StableAdamW's
    RMS(g²/v̂) is then 1.2-1.4 after the first step, so its clip acts."""
    from lmopt.registry import OPTIMIZERS

    gen = torch.Generator().manual_seed(1)
    for shape in [(700, 33), (5001,)]:  # several parallel chunks, and a 1-D tensor
        w = torch.randn(shape, generator=gen)
        grads = [3**i * torch.randn(shape, generator=gen) for i in range(3)]
        results = []
        for impl in ("for-loop", "fused"):
            p = torch.nn.Parameter(w.clone())
            opt = OPTIMIZERS.get(name).cls([p], lr=0.05, weight_decay=0.1, impl=impl)
            for g in grads:
                p.grad = g.clone()
                opt.step()
            results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
        for eager, fused in zip(*results, strict=True):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        assert not torch.equal(results[1][0], w)


@pytest.mark.parametrize("name, options, second", [("lamb", {}, {}), ("lamb", {"trust_from": "previous"}, {}),
                                                   ("lamb", {}, {"trust_from": "previous"}),
                                                   ("stable-adamw", {}, {})])
def test_multi_tensor_steps_match_the_eager_update_tensor_by_tensor(name, options, second):
    """One C++ call steps every tensor (lamb_steps_, stable_adamw_steps_): each with its own group's lr and weight
    decay, fp32 and fp64 in the same call, a bf16 parameter (which the kernels do not take) beside them through the
    eager update, and a tensor without a gradient at one step (its state and step count stay behind); LAMB's two
    trust timings in two groups of one optimizer, with the previous step's norms compared too."""
    from lmopt.registry import OPTIMIZERS

    gen = torch.Generator().manual_seed(3)
    shapes_dtypes = [((700, 33), torch.float32), ((5001,), torch.float32), ((40, 9), torch.float64),
                     ((64, 32), torch.bfloat16), ((17,), torch.float32)]
    start = [torch.randn(shape, generator=gen).to(dtype) for shape, dtype in shapes_dtypes]
    grads = [[3**i * torch.randn(w.shape, generator=gen).to(w.dtype) for w in start] for i in range(4)]
    results = []
    for impl in ("for-loop", "fused"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        groups = [{"params": params[:2], "lr": 0.05, "weight_decay": 0.1},
                  {"params": params[2:], "lr": 0.02, "weight_decay": 0.0, **second}]
        opt = OPTIMIZERS.get(name).cls(groups, impl=impl, **options)
        for step, step_grads in enumerate(grads):
            for j, (p, g) in enumerate(zip(params, step_grads, strict=True)):
                p.grad = None if (step == 1 and j == 1) else g.clone()
            opt.step()
        results.append([(p.detach().clone(), *(opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq",
                                                                                   "trust_norms") if k in opt.state[p]))
                        for p in params])
    for eager, fused in zip(*results, strict=True):
        for a, b in zip(eager, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(r[0], w) for r, w in zip(results[1], start, strict=True))


def test_lamb_reuse_grad_is_the_same_step_with_the_direction_left_in_the_gradient():
    """``reuse_grad``: the same parameters and moments, bit for bit, over several steps and two groups (one with
    ``trust_from="previous"``, which keeps its gradient); afterwards a reused ``p.grad`` holds m̂ / (√v̂ + ε);
    without the option, and in other impls, the gradient is left as it was."""
    from lmopt.optim.elementwise import adam_direction, bias_corrections
    from lmopt.optim.lamb import LAMB

    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(shape, generator=gen) for shape in [(700, 33), (5001,), (40, 9)]]
    grads = [[3**i * torch.randn(w.shape, generator=gen) for w in start] for i in range(3)]
    runs = {}
    for impl, reuse in (("fused", False), ("fused", True), ("for-loop", True)):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        groups = [{"params": params[:2]}, {"params": params[2:], "trust_from": "previous"}]
        opt = LAMB(groups, lr=0.05, weight_decay=0.1, reuse_grad=reuse, impl=impl)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        runs[impl, reuse] = (params, opt)
    (kept, kept_opt), (reused, reused_opt) = runs["fused", False], runs["fused", True]
    for a, b in zip(kept, reused, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(kept_opt.state[a][k], reused_opt.state[b][k]) for k in ("exp_avg", "exp_avg_sq"))
    last = grads[-1]
    assert torch.equal(kept[0].grad, last[0]) and torch.equal(runs["for-loop", True][0][0].grad, last[0])
    assert torch.equal(reused[2].grad, last[2])  # trust_from="previous": one pass, nothing stored
    state = reused_opt.state[reused[0]]
    bias1, bias2 = bias_corrections((0.9, 0.999), state["step"])
    direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], bias1, bias2, 1e-6)
    assert not torch.equal(reused[0].grad, last[0])
    torch.testing.assert_close(reused[0].grad, direction, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reuse_grad", [False, True])
def test_lamb_without_weight_decay_reads_w_only_as_far_as_its_clipped_norm_needs(reuse_grad):
    """With λ = 0 the fused step reads w in pass 1 only until Σw² reaches max_trust² (then min(||w||, max_trust) is
    max_trust): the same step as the eager update for a tensor whose norm passes max_trust early, one whose norm
    stays below it (w read whole), one whose first 2^16 elements are 0 (the look stops there and pass 1 reads w),
    and with a λ > 0 group beside them (always read), over several steps, in fp32 and fp64."""
    from lmopt.optim.lamb import LAMB

    gen = torch.Generator().manual_seed(11)
    big = torch.randn(300, 257, generator=gen)  # ||w|| ≈ 278 > 10 after ~100 elements
    small = torch.randn(5000, generator=gen, dtype=torch.float64) * 0.05  # ||w|| ≈ 3.5 < 10: the whole of w
    late = torch.cat([torch.zeros(1 << 16), torch.randn(4000, generator=gen)])  # ||w|| ≈ 63, all past the look
    decayed = torch.randn(64, 33, generator=gen)
    start = [big, small, late, decayed]
    grads = [[3**i * torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in start] for i in range(3)]
    results = []
    for impl in ("for-loop", "fused"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        groups = [{"params": params[:3], "weight_decay": 0.0}, {"params": params[3:], "weight_decay": 0.1}]
        opt = LAMB(groups, lr=0.05, reuse_grad=reuse_grad, impl=impl)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params])
    for eager, fused in zip(*results, strict=True):
        for a, b in zip(eager, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(r[0], w) for r, w in zip(results[1], start, strict=True))
    # against the full read: weight decay 1e-300 is not 0, so pass 1 reads w, yet it is 0 in fp32 (the same
    # arithmetic): the fp32 tensor far above the clip takes the same bits either way
    same = []
    for weight_decay in (0.0, 1e-300):
        p = torch.nn.Parameter(big.clone())
        opt = LAMB([p], lr=0.05, weight_decay=weight_decay, reuse_grad=reuse_grad, impl="fused")
        for step_grads in grads:
            p.grad = step_grads[0].clone()
            opt.step()
        same.append(p.detach())
    assert torch.equal(*same)


@pytest.mark.parametrize("name, options", [("lamb", {}), ("lamb", {"reuse_grad": True}), ("stable-adamw", {}),
                                           ("msam", {})])
def test_streaming_kernels_match_eager_with_and_without_software_prefetch(name, options):
    """The streaming kernels walk 256-byte blocks inside their chunks and prefetch ahead: on sizes that end inside a
    block and span several chunks, in fp32 and fp64, the fused step matches the eager one, and with the prefetch
    off (``set_prefetch(False)``, which only moves the prefetched address) it gives the same bits."""
    from lmopt.registry import OPTIMIZERS

    kernels = cpu_kernels.kernels()
    if kernels is None:
        pytest.skip(cpu_kernels.unavailable_reason())
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(shape, generator=gen, dtype=dtype) for shape, dtype in
             [((700, 33), torch.float32), ((5001,), torch.float32), ((129, 31), torch.float64), ((3,), torch.float32)]]
    grads = [[3**i * torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in start] for i in range(3)]
    runs = []
    for impl, prefetch in (("fused", True), ("fused", False), ("for-loop", True)):
        kernels.set_prefetch(prefetch)
        try:
            params = [torch.nn.Parameter(w.clone()) for w in start]
            opt = OPTIMIZERS.get(name).cls(params, impl=impl, **options)
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                opt.step()
        finally:
            kernels.set_prefetch(True)
        runs.append([(p.detach(), *(t for t in opt.state[p].values() if torch.is_tensor(t))) for p in params])
    for on, off, eager in zip(*runs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
        for a, b in zip(on, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[0][0][0], start[0])


@pytest.mark.parametrize("gamma_from", ["current", "previous"])
@pytest.mark.parametrize("stability", ["cosine", "variance"])
def test_msam_passes_match_its_eager_update(stability, gamma_from):
    from lmopt.optim import build
    from tests.optim.infos import Battery

    results = []
    for impl in ("for-loop", "fused"):
        model = Battery()
        opt = build("msam", model, lr=0.01, weight_decay=0.1, impl=impl, stability=stability, gamma_from=gamma_from)
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) + 0.5 * p.detach()  # a stable part: gamma > 0
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"refresh_timing": "after"}, {"refresh_timing": "after", "power_iters": 2},
                                     {"refresh_interval": 3, "shaping": "remove"}])
def test_spectra_fused_passes_match_its_foreach_update(options):
    """Wide, tall and square matrices (each side of the kernels), 6 steps: every refresh path of the fused step."""
    from lmopt.optim.spectra import Spectra

    gen = torch.Generator().manual_seed(2)
    shapes = [(40, 150), (150, 40), (40, 150), (37, 37), (9, 70)]  # rows not a multiple of the 4-row groups
    weights = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) + 3 * torch.randn(shape[0], 1, generator=gen)
              * torch.randn(1, shape[1], generator=gen) for shape in shapes] for _ in range(6)]  # a rank-1 spike
    results = []
    for impl in ("foreach", "fused"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = Spectra(params, lr=0.05, rank_fraction=0.1, impl=impl, **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["momentum_buffer"].clone(), opt.state[p]["basis"].clone())
                        for p in params])
    for foreach, fused in zip(*results, strict=True):
        for a, b in zip(foreach, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(not torch.equal(p, w) for (p, _, _), w in zip(results[1], weights, strict=True))


@pytest.mark.parametrize("case", ["equal spikes", "zero gradient", "float64"])
def test_spectra_fused_step_matches_foreach_on_degenerate_spectra(case):
    """The fused step's Jacobi eigenproblem and LAPACK QR against foreach's torch.linalg calls where the spectrum is
    degenerate: two spikes of equal size (a repeated eigenvalue), an all-zero gradient after the first step (M only
    decays), and float64 matrices."""
    from lmopt.optim.spectra import Spectra

    gen = torch.Generator().manual_seed(5)
    dtype = torch.float64 if case == "float64" else torch.float32
    shapes = [(30, 90), (90, 30)]
    weights = [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]

    def gradient(shape, step):
        if case == "zero gradient" and step > 0:
            return torch.zeros(shape, dtype=dtype)
        u = torch.linalg.qr(torch.randn(shape[0], 2, generator=gen, dtype=dtype)).Q
        v = torch.linalg.qr(torch.randn(shape[1], 2, generator=gen, dtype=dtype)).Q
        return 5 * u @ v.mT + 0.1 * torch.randn(shape, generator=gen, dtype=dtype)  # two equal orthogonal spikes

    grads = [[gradient(shape, step) for shape in shapes] for step in range(4)]
    results = []
    for impl in ("foreach", "fused"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = Spectra(params, lr=0.05, rank_fraction=0.13, impl=impl)  # k = 4 of min(m, n) = 30
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        bases = [opt.state[p]["basis"] for p in params]
        results.append([(p.detach().clone(), U @ U.mT) for p, U in zip(params, bases, strict=True)])
    for (w_foreach, span_foreach), (w_fused, span_fused) in zip(*results, strict=True):
        torch.testing.assert_close(w_fused, w_foreach, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(span_fused, span_foreach, rtol=1e-4, atol=1e-4)


def test_spectra_step_kernel_refuses_inputs_that_do_not_fit():
    kernels = cpu_kernels.kernels()
    W, g = torch.zeros(8, 5), torch.zeros(8, 5)
    with pytest.raises(RuntimeError, match="must match"):
        kernels.spectra_step_(W, g, torch.zeros(5, 8), torch.zeros(5, 2), True, 0.1, 1, True, 0, 0.5, 0.01, 1.0)
    with pytest.raises(RuntimeError, match="expected"):
        kernels.spectra_step_(W, g, torch.zeros(8, 5), torch.zeros(8, 2), True, 0.1, 1, True, 0, 0.5, 0.01, 1.0)
    with pytest.raises(RuntimeError, match="shaping"):
        kernels.spectra_step_(W, g, torch.zeros(8, 5), torch.zeros(5, 2), True, 0.1, 1, True, 3, 0.5, 0.01, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [6, 11])  # 11: the momentum pass's 8 products in the update's loop, then 3 more
def test_spectra_kernels_match_torch_products(dtype, k):
    kernels = cpu_kernels.kernels()
    gen = torch.Generator().manual_seed(3)
    m, n = 301, 77  # 301 rows: more than one summation block per thread, and a partial 4-row group
    M = torch.randn(m, n, generator=gen, dtype=dtype)
    g = torch.randn(m, n, generator=gen, dtype=dtype)
    U, V = torch.randn(m, k, generator=gen, dtype=dtype), torch.randn(n, k, generator=gen, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    expected = M.lerp(g, 0.05)
    left, energy = kernels.spectra_momentum_(M, g, 0.05, U, True)
    torch.testing.assert_close(M, expected, **tol)
    torch.testing.assert_close(left, U.mT @ expected, **tol)
    assert energy.item() == pytest.approx(expected.double().square().sum().item(), rel=1e-5)
    torch.testing.assert_close(kernels.spectra_project(M, V.mT, False), M @ V, **tol)
    M2 = M.clone()
    right, energy = kernels.spectra_momentum_(M2, g, 0.05, V.mT, False)
    torch.testing.assert_close(M2, M.lerp(g, 0.05), **tol)
    torch.testing.assert_close(right, M2 @ V, **tol)
    assert energy.item() == pytest.approx(M2.double().square().sum().item(), rel=1e-5)
    torch.testing.assert_close(kernels.spectra_project(M, U, True), U.mT @ M, **tol)
    W = torch.randn(m, n, generator=gen, dtype=dtype)
    P, Q = torch.randn(m, k, generator=gen, dtype=dtype), torch.randn(k, n, generator=gen, dtype=dtype)
    for grow, product in [(0, None), (1, M @ Q.mT), (2, P.mT @ M)]:
        W2 = W.clone()
        out = kernels.spectra_apply_(W2, M, P, Q, 0.99, -0.3, grow)
        torch.testing.assert_close(W2, 0.99 * W - 0.3 * M + P @ Q, **tol)
        if product is not None:
            torch.testing.assert_close(out, product, **tol)


def test_spectra_kernels_refuse_factors_that_do_not_fit():
    kernels = cpu_kernels.kernels()
    M, g = torch.zeros(8, 5), torch.zeros(8, 5)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.spectra_momentum_(M, g, 0.1, torch.zeros(5, 2), True)  # a left factor needs M's 8 rows
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.spectra_project(M, torch.zeros(2, 8), False)
    with pytest.raises(RuntimeError, match="must match"):
        kernels.spectra_momentum_(M, torch.zeros(5, 8), 0.1, torch.zeros(8, 2), True)
    with pytest.raises(RuntimeError, match="share k"):
        kernels.spectra_apply_(M.clone(), M, torch.zeros(8, 2), torch.zeros(3, 5), 1.0, 0.0, 0)


def test_multi_tensor_steps_check_every_tensor_before_stepping_any():
    kernels = cpu_kernels.kernels()
    if kernels is None:
        pytest.skip(f"no C++ kernels here: {cpu_kernels.unavailable_reason()}")
    p, before = [torch.ones(4), torch.ones(3)], torch.ones(4)
    settings = torch.tensor([[1e-3, 0.9, 0.999, 0.1, 0.001, 1e-6, 0.01, 10.0]] * 2, dtype=torch.float64)
    moments = [[torch.zeros(4), torch.zeros(3)] for _ in range(2)]
    with pytest.raises(RuntimeError, match="of its parameter's dtype and size"):  # the second gradient is fp64
        kernels.lamb_steps_(p, [torch.ones(4), torch.ones(3).double()], *moments, [], settings, False)
    assert torch.equal(p[0], before)
    with pytest.raises(RuntimeError, match="tensors x 7"):
        kernels.stable_adamw_steps_(p, [torch.ones(4), torch.ones(3)], *moments, settings)


class CountingKernels:
    """The compiled kernels with a count of each call, to show which path a step took."""

    def __init__(self, kernels) -> None:
        self.kernels, self.calls, self.lock = kernels, {}, threading.Lock()

    def __getattr__(self, name: str):
        function = getattr(self.kernels, name)

        def counted(*args):
            with self.lock:  # Muon calls the kernels from several threads on a CPU
                self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args)

        return counted


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_method", ["auto", "standard"])
def test_muon_fused_passes_match_its_foreach_update(monkeypatch, ns_dtype, nesterov, ns_method):
    """Wide, tall and square matrices, 5 steps with weight decay: the parameters and momenta agree to fp32
    rounding, bf16 Newton–Schulz included (the momentum pass casts torch's values, so its input is torch's), and
    the fused steps ran the kernels (the standard iteration's tall result, a transposed view, takes torch's
    update)."""
    from lmopt.optim.muon import Muon

    counting = CountingKernels(cpu_kernels.kernels())
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: counting)
    gen = torch.Generator().manual_seed(3)
    shapes = [(24, 96), (96, 24), (33, 33), (48, 96)]
    weights = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(5)]
    results = []
    for impl in ("foreach", "fused"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = Muon(params, lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_dtype=ns_dtype, ns_method=ns_method,
                   impl=impl)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in params])
    for foreach, fused in zip(*results, strict=True):
        for a, b in zip(foreach, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, w) for (p, _), w in zip(results[1], weights, strict=True))
    contiguous = 4 if ns_method == "auto" else 3  # gram_is_cheaper: the 4:1 and 2:1 shapes; standard: not (96, 24)
    assert counting.calls == {"muon_momentum_": 5 * 4, "muon_apply_": 5 * contiguous}


def test_muon_momentum_kernel_is_torchs_lerp_and_cast():
    """The momentum pass's outputs are torch's lerp_, lerp and .to (torch's weights, 1 - μ rounded from double;
    bf16 ties to even, NaN kept) but where a compiler contracts a multiply-add differently: at most 1e-4 of the
    entries (a weight off by an ulp moves ~10%)."""
    k = cpu_kernels.kernels()
    gen = torch.Generator().manual_seed(4)
    g, buf = torch.randn(300, 257, generator=gen), torch.randn(300, 257, generator=gen)
    g[0, :3] = torch.tensor([float("nan"), 1.0 + 2**-8, 1.0 + 3 * 2**-8])  # a NaN and two exact bf16 ties
    buf[0, :3] = g[0, :3]

    def differing(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() != b.float()) & ~(torch.isnan(a.float()) & torch.isnan(b.float()))).float().mean().item()

    for momentum, nesterov in [(0.95, True), (0.9, False), (0.3, True)]:
        expected_buf = buf.clone().lerp_(g, 1 - momentum)
        expected = g.lerp(expected_buf, momentum) if nesterov else expected_buf
        for dtype in (torch.float32, torch.bfloat16):
            stepped, out = buf.clone(), torch.empty(g.shape, dtype=dtype)
            k.muon_momentum_(g, stepped, out, momentum, nesterov)
            assert differing(stepped, expected_buf) <= 1e-4 and differing(out, expected.to(dtype)) <= 1e-4
            torch.testing.assert_close(out, expected.to(dtype), rtol=2**-7, atol=0, equal_nan=True)
    out = torch.empty(g.shape, dtype=torch.bfloat16)
    k.muon_momentum_(g, buf.clone(), out, 0.95, True)
    assert torch.isnan(out[0, 0]) and out[0, 1].item() == 1.0 and out[0, 2].item() == 1.0 + 4 * 2**-8
    p = torch.randn(300, 257, generator=gen)
    expected_p = p.clone().mul_(0.998).add_(out, alpha=-0.03)
    k.muon_apply_(p, out, 0.998, 0.03)
    assert differing(p, expected_p) <= 1e-4
    torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-6, equal_nan=True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        k.muon_momentum_(g, buf, torch.empty(g.shape, dtype=torch.float16), 0.95, True)
