"""Where Muon's Newton–Schulz time goes on this CPU, and what the faster options cost in accuracy.

    python scripts/muon_cpu_probe.py [--repeats 9] [--out results/step/muon-cpu-probe.md]

Writes a markdown file (naming this command, the commit and the CPU) with:
1. one qwen3-134m layer's 7 hidden matrices orthogonalised by torch.optim.Muon's function and by lmopt's settings
   (bf16 standard and Gram space in segments, fp32, fp32 Gram space, 4 Polar Express steps), interleaved, median ms;
   lmopt's default also with its matrices one after another, each product on all of torch's threads (as torch's
   Muon runs), instead of one matrix per thread (lmopt.optim.threads);
2. a bf16 batch of two 2048x512 products against the same two products one by one, on torch's threads or one
   per thread;
3. on real gradients (a nano model after 8 AdamW steps on Brown, as tests/optim/test_newton_schulz.py):
   the relative distance to the polar factor U Vᵀ of Keller's 5 steps and of 3 and 4 Polar Express steps, the
   distance of bf16 Gram space (in segments and in one) and of a folded iteration ((aI + bA + cA²) X in one
   product) to the exact iteration.
Speed here, accuracy in the tests: nothing in this file is asserted.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from lmopt.analysis.collect import hidden_matrix_gradients
from lmopt.bench.step import interleaved_medians, probe_arguments, write_probe
from lmopt.model import build_model, get_preset
from lmopt.optim import Muon, matrix_param_groups
from lmopt.optim import muon as muon_module
from lmopt.optim.kernels import NS_COEFFICIENTS, newton_schulz, newton_schulz_gram, polar_express
from lmopt.optim.threads import map_over_threads


def layer_timings(repeats: int) -> dict[str, float]:
    model = build_model(get_preset("qwen3-134m").config, seed=0)
    kept = {id(p) for p in model.layers[0].parameters()}
    mats = [p for g in matrix_param_groups(model, 0.1) if g["matrix"] for p in g["params"] if id(p) in kept]
    for p in mats:
        p.grad = torch.randn_like(p) * 1e-3
    options = {"lmopt bf16, standard iteration": dict(ns_dtype="bfloat16", ns_method="standard"),
               "lmopt bf16, Gram space in segments (default), one matrix per thread": dict(ns_dtype="bfloat16"),
               "lmopt fp32": dict(ns_dtype="float32", ns_method="standard"),
               "lmopt fp32 Gram space": dict(ns_dtype="float32", ns_method="gram"),
               "lmopt bf16, 4 Polar Express steps": dict(ns_dtype="bfloat16", ns_coefficients="polar-express",
                                                         ns_steps=4)}
    opts = {"torch.optim.Muon": torch.optim.Muon(mats, lr=1e-3)}
    opts |= {name: Muon(mats, lr=1e-3, adjust_lr="original", **o) for name, o in options.items()}
    steps = {name: o.step for name, o in opts.items()}
    one_after_another = Muon(mats, lr=1e-3, adjust_lr="original", ns_dtype="bfloat16")

    def step_one_after_another() -> None:
        with mock.patch.object(muon_module, "map_over_threads", functools.partial(map_over_threads, threads=1)):
            one_after_another.step()

    steps["lmopt bf16, Gram space in segments, matrices one after another"] = step_one_after_another
    return interleaved_medians(steps, repeats)


def batch_timings(repeats: int) -> dict[str, float]:
    X = torch.randn(2, 512, 2048).bfloat16()
    return interleaved_medians({"bf16 batch of two (bmm)": lambda: torch.bmm(X, X.mT),
                                "the same two one by one (mm)": lambda: [x @ x.mT for x in X],
                                "the same two, one per thread (mm)": lambda: map_over_threads(lambda x: x @ x.mT, X)},
                               repeats)


def folded_bf16(G: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5) -> torch.Tensor:
    """Keller's iteration with a folded into the second product: X <- (aI + bA + cA²) X, one product."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        B.diagonal().add_(a)
        X = B @ X
    return X.T if tall else X


def accuracy() -> dict[str, tuple[float, float]]:
    def relative(O: torch.Tensor, reference: torch.Tensor) -> float:
        return ((O.double() - reference).norm() / reference.norm()).item()

    out: dict[str, list[float]] = {}
    for G in hidden_matrix_gradients("nano", steps=8):
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar, exact = U @ Vh, newton_schulz(G, dtype=torch.float64)
        rows = {"to U Vᵀ: Keller's 5 steps, bf16": relative(newton_schulz(G.float()), polar),
                **{f"to U Vᵀ: {k} Polar Express steps, bf16": relative(
                    newton_schulz(G.float(), k, polar_express(k)), polar) for k in (3, 4)},
                "to the exact iteration: bf16": relative(newton_schulz(G.float()), exact),
                "to the exact iteration: bf16, a folded into one product": relative(folded_bf16(G.float()), exact),
                "to the exact iteration: fp32 Gram space": relative(newton_schulz_gram(G.float()), exact),
                "to the exact iteration: bf16 Gram space in segments (3 + 2)": relative(
                    newton_schulz_gram(G.float(), dtype=torch.bfloat16), exact),
                "to the exact iteration: bf16 Gram space, one segment": relative(
                    newton_schulz_gram(G.float(), dtype=torch.bfloat16, growth_limit=math.inf), exact),
                "to U Vᵀ: bf16 Gram space in segments": relative(newton_schulz_gram(G.float(), dtype=torch.bfloat16),
                                                                 polar)}
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return {k: (float(np.mean(v)), float(np.max(v))) for k, v in out.items()}


def main(argv: list[str] | None = None) -> Path:
    args = probe_arguments(__doc__, "results/step/muon-cpu-probe.md", 9, argv)
    layer, batch, errors = layer_timings(args.repeats), batch_timings(args.repeats), accuracy()
    torch_ms = layer["torch.optim.Muon"]
    lines = ["## One qwen3-134m layer's 7 hidden matrices, one Muon step", "",
             "| setting | ms | torch's / this |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {torch_ms / ms:.2f}x |" for name, ms in layer.items()]
    lines += ["", "## A bf16 batch against its matrices one by one (two 512x2048 @ 2048x512 products)", "",
              "| products | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in batch.items()]
    lines += ["", "## Accuracy on real gradients (nano, 8 AdamW steps on Brown): relative Frobenius distance", "",
              "| distance | mean over matrices | max |", "|---|---:|---:|"]
    lines += [f"| {name} | {mean:.3g} | {worst:.3g} |" for name, (mean, worst) in errors.items()]
    title = "Muon's Newton–Schulz on this CPU: time and accuracy of the options"
    return write_probe("scripts/muon_cpu_probe.py", argv, args, title, lines)


if __name__ == "__main__":
    main()
