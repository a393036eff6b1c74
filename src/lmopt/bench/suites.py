"""Benchmark suites, as data in the registry.

A suite fixes the model, data, token budget, schedule and seeds, and gives every optimizer a log-spaced
learning-rate grid around its registered default. ``lmopt bench run SUITE`` runs, for every optimizer:

1. the sweep: every lr of its grid with the sweep seed;
2. widening: while the best lr sits on an edge of the grid, one more point beyond that edge (up to
   ``max_widen`` per side), so that the reported best lr is interior or visibly at the limit;
3. seeds: the remaining seeds at the best lr;
4. budgets: each shorter budget of ``extra_steps`` at the best lr, for ``budget_seeds`` (complete
   schedules, so the tokens-to-target comparison is also made at the end of full runs, not only along one
   curve).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmopt.registry import OPTIMIZERS, SUITES


def log_grid(center: float, points: int = 5, factor: float = 2.0) -> tuple[float, ...]:
    """``points`` learning rates spaced by ``factor`` with ``center`` in the middle, rounded to 3 digits."""
    half = (points - 1) / 2
    return tuple(float(f"{center * factor ** (i - half):.3g}") for i in range(points))


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    preset: str
    data: str
    seq_len: int
    batch_tokens: int
    steps: int
    lr_grids: Mapping[str, tuple[float, ...]]
    seeds: tuple[int, ...] = (0, 1, 2)
    extra_steps: tuple[int, ...] = ()
    budget_seeds: tuple[int, ...] | None = None  # seeds of the extra budgets' runs (None: all seeds)
    optim_options: Mapping[str, dict] = field(default_factory=dict)
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_points: int = 16  # validation evaluations per run (the curves the speedups interpolate)
    eval_tokens: int = 65536
    threads_per_job: int = 1
    max_widen: int = 2
    widen_factor: float = 2.0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False

    @property
    def sweep_seed(self) -> int:
        return self.seeds[0]

    @property
    def optimizers(self) -> list[str]:
        return list(self.lr_grids)

    def tokens(self, steps: int | None = None) -> int:
        return (steps or self.steps) * self.batch_tokens

    def train_config(self, optimizer: str, lr: float, seed: int, steps: int, run_name: str) -> dict:
        """The ``lmopt train`` settings of one run."""
        return {
            "preset": self.preset, "data": self.data, "optimizer": optimizer, "lr": lr,
            "optim": dict(self.optim_options.get(optimizer, {})), "schedule": self.schedule,
            "warmup_frac": self.warmup_frac, "min_lr_ratio": self.min_lr_ratio, "seq_len": self.seq_len,
            "batch_tokens": self.batch_tokens, "steps": steps, "grad_clip": self.grad_clip,
            "eval_interval": max(1, steps // self.eval_points), "eval_tokens": self.eval_tokens,
            "log_interval": max(1, steps // 10), "ckpt_interval": max(1, steps // 4), "seed": seed,
            "threads": self.threads_per_job, "device": self.device, "dtype": self.dtype, "compile": self.compile,
            "run_name": run_name,
        }


def default_grids(points: int = 5, factor: float = 2.0, optimizers: list[str] | None = None) -> dict:
    names = optimizers or OPTIMIZERS.names()
    return {name: log_grid(OPTIMIZERS.get(name).default_lr, points, factor) for name in names}


def register(suite: Suite) -> Suite:
    return SUITES.register(suite.name, suite, suite.description.split("\n")[0])


register(Suite(
    name="cpu-quick",
    description=(
        "Smoke test of the whole pipeline in under 10 minutes on 2 cores: nano, 3 optimizers, 3-point grids,\n"
        "2 seeds, 60 steps of 2,048 tokens (123k tokens, 0.09 epochs of Brown). Not a result."
    ),
    preset="nano", data="brown", seq_len=64, batch_tokens=2048, steps=60,
    lr_grids={name: log_grid(5e-3, 3, 3.0) for name in ("adamw", "muon", "spectra")},
    seeds=(0, 1), eval_points=6, eval_tokens=16384, max_widen=0,
))

register(Suite(
    name="cpu-full",
    description=(
        "The CPU result: every registered optimizer on the nano preset (1.5M params) and the Brown corpus,\n"
        "5-point lr grids (factor 2, widened at the edges), 3 seeds at the best lr, and a half budget (seed 0).\n"
        "Budget: 400 steps x 2,048 tokens = 819k tokens (0.59 epochs of the 1.38M-token training split).\n"
        "Arithmetic: nano trains at ~6k tokens/s on one thread, so a run is ~140 s plus 16 evaluations of\n"
        "32k tokens (~20 s); 11 optimizers x (5 lrs + ~1 widening + 2 seeds) + 11 half-budget runs\n"
        "~ 94 full-run equivalents ~ 4.2 core-hours, ~2.1 hours with --jobs 2 on 2 cores."
    ),
    preset="nano", data="brown", seq_len=128, batch_tokens=2048, steps=400, extra_steps=(200,), budget_seeds=(0,),
    lr_grids=default_grids(), eval_points=16, eval_tokens=32768,
))

register(Suite(
    name="gpu-134m",
    description=(
        "The papers' setting: qwen3-134m with the Qwen3 tokenizer on FineWeb (prepare it first with\n"
        "`lmopt data prepare --corpus fineweb --tokenizer qwen3 --source ... --name fineweb`), bf16 autocast\n"
        "and torch.compile on one GPU; 2,000 steps x 256 x 1,024 tokens = 524M tokens per run."
    ),
    preset="qwen3-134m", data="fineweb", seq_len=1024, batch_tokens=262144, steps=2000, extra_steps=(1000,),
    lr_grids=default_grids(points=5, factor=2.0), eval_points=20, eval_tokens=1_048_576, threads_per_job=0,
    device="cuda", dtype="bf16", compile=True,
))


def epochs(suite: Suite, train_tokens: int) -> float:
    return suite.tokens() / train_tokens if train_tokens else math.nan
