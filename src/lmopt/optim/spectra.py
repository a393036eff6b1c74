"""Spectra: spike-aware spectral shaping of the momentum (Huang et al. 2025, "Spectra: Rethinking Optimizers for
LLMs Under Spectral Anisotropy"; we have the abstract and figure captions).

What the paper says: gradients have "a low-rank spike + smooth tail" spectrum, "the spike occupying only about
1.5% of directions yet dominating optimizer statistics"; second-moment normalisation lets the spike contract
tail updates, and Newton–Schulz (Muon) "severely disrupts tail directions" (Fig. 5) and amplifies noise.
Spectra "suppresses the dominant low rank spike subspace without amplifying the noise sensitive spectral
tail", "tracks the spike subspace via cached, warm started power iteration and applies low rank spectral
shaping", and "cuts optimizer state memory by 49.25%" against AdamW.

What we build from that, per hidden matrix W (m x n; we work on the orientation with r = min(m, n) rows):

    M <- β M + (1 - β) g                               one momentum buffer, β = 0.95; no second moment
    k = ceil(rank_fraction · r)                        rank_fraction = 0.015, "about 1.5% of directions"
    U <- qr(M (Mᵀ U)).Q                                one warm-started block power iteration (r x k basis),
                                                       every ``refresh_interval`` steps; U starts as M's exact
                                                       top-k left singular vectors at the first step
    C = Uᵀ M = A diag(s) Bᵀ                            the spike's coordinates and its k singular values
    τ = ||M - U C||_F / sqrt(r - k)                    the tail's RMS singular value
    O = M + U A diag(shape(s) - s) Bᵀ                  shape the spike, leave the tail as it is
    W <- W (1 - η λ) - η · rms_target · O / RMS(O)     rms_target = 0.2: an AdamW-sized step, so AdamW's lr carries over

``refresh_timing``: ``"before"`` (default) refines U with this step's M and then shapes M with it; ``"after"``
shapes M with the cached U (refined at the previous refresh) and refines U for the next step from the
coordinates it already has: one product over M fewer per refresh (C = UᵀM is not recomputed), at the price of a
basis one refresh old. The paper's "cached, warm started power iteration" fits either reading.

``shaping``: ``"clip"`` (default) shape(s) = min(s, τ): the spike is brought down to the tail's scale;
``"remove"``: shape(s) = 0, the spike directions are dropped; ``"scale"``: shape(s) = spike_scale · s.
The tail is never whitened (unlike Newton–Schulz). Embeddings, head and norms go to AdamW. State per matrix:
M (m n) and U (r k), i.e. (1 + ~rank_fraction) / 2 of AdamW's two buffers: 0.5075x for the default fraction.

Low-precision parameters (bf16, fp16): M is kept in the parameter's dtype (as Muon's momentum), U in fp32; the
basis, the spike's coordinates and the shaped update are computed from an fp32 copy of M, and the update is
rounded to the parameter's dtype once, when it is added.

Our choices where the text is silent: the EMA form of M; the tail scale τ; the initial exact SVD (once per
matrix, to warm-start); RMS normalisation of the result; decoupled weight decay with the lr.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmopt.optim import cpu_kernels
from lmopt.optim.common import check_betas, check_common
from lmopt.optim.distributed import is_dtensor, like_shard, owner_map
from lmopt.optim.kernels import block_power_iteration, refined_basis, top_left_singular_basis
from lmopt.optim.matrix import MatrixOptimizer, by_shape_indices, matrix_param_groups
from lmopt.optim.spec import OptionError, register_class

SHAPINGS = ("clip", "remove", "scale")
REFRESH_TIMINGS = ("before", "after")
IMPLS = ("foreach", "fused", "for-loop")


def spike_rank(rows: int, cols: int, rank_fraction: float) -> int:
    return max(1, math.ceil(rank_fraction * min(rows, cols)))


def tail_scale(M: Tensor, C: Tensor, k: int) -> Tensor:
    """τ = RMS singular value of M's tail = sqrt((||M||² - ||UᵀM||²) / (r - k)); +inf when there is no tail."""
    r = min(M.shape[-2:])
    if r <= k:
        return torch.full((), math.inf, device=M.device)
    tail_energy = (M.square().sum() - C.square().sum()).clamp(min=0)
    return (tail_energy / (r - k)).sqrt()


def shape_spike(M: Tensor, U: Tensor, shaping: str = "clip", spike_scale: float = 0.5) -> tuple[Tensor, Tensor]:
    """M with its top-k singular values (in the subspace U, r x k, of M's r <= c rows) reshaped.

    Returns (shaped M, τ). Directions orthogonal to U (the tail) pass unchanged.
    """
    C = U.mT @ M  # (k, c): the spike's coordinates
    A, s, Bt = torch.linalg.svd(C, full_matrices=False)  # C = A diag(s) Bᵀ
    tau = tail_scale(M, C, U.shape[-1])
    target = shape_singular_values(s, tau, shaping, spike_scale)
    return M + (U @ A) @ ((target - s).unsqueeze(-1) * Bt), tau


def shape_singular_values(s: Tensor, tau: Tensor, shaping: str, spike_scale: float) -> Tensor:
    """shape(s): the spike's new singular values (``tau`` broadcasts against ``s``)."""
    if shaping == "clip":
        return torch.minimum(s, tau)
    if shaping == "remove":
        return torch.zeros_like(s)
    if shaping == "scale":
        return s * spike_scale
    raise OptionError(f"Invalid shaping {shaping!r}; choose one of {', '.join(SHAPINGS)}")


class Spectra(MatrixOptimizer):
    """Spectra: momentum whose top singular ("spike") directions are shaped, on hidden matrices; AdamW elsewhere.

    Per matrix: an EMA momentum M; a warm-started orthonormal basis U of its top k = ceil(rank_fraction · min(m, n))
    left singular directions (at least 1); the spike's k singular values reshaped, the tail left as it is; the
    result O scaled to RMS ``rms_target``: W <- W (1 - lr λ) - lr · rms_target · O / RMS(O). See the module
    docstring for the details.

    Args:
        params: 2-D hidden matrices, or parameter groups from ``lmopt.optim.matrix_param_groups(model,
            weight_decay)`` (what ``lmopt.optim.build("spectra", model)`` uses). A group with ``matrix=False`` runs the
            AdamW part (with ``adamw_betas`` and ``eps``); a group without the key is a matrix group, so passing
            tensors that are not 2-D directly (e.g. ``Spectra(model.parameters())``) raises ``ValueError``. A 2-D
            tensor that looks like an embedding or output head warns in a matrix group.
        lr: learning rate (>= 0), of the matrices' step and of the AdamW part.
        weight_decay: decoupled weight decay λ (>= 0): W <- W (1 - lr λ) on matrices, AdamW's on the other
            parameters.
        momentum: β of the momentum M <- β M + (1 - β) g, in [0, 1).
        rank_fraction: the spike's share of a matrix's min(m, n) singular directions, in (0, 1].
        power_iters: block power iterations U <- qr(M (Mᵀ U)).Q per refresh (>= 1).
        refresh_interval: refresh U every this many steps (>= 1); at its first step U is M's exact top-k left
            singular vectors (one SVD per matrix).
        refresh_timing: "before" (refine U with this step's M, then shape) or "after" (shape with the cached U,
            then refine it for the next step: one product over M fewer per refresh).
        shaping: the spike's new singular values: "clip" (min(s, τ), τ the tail's RMS singular value), "remove"
            (0: the spike directions are dropped) or "scale" (spike_scale · s).
        spike_scale: the factor of ``shaping="scale"``, in [0, 1] (unused by the other shapings).
        rms_target: the RMS of a matrix's step before lr and weight decay (> 0; the default gives an AdamW-sized
            step, so AdamW's lr carries over).
        adamw_betas: (β1, β2) of the AdamW part (groups with ``matrix=False``), each in [0, 1).
        eps: the AdamW part's epsilon, added to the square root of its second moment (> 0).
        impl: "foreach" (the large products per matrix, the k-sized work batched per shape, no SVD after the
            first step; on a GPU each shape's matrices stacked into one batch, see :meth:`_stacked_step`),
            "fused" (the same on CPU float32/float64 matrices, one C++ call for all of them, a matrix per
            thread, see :meth:`_fused_step`; the kernels are built on first use, ~1-2 min once per machine,
            and where they cannot be built "foreach" is used after a warning; other matrices take "foreach")
            or "for-loop" (the update as written, one whole matrix at a time). FSDP2-sharded
            (DTensor) parameters always take "for-loop".
    """

    def __init__(self, params, lr: float = 5e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 rank_fraction: float = 0.015, power_iters: int = 1, refresh_interval: int = 1,
                 refresh_timing: str = "before", shaping: str = "clip", spike_scale: float = 0.5,
                 rms_target: float = 0.2, adamw_betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 impl: str = "foreach") -> None:
        check_common(lr, eps, weight_decay)
        if impl not in IMPLS:
            raise OptionError(f"Invalid impl {impl!r}; choose one of {', '.join(IMPLS)}")
        check_betas([momentum], "momentum")
        check_betas(adamw_betas, "adamw_betas")
        if not 0 < rank_fraction <= 1:
            raise OptionError(f"Invalid rank_fraction: {rank_fraction} (must lie in (0, 1])")
        if power_iters < 1 or refresh_interval < 1:
            raise OptionError("Invalid power_iters / refresh_interval: both must be at least 1")
        if refresh_timing not in REFRESH_TIMINGS:
            raise OptionError(f"Invalid refresh_timing {refresh_timing!r}; choose one of {', '.join(REFRESH_TIMINGS)}")
        if shaping not in SHAPINGS:
            raise OptionError(f"Invalid shaping {shaping!r}; choose one of {', '.join(SHAPINGS)}")
        if rms_target <= 0:
            raise OptionError(f"Invalid rms_target: {rms_target}")
        if not 0 <= spike_scale <= 1:  # shape(s) - s must stay in [-s, 0]: the spike is shrunk, never grown
            raise OptionError(f"Invalid spike_scale: {spike_scale} (must lie in [0, 1])")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      rank_fraction=rank_fraction, power_iters=power_iters,
                                      refresh_interval=refresh_interval,
                                      refresh_timing=refresh_timing, shaping=shaping, spike_scale=spike_scale,
                                      rms_target=rms_target, adamw_betas=adamw_betas, eps=eps))
        self.impl = cpu_kernels.fused_or_fallback(impl, "Spectra", fallback="foreach")

    # How the stacked GPU step orthonormalises a refreshed basis, f(M Mᵀ U, U) -> U': shifted CholeskyQR3 (a few
    # batched calls); ``householder_basis`` is torch.linalg.qr's (a kernel per matrix on a GPU), kept to compare.
    refine = staticmethod(refined_basis)

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["step"] = 0
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        fusable = [self._fusable(p) for p in params]
        if any(fusable):
            self._fused_step(group, [p for p, fused in zip(params, fusable, strict=True) if fused])
            params = [p for p, fused in zip(params, fusable, strict=True) if not fused]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        if self.impl == "foreach" and stacks(params):
            torch._foreach_lerp_(buffers, [p.grad for p in params], 1 - group["momentum"])
            momenta = buffers
        else:
            momenta = [m.lerp_(p.grad, 1 - group["momentum"]) for m, p in zip(buffers, params, strict=True)]
        if self.impl == "for-loop" or any(is_dtensor(p) for p in params):
            self._per_matrix_step(group, params, momenta)
        elif params:
            self._batched_step(group, params, momenta)

    def _fusable(self, p: Tensor) -> bool:
        """Whether ``p`` takes the fused kernels this step: impl "fused", a basis already (not the first step)."""
        state = self.state[p]
        return (self.impl == "fused" and "basis" in state and state["step"] > 1
                and cpu_kernels.usable(p, p.grad, state["momentum_buffer"]))

    def _refresh_due(self, state: dict, group: dict) -> bool:
        return (state["step"] - 1) % group["refresh_interval"] == 0

    def _per_matrix_step(self, group: dict, params: list[Tensor], momenta: list[Tensor]) -> None:
        """The update as written in the docstring, one whole matrix at a time (by its owner rank on shards)."""

        def shaped_update(i: int, M: Tensor) -> list[Tensor]:
            """The RMS-normalised shaped momentum and the refreshed basis, from the whole matrix M."""
            state = self.state[params[i]]
            M = at_least_float32(M)
            wide = M if M.shape[0] <= M.shape[1] else M.mT  # (r, c), r <= c
            basis = state.get("basis")
            if basis is None:
                basis = top_left_singular_basis(wide, spike_rank(*M.shape, group["rank_fraction"]))
            refreshed = basis
            if "basis" in state and self._refresh_due(state, group):
                refreshed = block_power_iteration(wide, basis, group["power_iters"])
            used = basis if group["refresh_timing"] == "after" else refreshed
            shaped, _ = shape_spike(wide, used, group["shaping"], group["spike_scale"])
            shaped.mul_(group["rms_target"] / shaped.square().mean().sqrt().clamp(min=1e-30))
            return [shaped if M.shape[0] <= M.shape[1] else shaped.mT, refreshed]

        def result_specs(i: int, M: Tensor) -> list[tuple[torch.Size, torch.dtype]]:
            k, dtype = spike_rank(*M.shape, group["rank_fraction"]), torch.promote_types(M.dtype, torch.float32)
            return [(M.shape, dtype), (torch.Size((min(M.shape), k)), dtype)]

        for p, (update, basis) in zip(params, owner_map(momenta, shaped_update, result_specs), strict=True):
            self.state[p]["basis"] = basis
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(like_shard(update, p), alpha=-group["lr"])

    def _batched_step(self, group: dict, params: list[Tensor], momenta: list[Tensor]) -> None:
        """The same update without full-size temporaries and without a single SVD after the first step.

        The large passes stay per matrix: the momentum update, ||M||, C = UᵀM, one ``addmm_`` for decay plus
        the low-rank correction and one ``addcmul_`` for M. Everything of size k (the thin QR of the refresh,
        the spike's spectrum) runs batched per shape, from C's k x k Gram matrix (see :func:`spike_operator`).
        The RMS of the shaped momentum needs no pass: ||O||² = ||M||² - ||s||² + ||shape(s)||², since U is
        orthonormal. Skinny products are taken in the stored orientation of M (``M @ U`` for a tall M rather
        than ``Uᵀ Mᵀ``): BLAS is up to 4x slower on the transposed operand."""
        for indices in by_shape_indices(momenta):
            states = [self.state[params[i]] for i in indices]
            if stacks([params[i] for i in indices]) and self._stackable(group, states):
                self._stacked_step(group, [params[i] for i in indices], [momenta[i] for i in indices])
                continue
            M = [at_least_float32(momenta[i]) for i in indices]
            if any("basis" not in state for state in states):  # first step: exact top-k, batched
                wides = torch.stack([m if _is_wide(m) else m.mT for m in M])
                k = spike_rank(*M[0].shape, group["rank_fraction"])
                for state, basis in zip(states, top_left_singular_basis(wides, k).unbind(0), strict=True):
                    state["basis"] = basis.contiguous()
            bases = [state["basis"] for state in states]
            coords = [spike_coordinates(m, basis) for m, basis in zip(M, bases, strict=True)]
            refresh = [j for j, state in enumerate(states) if self._refresh_due(state, group) and state["step"] > 1]
            if refresh:
                fresh = self._refresh(group, M, states, refresh, list(coords))
                if group["refresh_timing"] == "before":  # shape with the refined basis
                    bases, coords = [state["basis"] for state in states], fresh
            self._apply_shaped(group, [params[i] for i in indices], M, bases, coords)

    def _stackable(self, group: dict, states: list[dict]) -> bool:
        """Matrices of one shape that all have a basis and are all refreshed this step or all not."""
        due = {self._refresh_due(state, group) and state["step"] > 1 for state in states}
        return all("basis" in state for state in states) and len(due) == 1

    def _stacked_step(self, group: dict, params: list[Tensor], momenta: list[Tensor]) -> None:
        """The "foreach" update of one shape's matrices on a GPU, stacked into one batch: every product, the
        refresh's QR and the spike operator are one batched call each, and the parameters are written by two
        multi-tensor calls. One copy of the momenta per step (cheap next to GPU bandwidth), where one call per
        matrix would leave the GPU waiting on kernel launches (qwen3-134m's 84 matrices on an H100: 35 ms per
        step, 19x fused AdamW, in results/gpu/h100-2026-11-26/step.log). The refresh's thin QR is shifted
        CholeskyQR3 (:attr:`refine`, :func:`refined_basis`: a few batched calls, where ``torch.linalg.qr`` runs a
        kernel per matrix on a GPU; the two are compared by the GPU step table's row "spectra (householder qr)").
        The stacked copies (M and the update, fp32) take twice the shape's momenta at the step's peak."""
        states = [self.state[p] for p in params]
        M = torch.stack(momenta).to(torch.promote_types(momenta[0].dtype, torch.float32))  # (b, rows, cols)
        wide = _is_wide(M[0])
        bases = torch.stack([state["basis"] for state in states])  # (b, r, k)
        coords = spike_coordinates(M, bases)  # (b, k, c)
        if self._refresh_due(states[0], group) and states[0]["step"] > 1:
            fresh = bases
            for it in range(group["power_iters"]):
                fresh = self.refine(grow_basis(M, coords if it == 0 else spike_coordinates(M, fresh)), fresh)
            for state, basis in zip(states, fresh.unbind(0), strict=True):
                state["basis"] = basis
            if group["refresh_timing"] == "before":
                bases, coords = fresh, spike_coordinates(M, fresh)
        M_energy = torch.linalg.vector_norm(M, dim=(-2, -1)).square()
        left, step_scale, decay = self._shaping_terms(group, M.shape[-2:], M_energy, bases, coords)
        update = (left @ coords if wide else coords.mT @ left.mT).addcmul_(M, step_scale.view(-1, 1, 1))
        if params[0].dtype in (torch.float32, torch.float64):
            torch._foreach_mul_(params, decay)
        else:  # a bf16/fp16 multi-tensor multiply may round the decay itself to the parameter's dtype
            for p in params:
                p.mul_(decay)
        torch._foreach_add_(params, list(update.unbind(0)))  # bf16 parameters: rounded once, when added

    def _refresh(self, group: dict, M: list[Tensor], states: list[dict], refresh: list[int],
                 coords: list[Tensor]) -> list[Tensor]:
        """Block power iteration U <- qr(M (MᵀU)) of the matrices in ``refresh``, MᵀU = Cᵀ being at hand; stores
        the bases, returns the coordinates in them (not recomputed after the last iteration with "after")."""
        for it in range(group["power_iters"]):
            grown = torch.stack([grow_basis(M[j], coords[j]) for j in refresh])
            last = it == group["power_iters"] - 1
            for j, basis in zip(refresh, torch.linalg.qr(grown).Q.unbind(0), strict=True):
                states[j]["basis"] = basis.contiguous()
                if not (last and group["refresh_timing"] == "after"):
                    coords[j] = spike_coordinates(M[j], states[j]["basis"])
        return coords

    def _fused_step(self, group: dict, params: list[Tensor]) -> None:
        """The "foreach" update in one C++ call (``cpu_kernels``' ``spectra_steps_``): each matrix's three or four
        passes over its momentum back to back in one thread, so that M stays in that thread's cache from one pass
        to the next, the threads taking matrices largest first.

        Pass 1 updates M from the gradient and, from the same reads, takes ||M||² and the spike's coordinates
        C = UᵀM. A "before" refresh then reads M twice more (M Cᵀ, then C in the new basis), with the thin QR
        between by LAPACK (``torch.linalg.qr``'s); the spike operator comes from the k x k Gram eigenproblem of C
        (float64 Jacobi rotations in C++: a LAPACK call per matrix cost more than the rest of the small work).
        The last pass writes W <- decay W + s M + (s U K) C with the rank-k term formed row by row, and with
        ``refresh_timing="after"`` (one power iteration) also takes the next basis's product M Cᵀ from its reads
        of M. Memory traffic per step: 6 accesses of a matrix-sized array (AdamW's fused step: 7), 8 with a
        "before" refresh. On qwen3-134m's 84 hidden matrices (2 threads, AVX2), each measured against the
        previous design in one process: the passes of one matrix together instead of each pass over all matrices
        of a shape 0.78x the time (a 4 MB matrix stays in L3); the small work in C++ instead of batched torch calls
        0.92x; one matrix per thread instead of each pass split over the threads 0.88x (one matrix's small work
        overlaps the other thread's passes)."""
        kernels = cpu_kernels.kernels()
        settings = (1 - group["momentum"], group["power_iters"], group["refresh_timing"] == "before",
                    SHAPINGS.index(group["shaping"]), group["spike_scale"], group["lr"] * group["rms_target"],
                    1 - group["lr"] * group["weight_decay"])
        states = [self.state[p] for p in params]
        bases = kernels.spectra_steps_(params, [p.grad for p in params], [s["momentum_buffer"] for s in states],
                                       [s["basis"] for s in states], [self._refresh_due(s, group) for s in states],
                                       *settings)
        for state, basis in zip(states, bases, strict=True):
            state["basis"] = basis

    def _shaping_terms(self, group: dict, shape: torch.Size, M_energy: Tensor, bases: Tensor,
                       coords: Tensor) -> tuple[Tensor, Tensor, float]:
        """From ||M||² and C per matrix of one shape (stacked: (b, r, k) and (b, k, c)): the left factor s U K
        (b, r, k) of the low-rank term, the step scale s = -lr · rms_target / RMS(O) (b,) and the decay
        1 - lr λ."""
        r, c = min(shape), max(shape)
        operator, s, target = spike_operator(coords, M_energy, r, group["shaping"], group["spike_scale"])
        s_energy = s.square().sum(-1)
        rms = ((M_energy - s_energy + target.square().sum(-1)).clamp(min=0) / (r * c)).sqrt()
        step_scale = -group["lr"] * group["rms_target"] / rms.clamp(min=1e-30)  # (b,)
        left = bases @ (operator * step_scale.view(-1, 1, 1))  # (b, r, k): step_scale U K
        return left, step_scale, 1 - group["lr"] * group["weight_decay"]

    def _apply_shaped(self, group: dict, params: list[Tensor], M: list[Tensor], bases: list[Tensor],
                      coords: list[Tensor]) -> None:
        M_energy = torch.stack([torch.linalg.vector_norm(m) for m in M]).square()
        left, step_scale, decay = self._shaping_terms(group, M[0].shape, M_energy, torch.stack(bases),
                                                      torch.stack(coords))
        for j, p in enumerate(params):
            if p.dtype != M[j].dtype:  # low precision: the fp32 update, rounded once when added
                update = left[j] @ coords[j] if _is_wide(p) else coords[j].mT @ left[j].mT
                p.mul_(decay).add_(update.addcmul_(M[j], step_scale[j]))
            elif _is_wide(p):
                p.addmm_(left[j], coords[j], beta=decay)  # p <- decay p + step_scale U K C
                p.addcmul_(M[j], step_scale[j])
            else:
                p.addmm_(coords[j].mT, left[j].mT, beta=decay)
                p.addcmul_(M[j], step_scale[j])


def householder_basis(grown: Tensor, previous: Tensor) -> Tensor:
    """The refreshed basis by ``torch.linalg.qr`` (Householder), the stacked step's QR before CholeskyQR3."""
    return torch.linalg.qr(grown).Q


def stacks(params: list[Tensor]) -> bool:
    """Whether the "foreach" step stacks these matrices: on a GPU (launch-bound per matrix), not on a CPU (per
    matrix, a matrix's passes stay in cache and nothing is copied) nor on shards."""
    return bool(params) and all(p.is_cuda and not is_dtensor(p) for p in params)


def at_least_float32(M: Tensor) -> Tensor:
    """M, or an fp32 copy of a bf16/fp16 M: the subspace and shaping arithmetic needs fp32."""
    return M.to(torch.promote_types(M.dtype, torch.float32))


def _is_wide(M: Tensor) -> bool:
    return M.shape[-2] <= M.shape[-1]


def spike_coordinates(M: Tensor, U: Tensor) -> Tensor:
    """C = Uᵀ M in the wide orientation (k, c), computed as ``(M U)ᵀ`` when M is stored tall."""
    return U.mT @ M if _is_wide(M) else (M @ U).mT


def grow_basis(M: Tensor, C: Tensor) -> Tensor:
    """M Cᵀ (= M Mᵀ U) in the wide orientation (r, k), computed as ``(C M)ᵀ`` when M is stored tall."""
    return M @ C.mT if _is_wide(M) else (C @ M).mT


def spike_operator(C: Tensor, M_energy: Tensor, r: int, shaping: str, spike_scale: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The k x k operator K with U A diag(shape(s) - s) Bᵀ = U K C, for C = A diag(s) Bᵀ (batched, (b, k, c)).

    From C Cᵀ = A diag(s²) Aᵀ (a k x k eigenproblem, in float64): K = A diag((shape(s) - s) / s) Aᵀ. The
    factor (shape(s) - s) / s lies in [-1, 0] for every shaping, so small or zero singular values are
    harmless (their directions carry no part of C). Far cheaper than an SVD of C: 84 thin SVDs of qwen3-134m
    cost 37 ms on 2 CPU threads, the Gram eigenproblems 3 ms. Returns (K, s, shape(s)), s descending.
    """
    gram = C.double() @ C.double().mT
    eigenvalues, A = torch.linalg.eigh(gram)
    s = eigenvalues.clamp(min=0).sqrt()
    k = C.shape[-2]
    tail = (M_energy.double() - s.square().sum(-1)).clamp(min=0)
    tau = (tail / (r - k)).sqrt() if r > k else torch.full_like(tail, math.inf)
    target = shape_singular_values(s, tau.unsqueeze(-1), shaping, spike_scale)
    factor = torch.where(s > 0, (target - s) / s.clamp(min=torch.finfo(s.dtype).tiny), 0.0)
    operator = (A * factor.unsqueeze(-2)) @ A.mT
    dtype = C.dtype
    return operator.to(dtype), s.flip(-1).to(dtype), target.flip(-1).to(dtype)


register_class(
    Spectra,
    name="spectra",
    summary="Spectra: momentum whose top ~1.5% singular directions are clipped to the tail's scale",
    source="Huang et al. 2025, 'Spectra: Rethinking Optimizers for LLMs Under Spectral Anisotropy'",
    groups=matrix_param_groups,
    state_bytes_per_param=4.06,
    kind="matrix",
    impls=IMPLS,
)
