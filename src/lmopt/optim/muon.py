"""Muon: momentum orthogonalised by Newton–Schulz (Keller Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/; Liu et al. 2025, "Muon is Scalable for LLM Training",
arXiv:2502.16982). The same algorithm as ``torch.optim.Muon`` (with ``ns_method="standard"``, tested step for
step), plus what lmopt needs:
Newton–Schulz batched over same-shape matrices on a GPU (one ``baddbmm`` chain per shape instead of one per
matrix); on a CPU one matrix per thread (:mod:`lmopt.optim.threads`: each matrix's momentum, Newton–Schulz and
update on one of torch's intra-op threads, each product single-threaded, where torch's Muon runs the matrices one
after another and each product on all threads: oneDNN's bf16 products of a few hundred rows do not scale past one
core, so this alone made one qwen3-134m layer's step 1.40x faster on this project's 2-core CPU in
results/step/muon-cpu-probe.md, with the same bits as the one-thread loop); a choice of its precision, and AdamW
for the parameters Muon does not own, in the same optimizer.

For each hidden matrix W (m x n), with momentum μ = 0.95:

    B <- μ B + g                              (torch: B.lerp_(g, 1 - μ), the same direction up to scale)
    B̃ = g + μ B  (Nesterov) or B
    O = NS5(B̃)                               (quintic Newton–Schulz, coefficients (3.4445, -4.7750, 2.0315))
    W <- W (1 - η λ) - η · adjust(m, n) · O

``adjust_lr``: ``"original"`` (Keller's sqrt(max(1, m/n))) or ``"match_rms_adamw"`` (Moonshot's
0.2 sqrt(max(m, n)), which gives O the RMS of a typical AdamW update so AdamW's lr and weight decay carry
over). lmopt's default and the benchmark's is ``"match_rms_adamw"``: one lr then serves the matrices and
the AdamW-driven embeddings and norms, so the lr sweep has one axis, as for every other optimizer.
``ns_dtype``: ``"auto"`` (lmopt's default: bfloat16 where the device multiplies bf16 natively, a GPU or a CPU
with AVX-512 BF16/AMX, else float32), ``"bfloat16"`` (Keller's and torch's everywhere), ``"float32"`` or
``"float64"`` (for tests). On a CPU without bf16 instructions torch emulates bf16 products and Newton–Schulz is
more than 10x slower than in fp32; fp32 is also closer to the exact iteration, so "auto" trades nothing.
``ns_coefficients``: Keller Jordan's triple for every iteration (default, as torch), ``"polar-express"`` (Amsel et
al. 2025: a minimax quintic per iteration, :func:`lmopt.optim.kernels.polar_express`: singular values end
closer to 1 for the same number of iterations), or a schedule of ``ns_steps`` triples.
``ns_method``: ``"gram"`` carries the iteration on the small side's Gram matrix
(:func:`lmopt.optim.kernels.newton_schulz_gram`) for the shapes where that takes fewer flops (the 2:1 attention and
4:1 MLP matrices; not square ones). In fp32 it is one run of iterations; in bf16 (torch's precision, and "auto" on a
GPU or a bf16-native CPU) rounding accumulates in a bf16 Gram matrix until it diverges (relative error 2.5e4 on real
gradients), so there the iterations run in segments whose product of a's stays within 64 (Keller's five: 3 + 2), X
re-formed between them (:func:`lmopt.optim.kernels.gram_segments`): its distance to the exact iteration is then the
standard bf16 iteration's (0.104 against 0.097 on nano's real gradients; tests/optim/test_newton_schulz.py). In fp32
it deviates from the exact iteration by ~1e-5 (Gaussian matrices) to 7e-4 (real gradients). Final loss on cpu-full's
held-out seeds: equivalent to the standard iteration's in fp32 (results/cpu-full/variants.md, muon-gram: Δ −0.0003
[−0.0024, +0.0017]) and in bf16 (muon-gram-bf16: Δ +0.0023 [−0.0032, +0.0078]). On one qwen3-134m layer's seven
matrices on this project's 2-core AVX-512/AMX CPU the bf16 segments made the step 1.19-1.39x faster than
torch.optim.Muon's over four runs of scripts/muon_cpu_probe.py (results/step/muon-cpu-probe.md holds the last).
``"standard"`` iterates on X for every shape (torch's algorithm). ``"auto"`` (lmopt's default): ``"gram"``, except
bf16 or fp16 Newton–Schulz on a GPU, which keeps the standard iteration until the segments are timed there (a GPU's
small products wait on launches, and the segments launch more of them; the GPU step table's ``muon (gram)`` row is
that measurement).
``impl``: ``"foreach"`` (torch operations: the momentum by ``lerp_``, Nesterov's combination by ``lerp``, the cast
to the Newton–Schulz precision, then ``mul_`` and ``add_`` for the update) or ``"fused"`` (our option, CPU only: two
C++ passes per matrix, one for the momentum, Nesterov's combination and the cast, one for the decayed update where
Newton–Schulz returns a contiguous matrix (the standard iteration's tall ones are a transposed view: ``mul_`` and
``add_``), from ``lmopt.optim.cpu_kernels``; the same formulas rounded as torch's operations round them, so the
same bits as ``"foreach"`` on this project's CPU (tested to fp32 rounding, bf16 Newton–Schulz included);
other devices, dtypes, ``ns_dtype="float64"`` and DTensor shards take ``"foreach"``). The step table's rows
``muon (fused)`` and ``lmopt muon (fused, matrices only)`` time it (results/step/).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common
from lmopt.optim.distributed import is_dtensor, like_shard, owner_map
from lmopt.optim.kernels import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    coefficient_schedule,
    fast_matmul_dtype,
    gram_is_cheaper,
    gram_segments,
    newton_schulz,
    newton_schulz_gram,
    polar_express,
)
from lmopt.optim.matrix import MatrixOptimizer, by_shape_indices, matrix_param_groups
from lmopt.optim.spec import OptionError, register_class
from lmopt.optim.threads import map_over_threads

ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
NAMED_COEFFICIENTS = ("polar-express",)
NS_METHODS = ("auto", "gram", "standard")
IMPLS = ("foreach", "fused")
FUSED_NS_DTYPES = (torch.float32, torch.bfloat16)


def ns_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The per-iteration (a, b, c) of ``ns_coefficients``: a triple, "polar-express", or a list of triples."""
    if isinstance(coefficients, str):
        if coefficients not in NAMED_COEFFICIENTS:
            raise OptionError(f"Invalid ns_coefficients {coefficients!r}: give an (a, b, c) triple, a list of "
                              f"ns_steps triples, or one of {', '.join(NAMED_COEFFICIENTS)}")
        return list(polar_express(steps))
    try:
        return coefficient_schedule(coefficients, steps)
    except (TypeError, ValueError) as e:
        raise OptionError(f"Invalid ns_coefficients: {e}") from None


def ns_dtype_for(name: str, device: torch.device) -> torch.dtype:
    return NS_DTYPES[name] or fast_matmul_dtype(device)


def uses_gram(method: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``ns_method`` takes the Gram-space iteration (where cheaper) for Newton–Schulz in ``dtype`` there."""
    if method == "auto":
        return dtype.itemsize >= 4 or device.type != "cuda"
    return method == "gram"


def adjusted_lr(lr: float, shape: tuple[int, ...], adjust: str) -> float:
    rows, cols = shape[:2]
    if adjust == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise OptionError(f"Invalid adjust_lr {adjust!r}; choose one of {', '.join(ADJUST_LR)}")


class Muon(MatrixOptimizer):
    """Muon: momentum orthogonalised by Newton–Schulz on hidden matrices, AdamW on the other parameters.

    Per matrix W (m x n): B <- B.lerp(g, 1 - momentum), O = NS(g.lerp(B, momentum)) with Nesterov (else NS(B)),
    W <- W (1 - lr λ) - lr · adjust(m, n) · O. The same algorithm as ``torch.optim.Muon``.

    Args:
        params: 2-D hidden matrices, or parameter groups from ``lmopt.optim.matrix_param_groups(model,
            weight_decay)`` (what ``lmopt.optim.build("muon", model)`` uses). A group with ``matrix=False`` runs the
            AdamW part (with ``adamw_betas`` and ``eps``); a group without the key is a matrix group, so passing
            tensors that are not 2-D directly (e.g. ``Muon(model.parameters())``) raises ``ValueError``. A 2-D
            tensor that looks like an embedding or output head warns in a matrix group.
        lr: learning rate (>= 0): the AdamW part's as given; a matrix's step multiplies it by ``adjust_lr``'s
            factor.
        weight_decay: decoupled weight decay λ (>= 0), with the unadjusted lr on matrices (W <- W (1 - lr λ)) and
            as AdamW's on the other parameters.
        momentum: μ of the momentum buffer, an EMA of the gradient (B <- μ B + (1 - μ) g), in [0, 1).
        nesterov: orthogonalise Nesterov's combination ``g.lerp(B, momentum)`` instead of the buffer B.
        ns_steps: the number of Newton–Schulz iterations.
        ns_coefficients: (a, b, c) of the quintic iteration X <- a X + (b A + c A²) X, A = X Xᵀ, for every
            iteration (Keller Jordan's by default); "polar-express" (a minimax triple per iteration, Amsel et al.
            2025); or a list of ``ns_steps`` triples.
        ns_eps: the floor of the Frobenius norm by which the matrix is divided before the iterations.
        ns_dtype: the precision of Newton–Schulz: "auto" (bfloat16 on a GPU or a CPU with native bf16 matrix
            products, else float32), "bfloat16" (Keller's and torch's), "float32" or "float64".
        ns_method: "gram" (the same iteration on the matrix's Gram matrix where that takes fewer flops, in
            segments re-formed from the matrix in bf16; else the standard one), "standard" (always iterate on the
            matrix, as torch does) or "auto" ("gram", except half-precision Newton–Schulz on a GPU: "standard").
        adjust_lr: the matrices' lr factor for an m x n matrix: "match_rms_adamw" (Moonshot's 0.2 sqrt(max(m, n)),
            which gives the update a typical AdamW update's RMS, so AdamW's lr and weight decay carry over) or
            "original" (Keller's sqrt(max(1, m/n))).
        adamw_betas: (β1, β2) of the AdamW part (groups with ``matrix=False``), each in [0, 1).
        eps: the AdamW part's epsilon, added to the square root of its second moment (> 0).
        impl: "foreach" (torch operations) or "fused" (the elementwise passes in C++ on a CPU; see the module
            docstring).
    """

    def __init__(self, params, lr: float = 5e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, ns_coefficients: tuple | str = NS_COEFFICIENTS,
                 ns_eps: float = NS_EPS, ns_dtype: str = "auto", ns_method: str = "auto",
                 adjust_lr: str = "match_rms_adamw",
                 adamw_betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, impl: str = "foreach") -> None:
        check_common(lr, eps, weight_decay)
        check_betas([momentum], "momentum")
        check_betas(adamw_betas, "adamw_betas")
        if adjust_lr not in ADJUST_LR:
            raise OptionError(f"Invalid adjust_lr {adjust_lr!r}; choose one of {', '.join(ADJUST_LR)}")
        if ns_dtype not in NS_DTYPES:
            raise OptionError(f"Invalid ns_dtype {ns_dtype!r}; choose one of {', '.join(NS_DTYPES)}")
        ns_schedule(ns_coefficients, ns_steps)
        if ns_method not in NS_METHODS:
            raise OptionError(f"Invalid ns_method {ns_method!r}; choose one of {', '.join(NS_METHODS)}")
        if impl not in IMPLS:
            raise OptionError(f"Invalid impl {impl!r}; choose one of {', '.join(IMPLS)}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_eps=ns_eps,
                                      ns_dtype=ns_dtype, ns_method=ns_method, adjust_lr=adjust_lr,
                                      adamw_betas=adamw_betas, eps=eps))
        self.impl = cpu_kernels.fused_or_fallback(impl, "Muon", fallback="foreach")

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        fused = self._fused_kernels(group, params, buffers)
        if params[0].device.type == "cpu" and not any(is_dtensor(p) for p in params):
            def update(i: int) -> None:  # one matrix from its gradient to its parameter, on one thread
                self._apply(group, params[i], self._newton_schulz(self._momentum(group, params[i], buffers[i], fused),
                                                                  group), fused)

            map_over_threads(update, range(len(params)), cost=lambda i: newton_schulz_cost(params[i].shape))
            return
        updates = [self._momentum(group, p, buf, fused) for p, buf in zip(params, buffers, strict=True)]
        for p, ortho in zip(params, self._orthogonalize(updates, group), strict=True):
            self._apply(group, p, ortho, fused)

    def _momentum(self, group: dict, p: Tensor, buf: Tensor, fused) -> Tensor:
        """B <- B.lerp(g, 1 - momentum); returns what Newton–Schulz takes: g.lerp(B, momentum) with Nesterov, else B
        (with ``fused``, computed in one pass straight into the Newton–Schulz precision)."""
        if fused is not None:
            update = torch.empty_like(p, dtype=ns_dtype_for(group["ns_dtype"], p.device),
                                      memory_format=torch.contiguous_format)
            fused.muon_momentum_(p.grad, buf, update, group["momentum"], group["nesterov"])
            return update
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _apply(self, group: dict, p: Tensor, ortho: Tensor, fused) -> None:
        """W <- W (1 - lr λ) - lr · adjust(m, n) · O."""
        decay, step = 1 - group["lr"] * group["weight_decay"], adjusted_lr(group["lr"], p.shape, group["adjust_lr"])
        if fused is not None and ortho.is_contiguous() and ortho.dtype in FUSED_NS_DTYPES:
            fused.muon_apply_(p, ortho, decay, step)
        else:
            p.mul_(decay)
            p.add_(like_shard(ortho, p), alpha=-step)

    def _fused_kernels(self, group: dict, params: list[Tensor], buffers: list[Tensor]):
        """The C++ kernels where ``impl="fused"`` and they take this group: contiguous fp32 CPU matrices, gradients
        and momenta, Newton–Schulz in fp32 or bf16; else None (torch's operations)."""
        if getattr(self, "impl", "foreach") != "fused" or not params:
            return None
        if ns_dtype_for(group["ns_dtype"], params[0].device) not in FUSED_NS_DTYPES:
            return None
        tensors = [t for p, buf in zip(params, buffers, strict=True) for t in (p, p.grad, buf)]
        if not all(t.dtype == torch.float32 for t in tensors):
            return None
        return cpu_kernels.kernels() if cpu_kernels.usable(*tensors, same_shape=False) else None

    def _newton_schulz(self, X: Tensor, group: dict) -> Tensor:
        """O = NS(X) with the group's settings: the Gram-space iteration where ``ns_method`` takes it and it is
        cheaper for X's shape, else the standard one; X is one matrix or a batch of one shape."""
        dtype = ns_dtype_for(group["ns_dtype"], X.device)
        schedule = ns_schedule(group["ns_coefficients"], group["ns_steps"])
        segments = [len(s) for s in gram_segments(schedule, dtype)]
        gram = uses_gram(group.get("ns_method", "auto"), dtype, X.device) and gram_is_cheaper(
            X.shape, len(schedule), segments)
        return (newton_schulz_gram if gram else newton_schulz)(X, len(schedule), schedule, group["ns_eps"], dtype)

    def _orthogonalize(self, updates: list[Tensor], group: dict) -> list[Tensor]:
        """Newton–Schulz of every update off the CPU path, as whole matrices: on one process batched per shape (on
        a GPU one batched product replaces many small launches); on FSDP2 shards each matrix is gathered and
        orthogonalised once, by its owner rank (see distributed.py)."""
        if any(is_dtensor(u) for u in updates):
            return [out[0] for out in owner_map(updates, lambda _, U: [self._newton_schulz(U, group).to(U.dtype)],
                                                lambda _, U: [U.shape])]
        result: list[Tensor] = [torch.empty(0)] * len(updates)
        for indices in by_shape_indices(updates):
            batch = self._newton_schulz(torch.stack([updates[i] for i in indices]), group)
            for i, ortho in zip(indices, batch, strict=True):
                result[i] = ortho
        return result


def newton_schulz_cost(shape: tuple[int, ...]) -> float:
    """Newton–Schulz's multiply-adds for a matrix up to a constant: m² n for m <= n (orders the CPU threads'
    work)."""
    m, n = sorted(shape[-2:])
    return float(m * m * n)


register_class(
    Muon,
    name="muon",
    summary="Muon: Nesterov momentum orthogonalised by Newton-Schulz on hidden matrices; AdamW elsewhere",
    source="Jordan et al. 2024 (kellerjordan.github.io/posts/muon); Liu et al. 2025, arXiv:2502.16982",
    groups=matrix_param_groups,
    state_bytes_per_param=4.0,
    kind="matrix",
    own_checks=("ns_coefficients",),
    impls=IMPLS,
)
