"""Gradient spectra: the measurements behind Spectra's argument (Huang et al. 2025, Figures 1, 3, 4 and 5).

Pure functions of matrices first (tested on planted spikes), then :func:`collect_gradients` and
:func:`analyse_checkpoint`, which measure a real model at a checkpoint.

Definitions
-----------
- **spectrum**: singular values s_1 >= ... >= s_r of a matrix (r = min(m, n)), shown normalised by s_1.
- **spike** (:func:`detect_spike`): the leading singular values separated from the rest by the largest gap
  in log scale, log s_k - log s_{k+1}, searched over k <= ``search_fraction`` · r (25% by default: a spike
  is a small set of directions). The spike size is that k; its fraction k / r and its energy fraction
  sum_{i<=k} s_i² / sum_i s_i² are reported with the gap (in decades).
- **cumulative spectral energy** (:func:`energy_cdf`): CDF(k) = sum_{i<=k} s_i² / sum_i s_i², for the mean
  gradient G, Adam's first moment M and second moment V taken as matrices (Figure 3, top).
- **RelVar(k)** (:func:`relative_variance`) = Var_i(a_k^{(i)}) / s_k², with a_k^{(i)} = u_kᵀ G_i v_k the
  projection of micro-batch gradient G_i on the k-th singular pair (u_k, v_k) of the mean gradient G and s_k
  its singular value (Figure 4). Large RelVar: a noise-dominated direction.
- **NS alignment** (:func:`ns_alignment`): for each singular pair (u_k, v_k) of G, the cosine between u_k
  and NS(G) v_k, where NS is Muon's Newton–Schulz orthogonalisation as Muon runs it (5 quintic steps in bf16).
  In exact arithmetic NS only remaps singular values, so every direction would be kept (cosine 1); in finite
  precision the error of NS(G) is spread over all directions while a direction's signal is f(s_k), so
  directions with small s_k (the tail) are lost in the error. Figure 5 of the paper plots |<u_k(G),
  u_k(NS(G))>| with NS(G)'s singular vectors taken in the order of its own singular values; because NS
  flattens the spectrum, that order (and with it "the k-th direction of NS(G)") is arbitrary among
  near-equal values even in exact arithmetic, so we measure the same question (is direction k kept?) without
  re-sorting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lmopt.optim.kernels import newton_schulz


@dataclass(frozen=True)
class Spike:
    size: int  # number of leading singular values above the gap
    fraction: float  # size / rank
    energy_fraction: float  # share of the squared singular values in the spike
    gap_decades: float  # log10(s_size / s_size+1)

    def to_dict(self) -> dict:
        return asdict(self)


def singular_values(X: Tensor) -> Tensor:
    return torch.linalg.svdvals(X.double())


def detect_spike(s: Tensor, search_fraction: float = 0.25) -> Spike:
    """The largest log-gap among the top ``search_fraction`` of the (descending) singular values ``s``."""
    s = s.double()
    r = len(s)
    positive = s.clamp(min=s[0] * 1e-12 if s[0] > 0 else 1e-300)
    gaps = positive[:-1].log10() - positive[1:].log10()
    limit = max(1, min(r - 1, math.ceil(search_fraction * r)))
    k = int(torch.argmax(gaps[:limit])) + 1
    energy = s.square()
    return Spike(k, k / r, float(energy[:k].sum() / energy.sum()), float(gaps[k - 1]))


def energy_cdf(s: Tensor) -> Tensor:
    energy = s.double().square()
    return energy.cumsum(0) / energy.sum()


def relative_variance(micro_grads: Tensor) -> tuple[Tensor, Tensor]:
    """(RelVar(k) for every k, singular values of the mean). ``micro_grads`` is (n, m, c) with n >= 2."""
    G = micro_grads.double()
    U, s, Vh = torch.linalg.svd(G.mean(0), full_matrices=False)
    a = torch.einsum("mk,nmc,kc->nk", U, G, Vh)  # a[i, k] = u_kᵀ G_i v_k
    return a.var(0, unbiased=True) / s.square().clamp(min=1e-300), s


def ns_alignment(G: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """|cos(u_k, NS(G) v_k)| for k = 1..r over G's singular pairs, with NS in ``dtype`` (bf16, as torch's Muon;
    torch's standard iteration)."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    mapped = newton_schulz(G.to(dtype if dtype == torch.float64 else torch.float32), dtype=dtype).double() @ Vh.mT
    return (U * mapped).sum(0).abs() / mapped.norm(dim=0).clamp(min=1e-300)


def matrix_report(micro_grads: Tensor, first_moment: Tensor | None = None, second_moment: Tensor | None = None,
                  search_fraction: float = 0.25) -> dict:
    """Every measurement for one weight matrix, from its per-micro-batch gradients (n, m, c)."""
    G = micro_grads.double().mean(0)
    s = singular_values(G)
    report = {
        "shape": list(G.shape),
        "singular_values": s.tolist(),
        "spike": detect_spike(s, search_fraction).to_dict(),
        "cdf": {"G": energy_cdf(s).tolist()},
        "ns_alignment": ns_alignment(G).tolist(),
    }
    if len(micro_grads) >= 2:
        report["relvar"] = relative_variance(micro_grads)[0].tolist()
    for key, moment in (("M", first_moment), ("V", second_moment)):
        if moment is not None:
            report["cdf"][key] = energy_cdf(singular_values(moment)).tolist()
    return report


def summary_row(report: dict, spike_fraction: float = 0.015, head: int = 3, tail: int = 50) -> dict:
    """Medians over a checkpoint's matrices of each measurement (the table `lmopt spectrum` writes)."""
    import statistics

    def med(values):
        return statistics.median(values)

    def at_fraction(cdf):
        return cdf[max(0, int(spike_fraction * len(cdf)) - 1)]

    matrices = list(report["matrices"].values())
    row = {
        "step": report["step"],
        "spike_fraction": med([m["spike"]["fraction"] for m in matrices]),
        "spike_energy": med([m["spike"]["energy_fraction"] for m in matrices]),
        "relvar_head": med([sum(m["relvar"][:head]) / head for m in matrices]) if "relvar" in matrices[0] else None,
        "relvar_tail": med([sum(m["relvar"][-tail:]) / tail for m in matrices]) if "relvar" in matrices[0] else None,
        "ns_alignment_head": med([sum(m["ns_alignment"][:head]) / head for m in matrices]),
        "ns_alignment_tail": med([sum(m["ns_alignment"][-tail:]) / tail for m in matrices]),
    }
    for key in ("G", "M", "V"):
        if key in matrices[0]["cdf"]:
            row[f"cdf_{key}"] = med([at_fraction(m["cdf"][key]) for m in matrices])
    return row


def summary_table(reports: list[dict]) -> str:
    """A Markdown table of :func:`summary_row` for each checkpoint."""
    header = ("| step | spike (share of directions) | spike energy | RelVar head / tail | NS alignment head / tail "
              "| energy in top 1.5%: G / M / V |")
    lines = [header, "|---:|---:|---:|---:|---:|---:|"]
    for report in reports:
        r = summary_row(report)
        relvar = f"{r['relvar_head']:.3g} / {r['relvar_tail']:.3g}" if r["relvar_head"] is not None else "—"
        cdf = " / ".join(f"{r[f'cdf_{k}']:.2f}" if f"cdf_{k}" in r else "—" for k in ("G", "M", "V"))
        lines.append(f"| {r['step']} | {r['spike_fraction']:.2%} | {r['spike_energy']:.2f} | {relvar} | "
                     f"{r['ns_alignment_head']:.3f} / {r['ns_alignment_tail']:.3f} | {cdf} |")
    return "\n".join(lines)
