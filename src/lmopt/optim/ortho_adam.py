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
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmopt.optim.common import check_betas, check_common, decoupled_weight_decay_
from lmopt.optim.distributed import replicate_like
from lmopt.optim.elementwise import IMPLS as ELEMENTWISE_IMPLS
from lmopt.optim.elementwise import AdamFamily, adam_direction, adam_moments_, add_scaled_
from lmopt.optim.spec import register_class


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def rotate(x: Tensor, Q: Tensor) -> Tensor:
    """x Q along x's last dimension (a 1-D x as a row, which also works on sharded DTensors)."""
    return x @ Q if x.dim() > 1 else (x.unsqueeze(0) @ Q).squeeze(0)


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
        impl: "for-loop" (tensor by tensor) or "compiled" (the whole step as one ``torch.compile``'d function; where
            compilation is unavailable it warns once and runs "for-loop").
    """

    def __init__(self, params, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, seed: int = 0, impl: str = "for-loop") -> None:
        check_common(lr, eps, weight_decay)
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed), impl)
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

    def rotation(self, p: Tensor, seed: int) -> Tensor:
        key = (seed, p.shape[-1], p.device, p.dtype)
        if key not in self._rotations:
            self._rotations[key] = random_orthogonal(p.shape[-1], seed, p.dtype).to(p.device)
        return self._rotations[key]

    def rotation_bytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self._rotations.values())

    def tensors(self, p, state, group):
        if "rotation_seed" not in state:
            state["rotation_seed"] = group["seed"] + self._param_index(state)
        return [*super().tensors(p, state, group), replicate_like(self.rotation(p, state["rotation_seed"]), p)]

    @staticmethod
    def update(p, grad, tensors, scalars, c):
        exp_avg, exp_avg_sq, Q = tensors
        lr, bias1, bias2 = scalars
        adam_moments_(exp_avg, exp_avg_sq, rotate(grad, Q), c["betas"])
        direction = adam_direction(exp_avg, exp_avg_sq, bias1, bias2, c["eps"])
        decoupled_weight_decay_(p, lr, c["weight_decay"])
        add_scaled_(p, rotate(direction, Q.mT), -lr)


register_class(
    OrthoAdam,
    name="ortho-adam",
    summary="OrthoAdam: AdamW in a fixed random orthogonal basis per tensor (spreads outlier coordinates)",
    source="Kaul et al. 2024, 'From Attention to Activation'",
    state_bytes_per_param=8.0,  # plus one n x n rotation per tensor (rebuilt from its seed, not saved)
    impls=ELEMENTWISE_IMPLS,
)
