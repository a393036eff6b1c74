"""OrthoAdam: Adam in a fixed random orthogonal basis per tensor (Kaul et al. 2024, "From Attention to
Activation: Unravelling the Enigmas of Large Language Models").

Adam's per-coordinate normalisation favours the standard basis, which lets a few coordinates grow into
outlier features; doing Adam in a random basis spreads them. Per tensor w with last dimension n, a Haar-random
orthogonal Q (n x n), fixed for the whole run:

    g̃ = g Q                                  (rotate the gradient's last dimension)
    m̃ <- b1 m̃ + (1 - b1) g̃,   ṽ <- b2 ṽ + (1 - b2) g̃²
    w <- w (1 - lr λ) - lr (m̂̃ / (√v̂̃ + ε)) Qᵀ   (rotate the update back)

Our reading where the text is silent: the rotation acts on the last dimension of each tensor (the input
dimension of a linear layer, the model dimension of an embedding; a 1-D tensor is rotated whole), because a
rotation of the flattened tensor would need (m n)² entries. Q is drawn from ``torch.Generator`` seeded with
``seed + index`` (the parameter's position in the optimizer) and rebuilt, not stored: the state_dict holds
the seed, and a cache keeps the matrices between steps (its memory is reported by ``rotation_bytes``).

``rotation``: ``"haar"`` (default) is the dense Haar-random Q above: two (m x n) @ (n x n) products per tensor
and step, 4 m n² flops, most of OrthoAdam's step on a large embedding. ``"kronecker"`` (our structured
alternative, not in the paper) takes Q = A ⊗ B with A (n1 x n1) and B (n2 x n2) Haar-random and
n = n1 n2, n1 the largest divisor of n up to √n (768 = 24 x 32): x Q is Aᵀ X B for X the (n1 x n2) reshape of x,
4 m n (n1 + n2) flops (14x fewer for n = 768). Every coordinate is still spread over all n (a coordinate's image
is a row of A times a row of B, both dense), which is what the rotation is for; the basis is not Haar-distributed
over all of O(n). 1-D tensors and n without a divisor above 1 up to √n keep the dense Q (its cost is small there).

``rotation_dtype``: the precision of the two rotations (the moments and the parameters stay in theirs):
``"auto"`` (default: bf16 where the device multiplies it natively, a GPU or a CPU with AVX-512 BF16/AMX, for
fp32 or narrower parameters, else the parameter's precision: the choice Muon's ``ns_dtype="auto"`` makes),
``"param"`` (the parameter's own precision, as written above) or ``"bfloat16"``. bf16 products are ~3x faster
than fp32 ones on such a CPU, which brings the dense rotation's cost under Muon's. The rotated gradient and the
rotated-back update carry bf16's rounding (~4e-3 of a row's norm), which can flip the sign of Adam's direction on
rotated coordinates near zero; on cpu-full's held-out seeds the final loss is equivalent to the fp32 rotation's
within ±0.01 nats (Δ +0.0017 [−0.0023, +0.0057], results/cpu-full/variants.md, ortho-adam-rotation-bf16), the
evidence on which "auto" became the default. cpu-full's OrthoAdam row ran with fp32 rotations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.distributed import replicate_like
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import AdamFamily, adam_direction, adam_moments_, add_scaled_
from lmopt.optim.kernels import fast_matmul_dtype
from lmopt.optim.spec import OptionError, register_class

ROTATIONS = ("haar", "kronecker")
ROTATION_DTYPES = ("param", "bfloat16", "auto")


def rotation_dtype_for(name: str, param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision of a parameter's rotations for the option ``rotation_dtype`` (see the module docstring)."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto" and param_dtype.itemsize <= 4:
        return fast_matmul_dtype(device)
    return param_dtype


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def kronecker_sizes(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 n2 = n and n1 the largest divisor of n up to √n (1 when there is none above 1)."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def rotation_factors(n: int, seed: int, rotation: str, dim: int, dtype: torch.dtype = torch.float32
                     ) -> tuple[Tensor, ...]:
    """The rotation of a tensor's last dimension n: (Q,) dense, or (A, B) with Q = A ⊗ B ("kronecker")."""
    n1, n2 = kronecker_sizes(n)
    if rotation == "haar" or dim < 2 or n1 == 1:
        return (random_orthogonal(n, seed, dtype),)
    return random_orthogonal(n1, seed, dtype), random_orthogonal(n2, seed + 1, dtype)


def rotate(x: Tensor, factors: Sequence[Tensor], inverse: bool = False) -> Tensor:
    """x Q (or x Qᵀ with ``inverse``) along x's last dimension; Q dense, or A ⊗ B as two small products.

    A 1-D x is rotated as a row (which also works on sharded DTensors). For Q = A ⊗ B and X the (n1 x n2)
    reshape of x (row-major), x Q is the reshape of Aᵀ X B and x Qᵀ that of A X Bᵀ. The products run in the
    factors' precision; the result has x's."""
    dtype = x.dtype
    x = x.to(factors[0].dtype)
    if len(factors) == 1:
        Q = factors[0].mT if inverse else factors[0]
        return (x @ Q if x.dim() > 1 else (x.unsqueeze(0) @ Q).squeeze(0)).to(dtype)
    A, B = factors
    X = x.reshape(*x.shape[:-1], A.shape[0], B.shape[0])
    Y = A @ X @ B.mT if inverse else A.mT @ X @ B
    return Y.reshape(x.shape).to(dtype)


class OrthoAdam(AdamFamily):
    """OrthoAdam: AdamW in a fixed random orthogonal basis per tensor.

    The gradient's last dimension n is rotated by a Haar-random orthogonal Q (n x n, one per tensor, fixed for the
    run), Adam's moments and direction are computed in that basis, and the direction is rotated back by Qᵀ.

    Args:
        params: parameters or parameter groups (``lmopt.optim.role_param_groups(model, weight_decay)`` gives
            weight decay to matrices only).
        lr: learning rate (>= 0).
        betas: (β1, β2) of the first and second moments (in the rotated basis), each in [0, 1).
        eps: added to the square root of the bias-corrected second moment (> 0).
        weight_decay: decoupled weight decay λ (>= 0): the update subtracts lr·λ·w.
        seed: the seed of the rotations: a tensor's Q is drawn from a ``torch.Generator`` seeded with seed + its
            position among the optimizer's parameters; the state keeps that seed (``rotation_seed``), not Q.
        rotation: "haar" (a dense Haar-random Q per tensor, as the paper) or "kronecker" (Q = A ⊗ B, two small
            Haar-random factors: ~n / (n1 + n2) times fewer flops; see the module docstring).
        rotation_dtype: the precision of the rotations: "auto" (bf16 where the device multiplies it natively, for
            fp32 or narrower parameters, else the parameter's), "param" (the parameter's own) or "bfloat16".
        impl: "for-loop" (tensor by tensor) or "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop").
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, seed: int = 0, rotation: str = "haar", rotation_dtype: str = "auto",
                 impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        if rotation not in ROTATIONS:
            raise OptionError(f"Invalid rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
        if rotation_dtype not in ROTATION_DTYPES:
            raise OptionError(f"Invalid rotation_dtype {rotation_dtype!r}; choose one of {', '.join(ROTATION_DTYPES)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed,
                                      rotation=rotation, rotation_dtype=rotation_dtype), impl)
        self._rotations: dict[tuple, Tensor] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_rotations", {})  # a cache, not pickled: rebuilt from the seeds in the state

    def _param_index(self, state: dict) -> int:
        """The position of the parameter whose state is ``state`` (the step may hand ``tensors`` an fp32 working
        copy of an fp16 parameter, so the state identifies it)."""
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if self.state.get(q) is state:
                    return index
                index += 1
        raise KeyError("parameter not in optimizer")

    def rotation(self, p: Tensor, seed: int, rotation: str = "haar", rotation_dtype: str = "auto"
                 ) -> tuple[Tensor, ...]:
        """The factors of ``p``'s rotation (see :func:`rotation_factors`) in their precision, cached."""
        dtype = rotation_dtype_for(rotation_dtype, p.dtype, p.device)
        key = (seed, p.shape[-1], p.dim() > 1, rotation, p.device, dtype)
        if key not in self._rotations:
            factors = rotation_factors(p.shape[-1], seed, rotation, p.dim(), dtype)
            self._rotations[key] = tuple(f.to(p.device) for f in factors)
        return self._rotations[key]

    def rotation_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for factors in self._rotations.values() for f in factors)

    def tensors(self, p, state, group):
        if "rotation_seed" not in state:
            state["rotation_seed"] = group["seed"] + self._param_index(state)
        # a checkpoint made before rotation_dtype existed rotated in the parameter's precision
        factors = self.rotation(p, state["rotation_seed"], group.get("rotation", "haar"),
                                group.get("rotation_dtype", "param"))
        return [*super().tensors(p, state, group), *(replicate_like(f, p) for f in factors)]

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq, *factors = tensors
        lr, bias1, bias2 = scalars
        adam_moments_(exp_avg, exp_avg_sq, rotate(grad, factors), c["betas"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        decoupled_weight_decay_(p, lr, c["weight_decay"])
        add_scaled_(p, rotate(direction, factors, inverse=True), -lr)


register_class(
    OrthoAdam,
    name="ortho-adam",
    summary="OrthoAdam: AdamW in a fixed random orthogonal basis per tensor (spreads outlier coordinates)",
    source="Kaul et al. 2024, 'From Attention to Activation'",
    state_bytes_per_param=8.0,  # plus one n x n rotation per tensor (rebuilt from its seed, not saved)
    impls=ELEMENTWISE_IMPLS,
)
