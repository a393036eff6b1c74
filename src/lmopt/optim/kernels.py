"""Spectral kernels shared by the matrix optimizers: pure functions of tensors, tested directly.

- :func:`newton_schulz`: Muon's quintic Newton–Schulz orthogonalisation, batched over a leading dimension.
- :func:`power_iteration_sigma`: the largest singular value by warm-started power iteration (ASA).
- :func:`block_power_iteration`: a warm-started orthonormal basis of the top-k left singular subspace
  (Spectra): one ``M (Mᵀ U)`` product and a thin QR per iteration, never an SVD of the full matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Keller Jordan's quintic coefficients (https://kellerjordan.github.io/posts/muon/), as in torch.optim.Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(
    G: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately U Vᵀ for G = U S Vᵀ; G is (m, n) or (batch, m, n). Returns a tensor of ``dtype``.

    Each iteration X <- a X + (b A + c A²) X with A = X Xᵀ, on the wide orientation (rows <= columns), after
    scaling X to unit Frobenius norm. The op sequence mirrors ``torch.optim.Muon`` (addmm / baddbmm with the
    same beta/alpha), so one matrix gives the same bits as torch's, and a batch gives the same as a loop.
    """
    a, b, c = coefficients
    batched = G.dim() == 3
    X = G if batched else G.unsqueeze(0)
    X = X.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X if batched else X.squeeze(0)


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


def top_left_singular_basis(M: Tensor, k: int) -> Tensor:
    """The exact top-k left singular vectors of M (used once, to start the warm-started iteration)."""
    return torch.linalg.svd(M.to(_at_least_float32(M.dtype)), full_matrices=False).U[..., :k]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
