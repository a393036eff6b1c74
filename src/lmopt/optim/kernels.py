"""Spectral kernels shared by the matrix optimizers: pure functions of tensors, tested directly.

- :func:`newton_schulz`: Muon's quintic Newton–Schulz orthogonalisation, batched over a leading dimension, with
  one coefficient triple for every iteration (Keller Jordan's) or a schedule of triples (:func:`polar_express`);
  :func:`newton_schulz_gram`: the same iteration on the small side's Gram matrix (fewer flops for wide matrices),
  in bf16 in segments re-formed from X (:func:`gram_segments`).
- :func:`polar_express`: per-iteration minimax coefficients (Amsel et al. 2025), derived here by a Remez exchange.
- :func:`fast_matmul_dtype`: the precision in which this device multiplies matrices fastest (for ``"auto"``).
- :func:`power_iteration_sigma`: the largest singular value by warm-started power iteration (ASA).
- :func:`block_power_iteration`: a warm-started orthonormal basis of the top-k left singular subspace
  (Spectra): one ``M (Mᵀ U)`` product and a thin QR per iteration, never an SVD of the full matrix.
- :func:`refined_basis`: the orthonormal basis of one such iteration without a Householder QR (shifted CholeskyQR3
  in float64, from the product and the previous basis): a few batched calls for any number of matrices, no sync.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

# Keller Jordan's quintic coefficients (https://kellerjordan.github.io/posts/muon/), as in torch.optim.Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


Coefficients = tuple[float, float, float]


def newton_schulz(
    G: Tensor,
    steps: int = NS_STEPS,
    coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately U Vᵀ for G = U S Vᵀ; G is (m, n) or (batch, m, n). Returns a tensor of ``dtype``.

    Each iteration X <- a X + (b A + c A²) X with A = X Xᵀ, on the wide orientation (rows <= columns), after
    scaling X to unit Frobenius norm. ``coefficients`` is one (a, b, c) for every iteration, or a schedule of
    ``steps`` triples (one per iteration). The op sequence mirrors ``torch.optim.Muon`` (addmm / baddbmm with
    the same beta/alpha), so one matrix gives the same bits as torch's, and a batch gives the same as a loop.
    """
    schedule = coefficient_schedule(coefficients, steps)

    def iterate(X: Tensor) -> Tensor:
        for a, b, c in schedule:
            A = X @ X.mT
            B = _addmm(A, A, A, beta=b, alpha=c)
            X = _addmm(X, B, X, beta=a)
        return X

    return _on_wide_unit_matrices(G, eps, dtype, iterate)


# The most a run of Gram-space iterations may amplify the smallest singular values (the product of its a's, the
# condition number of its Q) before X is re-formed, per precision. bf16 holds ~3 significant digits: Keller's three
# iterations (a³ = 41) keep the rounding of the standard iteration, four (a⁴ = 141) diverge on real gradients
# (tests/optim/test_newton_schulz.py). fp32 and wider: one run of any length.
GRAM_GROWTH_LIMIT = {torch.bfloat16: 64.0, torch.float16: 64.0}


def gram_segments(schedule: Sequence[Coefficients], dtype: torch.dtype,
                  growth_limit: float | None = None) -> list[list[Coefficients]]:
    """``schedule`` cut into runs whose product of |a| stays within ``growth_limit`` (default: the dtype's
    :data:`GRAM_GROWTH_LIMIT`, unbounded for fp32 and wider); a run always holds at least one iteration."""
    limit = GRAM_GROWTH_LIMIT.get(dtype, math.inf) if growth_limit is None else growth_limit
    segments: list[list[Coefficients]] = [[]]
    growth = 1.0
    for triple in schedule:
        if segments[-1] and growth * abs(triple[0]) > limit:
            segments.append([])
            growth = 1.0
        segments[-1].append(triple)
        growth *= abs(triple[0])
    return segments


def newton_schulz_gram(
    G: Tensor,
    steps: int = NS_STEPS,
    coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.float32,
    growth_limit: float | None = None,
) -> Tensor:
    """:func:`newton_schulz`'s iteration carried on the small side's Gram matrix; G is (m, n) or (batch, m, n).

    With X₀ the normalised wide matrix (m <= n) and A₀ = X₀ X₀ᵀ (m x m), every iterate is X_k = Q_k X₀ with Q_k a
    polynomial in A₀, so everything commutes: P_k = a I + b A_k + c A_k², Q_{k+1} = P_k Q_k, A_{k+1} = P_k A_k P_k,
    and X₀ is touched twice (A₀ and the final Q X₀) instead of twice per iteration. About 4 m³ per iteration
    against 2 m² n + m³: fewer flops when n >= 2-4 m (:func:`gram_is_cheaper`).

    Rounding accumulates in A instead of being recomputed from X, and Q's condition number grows with the
    iterations' a's; in bf16 the iterations run in segments (:func:`gram_segments`): after each, X <- Q X and A is
    re-formed from X (one restart for Keller's five steps: 3 + 2), which keeps bf16's error at the standard bf16
    iteration's. ``growth_limit=math.inf`` runs one segment in any precision (it diverges in bf16). A tall G's
    last product is taken as X₀ᵀ Qᵀ = (Q X₀)ᵀ, so the result is contiguous in G's own layout (adding a transposed
    view to a parameter took 3.6x as long as a contiguous one on a CPU).
    """
    schedule = coefficient_schedule(coefficients, steps)

    def iterate(X: Tensor, tall: bool) -> Tensor:
        segments = gram_segments(schedule, X.dtype, growth_limit)
        for s, segment in enumerate(segments):
            A = X @ X.mT
            Q = None
            for i, (a, b, c) in enumerate(segment):
                P = _addmm(A, A, A, beta=b, alpha=c)
                P.diagonal(dim1=-2, dim2=-1).add_(a)
                Q = P if Q is None else P @ Q
                if i < len(segment) - 1:
                    A = P @ A @ P
            if tall and s == len(segments) - 1:
                return X.mT @ Q.mT
            X = Q @ X
        return X

    return _on_wide_unit_matrices(G, eps, dtype, iterate, oriented=True)


def _addmm(C: Tensor, A: Tensor, B: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """beta C + alpha A B: ``addmm`` for one matrix, ``baddbmm`` for a batch (on a CPU a batch of one in bf16 is
    markedly slower than the 2-D product)."""
    return (torch.addmm if C.dim() == 2 else torch.baddbmm)(C, A, B, beta=beta, alpha=alpha)


def _on_wide_unit_matrices(G: Tensor, eps: float, dtype: torch.dtype, iterate: Callable[..., Tensor],
                           oriented: bool = False) -> Tensor:
    """``iterate`` applied to G, one (rows <= columns) matrix or a batch of them, in ``dtype``, each scaled to unit
    Frobenius norm (at least ``eps`` before scaling); the result in G's shape and orientation. ``oriented``:
    ``iterate(X, tall)`` returns its result in G's orientation itself."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if oriented:
        return iterate(X, tall)
    X = iterate(X)
    return X.mT if tall else X


def gram_is_cheaper(shape: Sequence[int], steps: int = NS_STEPS, segments: Sequence[int] | None = None) -> bool:
    """Whether :func:`newton_schulz_gram` takes fewer multiply-adds than the plain iteration for this shape, with
    its iterations in ``segments`` (lengths; default one segment of ``steps``)."""
    if segments is not None and sum(segments) != steps:
        raise ValueError(f"segments {list(segments)} do not add up to {steps} steps")
    m, n = sorted(shape[-2:])
    plain = steps * (2 * m * m * n + m**3)
    gram = sum(2 * m * m * n + (4 * length - 3) * m**3 for length in (segments or [steps]))
    return gram < plain


def coefficient_schedule(coefficients: Coefficients | Sequence[Coefficients], steps: int) -> list[Coefficients]:
    """``steps`` (a, b, c) triples: one triple repeated, or a schedule of exactly ``steps`` triples."""
    if len(coefficients) == 3 and all(isinstance(v, int | float) for v in coefficients):
        return [tuple(coefficients)] * steps  # type: ignore[list-item]
    schedule = [tuple(float(v) for v in triple) for triple in coefficients]  # type: ignore[union-attr]
    if len(schedule) != steps or any(len(t) != 3 for t in schedule):
        raise ValueError(f"a coefficient schedule needs {steps} (a, b, c) triples, one per iteration; "
                         f"got {coefficients!r}")
    return schedule  # type: ignore[return-value]


# --- Polar Express: the best odd quintic for each iteration ---------------------------------------------------------


def minimax_odd_quintic(lo: float, hi: float, iters: int = 100) -> tuple[float, float, float, float]:
    """(a, b, c, E): the odd quintic p(x) = a x + b x³ + c x⁵ with the least max |1 - p(x)| = E on [lo, hi].

    Remez exchange: the optimum equioscillates, p = 1 - E, 1 + E, 1 - E, 1 + E at lo < x1 < x2 < hi, where x1
    and x2 are p's critical points (roots of p'(x) = a + 3b x² + 5c x⁴, a quadratic in x²). Solve the 4 x 4
    linear system for (a, b, c, E) at the current points, move x1, x2 to the new critical points, repeat.
    """
    x1, x2 = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
    signs = np.array([-1.0, 1.0, -1.0, 1.0])
    for _ in range(iters):
        x = np.array([lo, x1, x2, hi])
        a, b, c, err = np.linalg.solve(np.stack([x, x**3, x**5, -signs], axis=1), np.ones(4))
        root = np.sqrt(9 * b * b - 20 * a * c)
        new1, new2 = np.sqrt(np.sort([(-3 * b - root) / (10 * c), (-3 * b + root) / (10 * c)]))
        if abs(new1 - x1) + abs(new2 - x2) <= 1e-14 * hi:
            break
        x1, x2 = new1, new2
    return float(a), float(b), float(c), float(err)


@functools.cache
def polar_express(steps: int = NS_STEPS, lower: float = 1e-3, cushion: float = 0.02,
                  safety: float = 1.01) -> tuple[Coefficients, ...]:
    """Polar Express coefficients (Amsel, Persson, Musco & Gower 2025, "The Polar Express", arXiv:2505.16932).

    Greedy minimax composition: singular values of the normalised input lie in [lower, 1]; each iteration uses
    the odd quintic that best maps the current interval [l, u] to 1 (:func:`minimax_odd_quintic`), and the next
    interval is that polynomial's image. Our choices, after the paper's: the fit's lower end is at least
    ``cushion`` x u (for a tiny l the optimal quintic has a huge slope and no room for rounding), and every
    iteration but the last is evaluated at x / ``safety`` so that singular values rounded slightly above u do
    not grow. Derived here, not copied: with these defaults the five triples are within a few percent of the
    paper's published ones after the first (ours 7.63, -21.46, 15.46; theirs 8.29, -23.60, 17.30, from another
    cushion); the test checks the equioscillation and the interval each iteration reaches.
    """
    l, u = lower, 1.0
    schedule = []
    for t in range(steps):
        a, b, c, _ = minimax_odd_quintic(max(l, cushion * u), u)
        s = 1.0 if t == steps - 1 else safety
        a, b, c = a / s, b / s**3, c / s**5
        grid = np.linspace(l, u * safety, 20001)
        image = a * grid + b * grid**3 + c * grid**5
        l, u = float(image.min()), float(image.max())
        schedule.append((a, b, c))
    return tuple(schedule)


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device multiplies it natively (CUDA; a CPU with AVX-512 BF16 or AMX), else float32.

    On a CPU without bf16 instructions (AVX2 only), torch emulates bf16 matrix products: Newton–Schulz on one
    qwen3-134m layer's matrices is then more than 10x slower in bf16 than in fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            return torch.float32
    return torch.float32


def power_iteration_sigma(W: Tensor, v: Tensor, iters: int = 1) -> tuple[Tensor, Tensor]:
    """Estimate ||W||₂ from a warm-start right vector ``v`` (unit norm); returns (sigma, new v).

    v <- normalize(Wᵀ W v) ``iters`` times; sigma = ||W v||. Cheap (two matrix-vector products per iteration)
    and, warm-started from the previous step's v while W changes slowly, accurate after a few steps.
    """
    W = W.to(_at_least_float32(W.dtype))
    v = v.to(W.dtype)
    for _ in range(iters):
        v = W.mT @ (W @ v)
        v = v / v.norm().clamp(min=1e-30)
    return (W @ v).norm(), v


def block_power_iteration(M: Tensor, U: Tensor, iters: int = 1) -> Tensor:
    """Refine an orthonormal (m, k) basis U toward the top-k left singular subspace of M (m, n).

    U <- qr(M (Mᵀ U)).Q, ``iters`` times. Works on a batch (b, m, n) / (b, m, k) too.
    """
    for _ in range(iters):
        U = torch.linalg.qr(M @ (M.mT @ U)).Q
    return U


def refined_basis(grown: Tensor, previous: Tensor, completion: float | None = None) -> Tensor:
    """An orthonormal basis of span(M Mᵀ U) from grown = M Mᵀ U and previous = U (batched (b, r, k) or (r, k)),
    by shifted CholeskyQR3 in float64 (Fukaya et al. 2020) instead of a Householder QR.

    On a GPU ``torch.linalg.qr`` runs a kernel per matrix (84 for qwen3-134m: 3.8 ms of Spectra's 12.8 ms step on
    an H100); this is three k x k Gram matrices, Cholesky factors and triangular solves for the whole batch.
    The columns are first scaled to unit Frobenius norm and ``completion`` x U added (default: a tenth of the
    product's dtype's ε, 1.2e-8 for float32; 1e-14 for float64), i.e. one step of the power iteration on
    M Mᵀ + δ I: the same top-k subspace, a change in the span 10x below the rounding of the product itself. So the
    product never loses rank: where M's rank is below k the missing directions come from the product's rounding
    noise or, for a zero product, from the previous basis, orthonormal either way (a Householder QR fills them
    arbitrarily too), and no Cholesky factor fails: the completion bounds the condition number by
    ~sqrt(k) / completion, which the shifted first pass brings down to a few (it reaches ~1e15 in float64); the two
    plain passes then make the columns orthonormal to float64 rounding. A matrix whose product is not finite
    keeps its previous basis. The signs of the columns may differ from a Householder QR's (the spike's shaping
    does not depend on them). Returns ``grown``'s dtype.
    """
    if completion is None:
        completion = max(0.1 * torch.finfo(grown.dtype).eps, 1e-14)
    A = grown.double()
    A = A / torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True).clamp(min=1e-300)
    A = A + completion * previous.double()
    rows, k = A.shape[-2:]
    shift = 11 * (rows * k + k * (k + 1)) * torch.finfo(torch.float64).eps / 2 * A.square().sum((-2, -1), keepdim=True)
    identity = torch.eye(k, dtype=A.dtype, device=A.device)
    for shifted in (True, False, False):
        gram = A.mT @ A + shift * identity if shifted else A.mT @ A
        R, _ = torch.linalg.cholesky_ex(gram, upper=True)
        A = torch.linalg.solve_triangular(R, A, upper=True, left=False)  # A R⁻¹
    finite = torch.isfinite(A).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    return torch.where(finite, A, previous.double()).to(grown.dtype)


def top_left_singular_basis(M: Tensor, k: int) -> Tensor:
    """The exact top-k left singular vectors of M (used once, to start the warm-started iteration)."""
    return torch.linalg.svd(M.to(_at_least_float32(M.dtype)), full_matrices=False).U[..., :k]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
