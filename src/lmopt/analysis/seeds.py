"""Why do AdamW's seeds spread so far on the CPU benchmark? (issue 14) A diagnostic loop and its report.

The loop reproduces :class:`lmopt.train.Trainer` step for step at the ``cpu-full`` benchmark setting (preset
``nano``, ``brown``/``bpe-8192``, seq_len 128, 16 sequences a step, a 400-step cosine schedule to 0.1 with
warm-up, grad clip 1.0, weight decay 0.1 on matrices, fp32 on one CPU thread; the same initial weights, data
order and fused AdamW), but

- decouples the uses of the seed: ``init_seed`` draws the initial weights, ``data_seed`` the batch order,
  ``embed_init_seed`` the embedding alone; ``init_jitter`` perturbs the weights by a relative 1e-6;
- may stop before the end of the schedule (the lr schedule is always that of the full 400-step run, so a
  truncated run is the exact prefix of the full one);
- changes one thing at a time (:data:`CONFIGS`): warm-up, β2, clipping, the embedding's lr.

Per step it records the training loss, the global gradient norm before clipping and whether clipping was
active, the lr, and per parameter role (:mod:`lmopt.optim.roles`: embedding (tied with the head), attn_q/k/v/o,
mlp, norm) the RMS of the update ``w_after - w_before``, the RMS of the weights and the gradient norm.
Validation loss (the benchmark's first 32,768 validation tokens) is measured every ``EVAL_EVERY`` steps. From
the per-seed curves it finds the *separation step*: the first step after which the spread of the seeds'
smoothed training losses stays above what the per-step batch noise can explain (:func:`separation_step`).

Run ``python -m lmopt.analysis.seeds --out results/adamw-seeds``. Each run is kept in
``<out>/runs/<id>.json`` (``id``: a hash of what determines the trajectory, so a run shared by several
configurations, or a shorter run of the same trajectory, is computed once) and reused when asked for again;
runs are deterministic. ``summary.json``, ``curves.png`` and ``update_rms.png`` are then written from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmopt.data import BatchLoader, eval_batches, load_prepared
from lmopt.model import build_model, get_preset
from lmopt.optim import build
from lmopt.optim.roles import param_roles
from lmopt.train.schedule import lr_factor

SCHEDULE_STEPS = 400
SEQ_LEN, BATCH_SIZE, EVAL_TOKENS = 128, 16, 32768
EVAL_EVERY = 50
ROLE_ORDER = ("embedding", "attn_q", "attn_k", "attn_v", "attn_o", "mlp", "norm")


@dataclass(frozen=True)
class RunSpec:
    """One diagnostic run; the defaults are the benchmark's AdamW setting at its best lr.

    ``seed`` only labels the run within its configuration; ``init_seed`` draws the weights, ``data_seed`` the
    batch order, ``embed_init_seed`` (if set) the embedding alone, and ``init_jitter`` > 0 multiplies every
    initial weight by ``1 + init_jitter * N(0, 1)`` (noise drawn from ``jitter_seed``): a perturbation far below
    any seed's but above float32 rounding. Fields left at None are not part of :meth:`physics`.
    """

    config: str = "baseline"
    seed: int = 0
    init_seed: int = 0
    data_seed: int = 0
    embed_init_seed: int | None = None
    init_jitter: float = 0.0
    jitter_seed: int = 0
    steps: int = 100
    lr: float = 0.0025
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    embed_lr_scale: float = 1.0
    weight_decay: float = 0.1
    schedule_steps: int = SCHEDULE_STEPS

    @property
    def key(self) -> str:
        return f"{self.config}-s{self.seed}"

    def physics(self) -> dict:
        """What determines the trajectory (not its label or length): runs with equal physics share a prefix."""
        return {k: v for k, v in asdict(self).items() if k not in ("config", "seed", "steps") and v is not None}

    def physics_id(self) -> str:
        return hashlib.sha1(json.dumps(self.physics(), sort_keys=True).encode()).hexdigest()[:10]


# --- the configurations -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A diagnostic configuration: what it changes, the run of each seed label, the seeds run by default."""

    description: str
    make: Callable[[int], RunSpec]
    seeds: tuple[int, ...] = (0, 1, 2)


def _same_seed(**changes) -> Callable[[int], RunSpec]:
    return lambda seed: RunSpec(seed=seed, init_seed=seed, data_seed=seed, **changes)


CONFIGS: dict[str, Config] = {
    "baseline": Config("benchmark setting: warm-up 20 steps, betas (0.9, 0.95), eps 1e-8, clip 1.0",
                       _same_seed(steps=200)),
    "jitter": Config("weights and data of seed 0, weights x (1 + 1e-6 N(0,1)) drawn from the seed",
                     lambda s: RunSpec(seed=s, init_jitter=1e-6 if s else 0.0, jitter_seed=s)),
    "init-varies": Config("weights from the seed, data order of seed 0", lambda s: RunSpec(seed=s, init_seed=s)),
    "data-varies": Config("weights of seed 0, data order from the seed", lambda s: RunSpec(seed=s, data_seed=s)),
    "embed-init-varies": Config("embedding (tied head) initialised from the seed, the rest and the data from seed 0",
                                lambda s: RunSpec(seed=s, embed_init_seed=s or None, steps=50), seeds=(0, 1)),
    "blocks-init-varies": Config("embedding and data of seed 0, every other weight initialised from the seed",
                                 lambda s: RunSpec(seed=s, init_seed=s, embed_init_seed=0 if s else None, steps=50),
                                 seeds=(0, 1)),
    "warmup0.2": Config("warm-up 80 steps (warmup_frac 0.2)", _same_seed(warmup_frac=0.2)),
    "warmup0.2-full": Config("warm-up 80 steps (warmup_frac 0.2), the whole 400-step run",
                             _same_seed(warmup_frac=0.2, steps=400), seeds=(0, 1)),
    "beta2-0.99": Config("betas (0.9, 0.99)", _same_seed(betas=(0.9, 0.99))),
    "embed-lr0.1": Config("embedding (tied head) lr x0.1", _same_seed(embed_lr_scale=0.1), seeds=(0, 1)),
    "no-clip": Config("no gradient clipping", _same_seed(grad_clip=0.0), seeds=(0, 1)),
}


NOT_RUN = ("embed-lr0.1", "no-clip")  # defined but left out of the default set (compute budget; see the docs)
DEFAULT_CONFIGS = tuple(name for name in CONFIGS if name not in NOT_RUN)


def config_specs(name: str, seeds: Sequence[int] | None = None, steps: int | None = None) -> list[RunSpec]:
    """The runs of configuration ``name`` for ``seeds`` (default: its own), ``steps`` long (default: its own)."""
    config = CONFIGS[name]
    specs = [replace(config.make(seed), config=name) for seed in (config.seeds if seeds is None else seeds)]
    return [replace(s, steps=steps) if steps else s for s in specs]


# --- measurements -----------------------------------------------------------------------------------------

def role_rms(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> dict[str, float]:
    """RMS over all elements of each role's tensors: sqrt(sum of squares / number of elements)."""
    sums: dict[str, list[float]] = {}
    for name, t in tensors.items():
        acc = sums.setdefault(roles[name], [0.0, 0.0])
        acc[0] += float(t.detach().double().pow(2).sum())
        acc[1] += t.numel()
    return {role: math.sqrt(s / n) for role, (s, n) in sums.items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def step_noise(curves: np.ndarray) -> float:
    """Per-step loss noise σ, robustly from first differences: median |Δ| / (0.6745 √2), pooled over curves."""
    diffs = np.abs(np.diff(curves, axis=-1)).ravel()
    return float(np.median(diffs) / (0.6745 * math.sqrt(2)))


def separation_step(curves: Sequence[Sequence[float]], window: int = 10, k: float = 3.0,
                    persist: int = 20) -> dict:
    """Where the seeds' loss curves come apart beyond the per-step noise.

    ``curves``: one per-step loss curve per seed (equal lengths). Each is smoothed by a trailing mean of
    ``window`` steps; the spread (max - min over seeds) of the smoothed curves is compared with
    ``k`` σ √(2 / window), the spread two smoothed curves show from batch noise alone (σ: :func:`step_noise`).
    The separation step is the first (1-based) step from which the spread stays above that threshold for
    ``persist`` steps; None if never.
    """
    arr = np.asarray(curves, dtype=float)
    sigma = step_noise(arr)
    threshold = k * sigma * math.sqrt(2.0 / window)
    spread = np.ptp(np.stack([moving_average(c, window) for c in arr]), axis=0)
    above = spread > threshold
    first = None
    for t in range(window - 1, len(above) - persist + 1):
        if above[t : t + persist].all():
            first = t + 1
            break
    return {"step": first, "noise_sigma": sigma, "threshold": threshold, "window": window, "k": k,
            "persist": persist, "final_spread": float(spread[-1])}


def plateau_exit(loss: Sequence[float], level: float, margin: float = 0.1, window: int = 10) -> int | None:
    """The first (1-based) step at which the ``window``-step mean train loss is below ``level - margin``: when a
    run leaves the unigram plateau (``level``: :func:`unigram_val_loss`); None if it has not."""
    below = np.flatnonzero(moving_average(np.asarray(loss, dtype=float), window) < level - margin)
    return int(below[0]) + 1 if below.size else None


# --- the loop ---------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    """lmopt's AdamW (role groups, fused), with the embedding group's lr scaled by ``embed_lr_scale``."""
    opt = build("adamw", model, lr=spec.lr, weight_decay=spec.weight_decay, total_steps=spec.schedule_steps,
                betas=spec.betas, eps=spec.eps)
    for group in opt.param_groups:
        if group["role"] == "embedding":
            group["lr"] = spec.lr * spec.embed_lr_scale
    return opt


@torch.no_grad()
def jitter_(model: nn.Module, scale: float, seed: int) -> None:
    """Multiply every weight by ``1 + scale * N(0, 1)`` (noise from ``seed``, drawn in parameter order)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.mul_(1.0 + scale * torch.randn(p.shape, generator=gen))


def build_run(spec: RunSpec, data) -> tuple[nn.Module, torch.optim.Optimizer, object, BatchLoader]:
    """Model, optimizer, lr scheduler and loader wired as ``Trainer`` wires them, with the seeds decoupled."""
    config = get_preset("nano").config
    model = build_model(config, seed=spec.init_seed, device="cpu")
    if spec.embed_init_seed is not None:
        with torch.no_grad():
            model.embed_tokens.weight.copy_(build_model(config, seed=spec.embed_init_seed).embed_tokens.weight)
    if spec.init_jitter:
        jitter_(model, spec.init_jitter, spec.jitter_seed)
    opt = build_optimizer(model, spec)
    warmup = round(spec.warmup_frac * spec.schedule_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, spec.schedule_steps, warmup, "cosine", 0.1))
    return model, opt, sched, BatchLoader(data.train, SEQ_LEN, BATCH_SIZE, seed=spec.data_seed)


@torch.no_grad()
def evaluate(model: nn.Module, val_tokens: np.ndarray) -> float:
    """Mean validation loss over the benchmark's eval tokens (as ``Trainer.evaluate`` on one process)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(val_tokens, SEQ_LEN, BATCH_SIZE, EVAL_TOKENS):
        _, loss = model(x, y)
        total, count = total + float(loss.double()) * x.shape[0], count + x.shape[0]
    model.train()
    return total / count


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


class Recorder:
    """Column-wise per-step records (rounded: summary.json stays small)."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {"loss": [], "grad_norm": [], "clipped": [], "lr": []}
        self.roles: dict[str, dict[str, list[float]]] = {"update_rms": {}, "weight_rms": {}, "grad_norm": {}}
        self.val: list[tuple[int, float]] = []

    def add(self, scalars: dict[str, float], per_role: dict[str, dict[str, float]]) -> None:
        for key, value in scalars.items():
            self.cols[key].append(int(value) if key == "clipped" else _round(value, 5))
        for kind, values in per_role.items():
            for role, v in values.items():
                self.roles[kind].setdefault(role, []).append(_round(v))

    def to_dict(self) -> dict:
        return self.cols | {f"role_{k}": v for k, v in self.roles.items()} | {"val": self.val}


def role_grad_norms(model: nn.Module, roles: dict[str, str]) -> dict[str, float]:
    """Per-role L2 norm of the gradient (before clipping); their root sum of squares is the global norm."""
    sq = {role: math.pow(v, 2) for role, v in role_rms({n: p.grad for n, p in model.named_parameters()},
                                                        roles).items()}
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        counts[roles[name]] = counts.get(roles[name], 0) + p.numel()
    return {role: math.sqrt(sq[role] * counts[role]) for role in sq}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, loader: BatchLoader, clip: float,
               roles: dict[str, str]) -> tuple[float, float, dict[str, float]]:
    """Forward, backward, clip, optimizer step (as ``Trainer.train_step``); (loss, grad norm, per-role norms)."""
    x, y = loader.next_batch()
    _, loss = model(x, y)
    loss.backward()
    per_role = role_grad_norms(model, roles)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(grad_norm), per_role


def run(spec: RunSpec, data, log: Callable[[str], None] = print) -> dict:
    """Train ``spec`` for ``spec.steps`` steps; its record: per-step columns, val points, seconds."""
    model, opt, sched, loader = build_run(spec, data)
    roles = param_roles(model)
    rec, start = Recorder(), time.perf_counter()
    for step in range(1, spec.steps + 1):
        lr = opt.param_groups[0]["lr"]
        before = snapshot(model)
        loss, gnorm, role_gnorm = train_step(model, opt, loader, spec.grad_clip, roles)
        sched.step()
        after = snapshot(model)
        rec.add({"loss": loss, "grad_norm": gnorm, "clipped": 0 < spec.grad_clip < gnorm, "lr": lr},
                {"update_rms": role_rms({n: after[n] - before[n] for n in after}, roles),
                 "weight_rms": role_rms(after, roles), "grad_norm": role_gnorm})
        if step % EVAL_EVERY == 0 or step == spec.steps:
            rec.val.append((step, evaluate(model, data.val)))
            log(f"  {spec.key} step {step}: loss {loss:.3f} val {rec.val[-1][1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return {"physics": spec.physics(), "steps": spec.steps, "seconds": time.perf_counter() - start} | rec.to_dict()


def truncate(record: dict, steps: int) -> dict:
    """The first ``steps`` steps of a longer run's record (a run's prefix does not depend on its length)."""
    def cut(value):
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value[:steps] if isinstance(value, list) else value

    out = {k: cut(v) for k, v in record.items() if k not in ("val", "physics")}
    return out | {"physics": record["physics"], "steps": steps, "val": [v for v in record["val"] if v[0] <= steps]}


def load_or_run(spec: RunSpec, data, runs_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The record of ``spec``: from ``runs_dir`` when a run with the same physics went at least as far, else run
    (and store) it."""
    path = runs_dir / f"{spec.physics_id()}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record["physics"] == json.loads(json.dumps(spec.physics())) and record["steps"] >= spec.steps:
            return truncate(record, spec.steps)
    log(f"running {spec.key} ({spec.physics_id()}, {spec.steps} steps)")
    record = run(spec, data, log)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, separators=(",", ":")))
    return record


# --- the report -------------------------------------------------------------------------------------------

def unigram_val_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy on the eval targets of the train unigram distribution (add-½): the first plateau's level."""
    counts = np.bincount(train, minlength=vocab).astype(float) + 0.5
    logp = np.log(counts / counts.sum())
    n_windows = min((len(val) - 1) // SEQ_LEN, EVAL_TOKENS // SEQ_LEN)
    targets = np.asarray(val[1 : n_windows * SEQ_LEN + 1], dtype=np.int64)
    return float(-logp[targets].mean())


BENCH_REV, BENCH_DIR = "3a90aa0", "results/cpu-full"  # the last commit holding the cpu-full records


def bench_records(rev: str = BENCH_REV, folder: str = BENCH_DIR) -> dict[str, list[dict]]:
    """{run stem: its JSON lines} of a committed benchmark, read from git (``rev:folder/runs/*.jsonl``)."""
    names = _git("ls-tree", "--name-only", f"{rev}:{folder}/runs").split()
    return {name.removesuffix(".jsonl"): [json.loads(line) for line in
                                          _git("show", f"{rev}:{folder}/runs/{name}").splitlines()]
            for name in names if name.endswith(".jsonl")}


def benchmark_seed_table(runs: dict[str, list[dict]], steps: Sequence[int] = (50, 100, 200, 400)) -> dict:
    """Every optimizer with seeds 0, 1, 2 at one lr (400 steps): their val loss at ``steps``, the sample SD of the
    final loss and the seeds ordered from best to worst."""
    table: dict[str, dict] = {}
    for stem in sorted(s.removesuffix("-s1-t400") for s in runs if s.endswith("-s1-t400")):
        curves = {}
        for seed in (0, 1, 2):
            evals = {r["step"]: r["val_loss"] for r in runs[f"{stem}-s{seed}-t400"] if r["event"] == "eval"}
            curves[seed] = {s: round(evals[s], 4) for s in steps if s in evals}
        optimizer, lr = stem.rsplit("-lr", 1)
        finals = [curves[s][steps[-1]] for s in (0, 1, 2)]
        table[optimizer] = {"lr": float(lr), "val": curves, "final_sd": round(float(np.std(finals, ddof=1)), 4),
                            "order": sorted((0, 1, 2), key=lambda s: curves[s][steps[-1]])}
    return table


def val_stats(records: Sequence[dict]) -> dict[int, dict]:
    """Per eval step shared by all runs: the seeds' val losses, their mean and sample SD."""
    shared = set.intersection(*({s for s, _ in r["val"]} for r in records))
    out = {}
    for step in sorted(shared):
        vals = [dict((s, v) for s, v in r["val"])[step] for r in records]
        out[step] = {"values": [round(v, 4) for v in vals], "mean": round(float(np.mean(vals)), 4),
                     "sd": round(float(np.std(vals, ddof=1)), 4) if len(vals) > 1 else 0.0}
    return out


SUMMARY_COLUMNS = ("loss", "grad_norm", "clipped", "role_update_rms")  # the rest stays in runs/<id>.json


def summarize_config(name: str, specs: Sequence[RunSpec], records: Sequence[dict], unigram: float) -> dict:
    """One configuration's entry in summary.json: description, val spread, separation step, and per seed its
    spec, final val loss, plateau exit step, val points and the per-step columns of ``SUMMARY_COLUMNS``."""
    length = min(len(r["loss"]) for r in records)
    seeds = {str(spec.seed): {"spec": spec.physics(), "run_file": f"runs/{spec.physics_id()}.json",
                              "final_val": round(r["val"][-1][1], 4), "plateau_exit": plateau_exit(r["loss"], unigram),
                              "val": r["val"]} | {k: r[k] for k in SUMMARY_COLUMNS}
             for spec, r in zip(specs, records, strict=True)}
    return {"description": CONFIGS[name].description, "steps": length, "val": val_stats(records),
            "separation": separation_step([r["loss"][:length] for r in records]) if len(records) > 1 else None,
            "clipped_fraction": {s: round(float(np.mean(r["clipped"])), 3) for s, r in seeds.items()},
            "plateau_exit": {s: r["plateau_exit"] for s, r in seeds.items()},
            "seeds": seeds}


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[3]
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()


def git_head() -> dict:
    try:
        return {"commit": _git("rev-parse", "HEAD"),
                "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


# --- plots ------------------------------------------------------------------------------------------------

SMOOTH = 10
SEED_COLORS = ("C0", "C3", "C2", "C1", "C4")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_config(ax, name: str, entry: dict, unigram: float) -> None:
    for i, (seed, rec) in enumerate(entry["seeds"].items()):
        color = SEED_COLORS[i % len(SEED_COLORS)]
        loss = np.asarray(rec["loss"][: entry["steps"]])
        steps = np.arange(1, len(loss) + 1)
        ax.plot(steps, moving_average(loss, SMOOTH), color=color, lw=1.2, label=f"seed {seed}")
        vs, vv = zip(*rec["val"], strict=True)
        ax.plot(vs, vv, "o", color=color, ms=4, mec="k", mew=0.5)
    ax.axhline(unigram, color="gray", ls="--", lw=0.8, label="unigram loss")
    sep = entry["separation"]["step"] if entry["separation"] else None
    if sep:
        ax.axvline(sep, color="k", ls=":", lw=0.8, label=f"separation (step {sep})")
    last = entry["val"][max(entry["val"])]
    ax.set_title(f"{name}: val@{max(entry['val'])} SD {last['sd']:.3f}", fontsize=9)
    ax.set_ylim(5.7 if entry["steps"] > 250 else 6.3, 7.9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({SMOOTH}-step mean); dots: val")
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3)


def _plot_divergence(ax, configs: dict, reference: str = "baseline") -> None:
    """|train loss - seed 0's| step by step, for configurations whose runs all see seed 0's batches."""
    ref = np.asarray(configs[reference]["seeds"]["0"]["loss"])
    floor = 1e-5  # losses are recorded to 5 significant digits (resolution 1e-4 near 7): smaller differences read 0
    for name, ls in (("jitter", "-"), ("init-varies", "--")):
        for i, (seed, rec) in enumerate(configs.get(name, {"seeds": {}})["seeds"].items()):
            if seed == "0":
                continue
            loss = np.asarray(rec["loss"])
            n = min(len(loss), len(ref))
            diff = np.maximum(np.abs(loss[:n] - ref[:n]), floor)
            ax.semilogy(np.arange(1, n + 1), diff, ls, color=SEED_COLORS[i], lw=0.9, label=f"{name} seed {seed}")
    ax.axhline(1e-4, color="gray", lw=0.8, ls=":", label="recording resolution (1e-4)")
    ax.set_title("same batches: |train loss - seed 0 run| (jitter: weights x (1 + 1e-6 N))", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("|Δ loss| per step (unsmoothed)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def _plot_benchmark(ax, table: dict, unigram: float) -> None:
    """The committed benchmark: each optimizer's seed SD of the final loss against its mean val loss at step 50."""
    for name, row in table.items():
        x = float(np.mean([row["val"][s][50] for s in (0, 1, 2)]))
        ax.plot(x, row["final_sd"], "o", color="C3" if row["order"] == [0, 2, 1] else "C0", ms=5)
        ax.annotate(name, (x, row["final_sd"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axvline(unigram, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("mean val loss of seeds 0-2 at step 50 (dashed: unigram loss)")
    ax.set_ylabel("SD of final (step 400) val loss over seeds 0-2")
    ax.set_title("committed cpu-full: spread vs plateau at step 50 (red: seed order 0<2<1)", fontsize=9)
    ax.grid(alpha=0.3)


def plot_curves(summary: dict, path: Path) -> None:
    """One panel per configuration (per-seed smoothed train loss, val dots), the divergence panel and the
    committed benchmark's spread-vs-plateau panel."""
    plt = _pyplot()
    configs = summary["configs"]
    extra = [p for p, present in (("divergence", "jitter" in configs or "init-varies" in configs),
                                  ("benchmark", bool(summary["benchmark_seeds"]))) if present]
    n = len(configs) + len(extra)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, configs.items(), strict=False):
        _plot_config(ax, name, entry, summary["unigram_val_loss"])
    for ax, panel in zip(axes.flat[len(configs):], extra, strict=False):
        if panel == "divergence":
            _plot_divergence(ax, configs)
        else:
            _plot_benchmark(ax, summary["benchmark_seeds"], summary["unigram_val_loss"])
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle("AdamW lr 0.0025, nano / brown, seeds at the cpu-full setting and one change at a time", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_update_rms(summary: dict, path: Path, compare: str | None = None) -> None:
    """Per-role update RMS over steps per seed (baseline solid, ``compare`` dashed), and the gradient norm."""
    plt = _pyplot()
    configs = summary["configs"]
    shown = [("baseline", "-")] + ([(compare, "--")] if compare in configs else [])
    panels = [*ROLE_ORDER, "grad_norm"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=True):
        for name, ls in shown:
            for i, (seed, rec) in enumerate(configs[name]["seeds"].items()):
                y = rec["grad_norm"] if panel == "grad_norm" else rec["role_update_rms"][panel]
                ax.semilogy(np.arange(1, len(y) + 1), moving_average(np.asarray(y), 5), ls,
                            color=SEED_COLORS[i], lw=1.0, label=f"{name} seed {seed}")
        if panel == "grad_norm":
            ax.axhline(1.0, color="k", lw=0.8, ls=":", label="clip threshold")
            ax.set_title("global grad norm before clipping (5-step mean)", fontsize=9)
        else:
            ax.set_title(f"{panel}: update RMS (5-step mean)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7)
    axes.flat[-1].legend(fontsize=7)
    fig.suptitle("Per-role RMS of the parameter change per step (w_after - w_before), AdamW lr 0.0025", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------------

def run_all(specs_by_config: dict[str, list[RunSpec]], data, runs_dir: Path,
            log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Every configuration's records; a trajectory shared by several configurations is run once, to the
    longest length any of them asks for."""
    longest: dict[str, int] = {}
    for spec in (s for specs in specs_by_config.values() for s in specs):
        longest[spec.physics_id()] = max(longest.get(spec.physics_id(), 0), spec.steps)
    return {name: [truncate(load_or_run(replace(s, steps=longest[s.physics_id()]), data, runs_dir, log), s.steps)
                   for s in specs]
            for name, specs in specs_by_config.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmopt.analysis.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/adamw-seeds"), help="output folder")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all but {', '.join(NOT_RUN)})")
    parser.add_argument("--seeds", default="", help="comma-separated seed labels for every configuration "
                        "(default: each configuration's own, see CONFIGS)")
    parser.add_argument("--steps", type=int, default=0, help="run length for every configuration (0: its own)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the benchmark used 1)")
    parser.add_argument("--bench-rev", default=BENCH_REV,
                        help=f"git revision whose {BENCH_DIR}/runs seeded runs are tabulated ('' to skip)")
    parser.add_argument("--compare", default="warmup0.2-full", help="configuration drawn dashed in update_rms.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_prepared("brown", "bpe-8192")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    specs = {name: config_specs(name, seeds, args.steps or None) for name in args.configs.split(",")}
    start = time.perf_counter()
    records = run_all(specs, data, args.out / "runs", log=lambda m: print(m, flush=True))
    unigram = unigram_val_loss(data.train, data.val, data.vocab_size)
    summary = {
        "command": " ".join(["python -m lmopt.analysis.seeds", *(sys.argv[1:] if argv is None else argv)]),
        "git": git_head(), "torch": torch.__version__, "threads": args.threads,
        "setting": {"preset": "nano", "data": "brown.bpe-8192", "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE,
                    "schedule": f"cosine over {SCHEDULE_STEPS} steps to 0.1", "eval_tokens": EVAL_TOKENS},
        "wall_seconds_this_call": round(time.perf_counter() - start, 1),
        "run_wall_seconds_all_runs": round(sum(r["seconds"] for rs in records.values() for r in rs), 1),
        "unigram_val_loss": round(unigram, 4),
        "benchmark_seeds": benchmark_seed_table(bench_records(args.bench_rev)) if args.bench_rev else {},
        "configs": {name: summarize_config(name, specs[name], records[name], unigram) for name in specs},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, separators=(",", ":")))
    plot_curves(summary, args.out / "curves.png")
    plot_update_rms(summary, args.out / "update_rms.png", args.compare)
    print(f"wrote {args.out}/summary.json, curves.png, update_rms.png")
    return summary


if __name__ == "__main__":
    main()
