"""Benchmark suites, as data in the registry, and each optimizer's tuning space.

A suite fixes the model, data, token budget, schedule and seeds. ``lmopt bench run SUITE`` does, for every
optimizer (:mod:`lmopt.bench.runner`):

1. **tuning** on the tuning seed: the coordinate search of :mod:`lmopt.bench.tuning` over the optimizer's knobs
   (lr, weight decay, warm-up fraction and its own one or two), exactly ``tuning_budget`` runs for every
   optimizer;
2. **held-out seeds**: the chosen configuration on each of ``seeds`` (never used for tuning), at the full budget
   and at each of ``budget_fractions`` of it (complete schedules), so that speedups come from complete runs,
   paired by seed.

A ladder rung (``transfer_from`` set) starts each optimizer from the values tuned on the rung below and tunes
only ``rung_knobs`` (coarser, stated); its optimizers are ``optimizers`` plus every one that beat AdamW
significantly on the first rung.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmopt.bench.tuning import Knob, log_values
from lmopt.registry import OPTIMIZERS, SUITES

WEIGHT_DECAYS = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)
WARMUPS = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)
BETA2S = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
MOMENTA = (0.6, 0.8, 0.9, 0.95, 0.98)

# Each optimizer's own knobs: its most important hyperparameter beyond lr, weight decay and warm-up (β2 for the
# Adam family, the momentum of the orthogonalising ones, the new hyperparameter of each paper's optimizer).
OWN_KNOBS: dict[str, tuple[tuple[str, tuple], ...]] = {
    "adamw": (("optim.betas.1", BETA2S),),
    "stable-adamw": (("optim.betas.1", BETA2S),),
    "ortho-adam": (("optim.betas.1", BETA2S),),
    "lamb": (("optim.betas.1", BETA2S),),
    "adafactor": (("optim.beta2_decay", (-1.0, -0.9, -0.8, -0.65, -0.5)),),
    "muon": (("optim.momentum", MOMENTA),),
    "spectra": (("optim.momentum", MOMENTA),),
    "asm": (("optim.qk_lr_scale", (1.0, 7 / 6, 1.5, 2.0)),),
    "asa": (("optim.spectral_scale", (0.03, 0.1, 0.3, 1.0)),),
    "msam": (("optim.betas.2", (0.95, 0.99, 0.999)),),
    "amcs": (("optim.betas.2", (0.95, 0.99, 0.999)),),
}
COMMON_START = {"weight_decay": 0.1, "warmup_frac": 0.05}


def option_default(optimizer: str, key: str):
    """The registered default of an ``optim.NAME[.INDEX]`` knob."""
    parts = key.split(".")
    value = OPTIMIZERS.get(optimizer).defaults[parts[1]]
    return value[int(parts[2])] if len(parts) == 3 else value


def tuning_space(optimizer: str, start: Mapping[str, float] | None = None,
                 only: tuple[str, ...] | None = None) -> tuple[Knob, ...]:
    """The knobs of ``optimizer``: lr (factor-2 grid around the start), its own knobs, weight decay, warm-up.

    ``start`` overrides start values (a ladder rung starts from the rung below); ``only`` tunes those knobs
    (``"own"`` standing for the optimizer's own ones) and fixes the others at their start values.
    """
    spec = OPTIMIZERS.get(optimizer)
    start = dict(start or {})
    lr = start.get("lr", spec.default_lr)
    knobs = [Knob("lr", log_values(lr, 4, 4), float(f"{lr:.3g}"))]
    for key, values in OWN_KNOBS.get(optimizer, ()):
        knobs.append(Knob(key, values, start.get(key, option_default(optimizer, key))))
    knobs.append(Knob("weight_decay", WEIGHT_DECAYS, start.get("weight_decay", COMMON_START["weight_decay"])))
    knobs.append(Knob("warmup_frac", WARMUPS, start.get("warmup_frac", COMMON_START["warmup_frac"])))
    if only is not None:  # the other knobs stay fixed at their start values (a one-point grid)
        own = {key for key, _ in OWN_KNOBS.get(optimizer, ())}
        keep = {k for k in only if k != "own"} | (own if "own" in only else set())
        knobs = [k if k.key in keep else Knob(k.key, (k.start,), k.start) for k in knobs]
    return tuple(knobs)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    preset: str
    data: str
    seq_len: int
    batch_tokens: int
    steps: int
    optimizers: tuple[str, ...]
    tuning_budget: int = 12
    tuning_seed: int = 100
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    budget_fractions: tuple[float, ...] = (0.25, 0.5)
    tol: float = 0.01  # a probe must beat the incumbent by more than this (final-loss seed noise, nats)
    transfer_from: str | None = None  # ladder rung: start from this suite's tuned values
    rung_knobs: tuple[str, ...] | None = None  # knobs tuned on a rung ("own": the optimizer's own)
    ladder: str = ""  # the ladder this suite is a rung of (its report combines the rungs)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_points: int = 8  # validation evaluations of a full-budget held-out run (the curves)
    tuning_eval_points: int = 2  # of a tuning or shorter-budget run (only the final loss is used)
    eval_tokens: int = 32768
    grad_accum: int = 1  # micro-batches per step (batch_tokens / grad_accum tokens per forward pass)
    threads_per_job: int = 1
    gpus_per_job: int = 1  # > 1: each run is one FSDP job over that many GPUs (torchrun)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    optim_options: Mapping[str, dict] = field(default_factory=dict)  # fixed (untuned) options per optimizer

    def tokens(self, steps: int | None = None) -> int:
        return (steps or self.steps) * self.batch_tokens

    def budgets(self) -> tuple[int, ...]:
        """Step counts of the held-out runs: every fraction of the full budget, then the full budget."""
        return (*sorted({max(1, round(self.steps * f)) for f in self.budget_fractions}), self.steps)

    def train_config(self, optimizer: str, values: Mapping[str, float], seed: int, steps: int,
                     run_name: str, curve: bool) -> dict:
        """The ``lmopt train`` settings of one run: the suite's, then the tuned ``values`` on top."""
        from lmopt.bench.tuning import apply_values

        points = self.eval_points if curve else self.tuning_eval_points
        base = {
            "preset": self.preset, "data": self.data, "optimizer": optimizer,
            "optim": dict(self.optim_options.get(optimizer, {})), "schedule": self.schedule,
            "min_lr_ratio": self.min_lr_ratio, "seq_len": self.seq_len, "batch_tokens": self.batch_tokens,
            "grad_accum": self.grad_accum, "steps": steps, "grad_clip": self.grad_clip,
            "eval_interval": max(1, steps // points), "eval_tokens": self.eval_tokens,
            "log_interval": max(1, steps // 10), "ckpt_interval": max(1, steps // 4), "seed": seed,
            "threads": self.threads_per_job, "device": self.device, "dtype": self.dtype, "compile": self.compile,
            "run_name": run_name,
        }
        return apply_values(base, values, OPTIMIZERS.get(optimizer).defaults)

    def compute_plan(self, seconds_per_run: float, optimizers: int | None = None) -> dict:
        """Runs and core-hours of this suite, given the measured time of one full-budget run on one core."""
        n = optimizers or len(self.optimizers)
        full_equivalents = self.tuning_budget + len(self.seeds) * sum(b / self.steps for b in self.budgets())
        runs = self.tuning_budget + len(self.seeds) * len(self.budgets())
        core_hours = n * full_equivalents * seconds_per_run * max(1, self.threads_per_job) / 3600
        return {"optimizers": n, "runs": n * runs, "full_run_equivalents": n * full_equivalents,
                "core_hours": core_hours}


def register(suite: Suite) -> Suite:
    return SUITES.register(suite.name, suite, suite.description.split("\n")[0])


# AdamW and Muon first: they are the baselines every comparison needs, so partial results are useful early
ALL = ("adamw", "muon", *(name for name in OPTIMIZERS.names() if name not in ("adamw", "muon")))
LADDER_BASE = ("adamw", "muon", "adafactor")

register(Suite(
    name="cpu-quick",
    description=(
        "Smoke test of the whole protocol in under 10 minutes on 2 cores: nano, AdamW and Muon, 3 tuning runs,\n"
        "2 held-out seeds at 2 budgets, 40 steps of 2,048 tokens. Not a result."
    ),
    preset="nano", data="brown", seq_len=64, batch_tokens=2048, steps=40, optimizers=("adamw", "muon"),
    tuning_budget=3, seeds=(0, 1), budget_fractions=(0.5,), eval_points=4, eval_tokens=16384,
))

CPU_RUNG = dict(data="brown", seq_len=128, batch_tokens=2048, steps=200, ladder="cpu-ladder")

register(Suite(
    name="cpu-full",
    description=(
        "The CPU result and the ladder's first rung: every registered optimizer on nano (1.54M params, 0.49M\n"
        "non-embedding) and the Brown corpus, 200 steps x 2,048 tokens = 410k tokens (0.30 epochs; 0.27\n"
        "tokens/param: far below compute-optimal, a data- and compute-starved regime). Tuning: 12 runs per\n"
        "optimizer on seed 100 (coordinate search over lr, own knob, weight decay, warm-up); report: 5 held-out\n"
        "seeds (0-4) x complete runs at 1/4, 1/2 and 1 of the budget. Plan: 11 x (12 + 5 x 1.75) = 228\n"
        "full-run equivalents x ~190 s on one core (measured, two runs at once) = 12 core-hours, ~6 h with\n"
        "--jobs 2 on 2 cores."
    ),
    preset="nano", optimizers=ALL, **CPU_RUNG,
))

register(Suite(
    name="cpu-ladder-micro",
    description=(
        "Ladder rung 2: micro (d 192, 4 layers: 1.72M non-embedding of 3.30M params), same data and budget as\n"
        "cpu-full (0.12 tokens/param). AdamW, Muon, Adafactor and every optimizer that beat AdamW on cpu-full,\n"
        "each starting from its cpu-full values, 6 tuning runs (lr and its own knob: coarser, stated), 3\n"
        "held-out seeds x 3 budgets. Plan: n x (6 + 3 x 1.75) run equivalents x ~270 s on one core (measured,\n"
        "two runs at once): 5.1 core-hours for n = 6 (the three above and Spectra, LAMB, OrthoAdam). dtype fp32\n"
        "(strict, no TF32): the same precision on a CPU or, where one is lent, a GPU (`lmopt bench run` there);\n"
        "the report names the device of every run."
    ),
    preset="micro", optimizers=LADDER_BASE, tuning_budget=6, seeds=(0, 1, 2), transfer_from="cpu-full",
    rung_knobs=("lr", "own"), dtype="fp32", **CPU_RUNG,
))

register(Suite(
    name="cpu-ladder-small",
    description=(
        "Ladder rung 3: small (d 256, 6 layers: 5.90M non-embedding of 8.00M params, 74%), same data and budget\n"
        "(0.05 tokens/param), as rung 2 (fp32 too). Plan: n x 11.25 run equivalents x ~600 s (measured): 11.3\n"
        "core-hours for n = 6."
    ),
    preset="small", optimizers=LADDER_BASE, tuning_budget=6, seeds=(0, 1, 2), transfer_from="cpu-full",
    rung_knobs=("lr", "own"), dtype="fp32", **CPU_RUNG,
))

GPU_RUNG = dict(data="fineweb", seq_len=1024, batch_tokens=262144, grad_accum=8, eval_tokens=1_048_576,
                threads_per_job=0, device="cuda", dtype="bf16", compile=True, ladder="gpu-ladder")

register(Suite(
    name="gpu-ladder-44m",
    description=(
        "The GPU ladder's first rung: qwen3-44m (5.4M non-embedding params) on FineWeb with the Qwen3 tokenizer,\n"
        "1,000 steps x 262k tokens = 262M tokens (6 tokens/param); every optimizer, the cpu-full protocol."
    ),
    preset="qwen3-44m", steps=1000, optimizers=ALL, **GPU_RUNG,
))

register(Suite(
    name="gpu-ladder-72m",
    description=(
        "GPU ladder rung 2: qwen3-72m (13.3M non-embedding), 1,000 steps x 262k tokens; AdamW, Muon,\n"
        "Adafactor and the optimizers that beat AdamW on gpu-ladder-44m, from their tuned values, 6 tuning runs."
    ),
    preset="qwen3-72m", steps=1000, optimizers=LADDER_BASE, tuning_budget=6, seeds=(0, 1, 2),
    transfer_from="gpu-ladder-44m", rung_knobs=("lr", "own"), **GPU_RUNG,
))

register(Suite(
    name="gpu-134m",
    description=(
        "The papers' setting and the GPU ladder's top rung: qwen3-134m (56.6M non-embedding) with the Qwen3\n"
        "tokenizer on FineWeb (prepare it first: `lmopt data prepare --corpus fineweb --tokenizer qwen3 --source\n"
        "... --name fineweb`), bf16 autocast and torch.compile, one GPU per run; 2,000 steps x 256 x 1,024 tokens\n"
        "= 524M tokens per run (3.9 tokens/param) in 8 micro-batches of 32 sequences; every optimizer, the\n"
        "cpu-full protocol (12 tuning runs, 5 held-out seeds x 3 budgets)."
    ),
    preset="qwen3-134m", steps=2000, optimizers=ALL, **GPU_RUNG,
))


def ladder_rungs(ladder: str) -> list[Suite]:
    """The suites of a ladder, smallest model first."""
    from lmopt.model import get_preset

    rungs = [s.value for s in SUITES.entries() if s.value.ladder == ladder]
    return sorted(rungs, key=lambda s: get_preset(s.preset).param_counts()[1])


def epochs(suite: Suite, train_tokens: int) -> float:
    return suite.tokens() / train_tokens if train_tokens else math.nan
