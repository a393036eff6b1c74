"""``lmopt bench run SUITE --dry-run``: what a suite will run and what it costs, before anything runs.

Counts come from the protocol (tuning budget, held-out seeds x budgets), FLOPs from the model
(:meth:`Qwen3.flops_per_token`: 6 per matmul weight plus attention), time from a stated throughput: on a GPU a
peak bf16 rate times an assumed MFU, on a CPU the median step time of runs already recorded for the suite (or
a stated rate when there are none). Memory per GPU comes from :func:`lmopt.train.memory.estimate_memory` when
that module is present.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from lmopt.bench.results import load_records
from lmopt.bench.suites import Suite
from lmopt.model import get_preset
from lmopt.model.qwen3 import Qwen3

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
ASSUMED_MFU = 0.35
CPU_FLOPS_PER_CORE = 25e9  # a conservative rate for one core of this project's CI machine when nothing is measured


def suite_plan(suite: Suite, optimizers: list[str], root: Path | None = None, mfu: float = ASSUMED_MFU,
               peak_flops: float = H100_BF16_PEAK) -> dict:
    """Runs, tokens, FLOPs and device time of a whole suite (all optimizers' pipelines)."""
    preset = get_preset(suite.preset)
    with torch.device("meta"):
        flops_per_token = Qwen3(preset.config).flops_per_token(suite.seq_len)
    budgets = suite.budgets()
    runs_per_optimizer = suite.tuning_budget + len(suite.seeds) * len(budgets)
    steps_per_optimizer = suite.tuning_budget * suite.steps + len(suite.seeds) * sum(budgets)
    tokens = len(optimizers) * steps_per_optimizer * suite.batch_tokens
    flops = tokens * flops_per_token
    plan = {"suite": suite.name, "optimizers": optimizers, "runs": len(optimizers) * runs_per_optimizer,
            "runs_per_optimizer": runs_per_optimizer, "tokens": tokens, "flops": flops,
            "flops_per_token": flops_per_token}
    if suite.device == "cuda":
        plan["gpu_hours"] = flops / (peak_flops * mfu) / 3600
        plan["assumption"] = f"{mfu:.0%} MFU of {peak_flops / 1e12:.0f} TFLOP/s (H100 SXM bf16 dense)"
    else:
        seconds_per_step = _measured_step_seconds(suite, root)
        if seconds_per_step is None:
            seconds_per_step = suite.batch_tokens * flops_per_token / CPU_FLOPS_PER_CORE
            plan["assumption"] = f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core (nothing measured yet)"
        else:
            plan["assumption"] = "median step time of the suite's recorded runs"
        plan["core_hours"] = len(optimizers) * steps_per_optimizer * seconds_per_step * 1.15 / 3600  # +15%: evals
    plan["memory"] = _memory(suite)
    return plan


def _measured_step_seconds(suite: Suite, root: Path | None) -> float | None:
    times = [r["end"].get("median_step_time") for r in load_records(suite.name, root).values()]
    times = [t for t in times if isinstance(t, float)]
    return statistics.median(times) if times else None


def _memory(suite: Suite) -> dict | None:
    try:
        from lmopt.train.memory import estimate_memory
    except ImportError:
        return None
    sequences = suite.batch_tokens // (suite.seq_len * max(suite.grad_accum, 1))
    # "auto" resolves as the trainer does: bf16 autocast on a GPU, fp32 elsewhere.
    dtype = suite.dtype if suite.dtype != "auto" else ("bf16" if suite.device == "cuda" else "fp32")
    return {name: estimate_memory(suite.preset, suite.seq_len, sequences, name, dtype, False)
            for name in ("adamw", "muon", "spectra")}


def plan_text(plan: dict) -> str:
    lines = [f"suite {plan['suite']}: {len(plan['optimizers'])} optimizers x {plan['runs_per_optimizer']} runs = "
             f"{plan['runs']} runs, {plan['tokens']:,} tokens, {plan['flops']:.3g} FLOPs "
             f"({plan['flops_per_token']:.3g} per token)"]
    if "gpu_hours" in plan:
        lines.append(f"  ~{plan['gpu_hours']:.1f} GPU-hours at {plan['assumption']}")
    if "core_hours" in plan:
        lines.append(f"  ~{plan['core_hours']:.1f} core-hours ({plan['assumption']}); / --jobs on as many cores")
    for name, estimate in (plan.get("memory") or {}).items():
        total = estimate.get("total") if isinstance(estimate, dict) else None
        if total is not None:
            lines.append(f"  peak memory per device with {name}: {total / 2**30:.1f} GiB")
    return "\n".join(lines)
