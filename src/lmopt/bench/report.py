"""``lmopt bench report SUITE``: the leaderboard, plots and the papers' claims beside our measurements, from
the stored run records in ``results/<suite>/runs/`` alone (so it regenerates anywhere)."""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmopt.bench.claims import CLAIMS, Claim
from lmopt.bench.runner import best_lr, load_records, results_dir
from lmopt.bench.stats import bootstrap_speedup, budget_speedup, budget_speedup_text, welch
from lmopt.bench.step_summary import fastest_rows
from lmopt.bench.suites import Suite
from lmopt.data.paths import atomic_write_text
from lmopt.registry import SUITES

BASELINE = "adamw"
SIGNIFICANCE = 0.05


@dataclass
class OptimizerResult:
    name: str
    best_lr: float
    lrs: list[float]
    sweep_finals: dict[float, float]
    seeds: list[int]
    finals: list[float]  # final val loss per seed at the best lr, main budget
    tokens: np.ndarray  # eval token counts of the main-budget curves
    curves: np.ndarray  # (seeds, evals) val loss at the best lr
    budget_finals: dict[int, list[float]] = field(default_factory=dict)  # steps -> finals per seed

    @property
    def interior(self) -> bool:
        return self.lrs[0] < self.best_lr < self.lrs[-1]

    @property
    def mean(self) -> float:
        return float(np.mean(self.finals))

    @property
    def std(self) -> float:
        return float(np.std(self.finals, ddof=1)) if len(self.finals) > 1 else math.nan


def collect(suite: Suite, records: dict[str, dict]) -> dict[str, OptimizerResult]:
    results = {}
    for name in suite.optimizers:
        found = best_lr(records, name, suite.sweep_seed, suite.steps)
        if found is None:
            continue
        best, lrs = found
        at_best = {}
        budget_finals: dict[int, list[float]] = {}
        sweep_finals = {}
        for record in records.values():
            c, end = record["config"], record["end"]
            if c["optimizer"] != name:
                continue
            if c["seed"] == suite.sweep_seed and c["steps"] == suite.steps:
                sweep_finals[c["lr"]] = end["final_val_loss"]
            if c["lr"] != best:
                continue
            budget_finals.setdefault(c["steps"], []).append(end["final_val_loss"])
            if c["steps"] == suite.steps and not end.get("diverged"):
                at_best[c["seed"]] = record
        seeds = sorted(at_best)
        if not seeds:
            continue
        tokens = np.array([e["tokens"] for e in at_best[seeds[0]]["evals"]], dtype=float)
        curves = np.array([[e["val_loss"] for e in at_best[s]["evals"]] for s in seeds])
        results[name] = OptimizerResult(name, best, lrs, sweep_finals, seeds,
                                        [at_best[s]["end"]["final_val_loss"] for s in seeds], tokens, curves,
                                        budget_finals)
    return results


def speedups(results: dict[str, OptimizerResult], suite: Suite) -> dict[str, dict]:
    out = {}
    base = results.get(BASELINE)
    if base is None:
        return out
    base_final = base.mean
    for name, r in results.items():
        point, low, high = bootstrap_speedup(base.curves, r.curves, r.tokens, base.tokens)
        budgets = sorted(r.budget_finals)
        budget_tokens = [suite.tokens(b) for b in budgets]
        budget_means = [float(np.mean(r.budget_finals[b])) for b in budgets]
        complete = budget_speedup(base_final, suite.tokens(), budget_tokens, budget_means)
        complete_text = budget_speedup_text(base_final, suite.tokens(), budget_tokens, budget_means)
        t, p = welch(r.finals, base.finals)
        out[name] = {"speedup": point, "low": low, "high": high, "complete_runs": complete,
                     "complete_runs_text": complete_text, "t": t, "p": p,
                     "delta": r.mean - base_final}
    return out


def verdict(claim: Claim, results: dict[str, OptimizerResult], sp: dict[str, dict]) -> tuple[str, str]:
    """(our measurement, verdict) for one claim."""
    if claim.kind == "untestable":
        return "—", "not testable at this scale: needs downstream evaluation of a multi-billion-parameter model"
    if claim.optimizer not in results or claim.versus not in results:
        return "—", "not testable here: not run in this suite"
    r, v = results[claim.optimizer], results[claim.versus]
    _t, p = welch(r.finals, v.finals)
    measured = f"{r.mean:.4f} vs {v.mean:.4f} (Δ {r.mean - v.mean:+.4f}, p {p:.3g})"
    if claim.kind == "speedup":
        s = sp[claim.optimizer]
        measured = f"speedup {s['speedup']:.2f}x [{s['low']:.2f}, {s['high']:.2f}]"
        if s["low"] >= claim.value:
            return measured, "reproduced at this scale"
        if s["high"] < claim.value:
            return measured, "not reproduced: the interval lies below the reported speedup"
        return measured, "not reproduced: the interval includes the claim but also much less (inconclusive)"
    significant = not math.isnan(p) and p < SIGNIFICANCE
    if claim.kind == "comparable":
        if significant and r.mean > v.mean:
            return measured, "not reproduced: significantly worse"
        return measured, "reproduced at this scale: no significant disadvantage"
    if significant and r.mean < v.mean:
        return measured, "reproduced at this scale (direction; the gap is ours, not the paper's)"
    if significant:
        return measured, "not reproduced: significantly worse"
    return measured, "not reproduced: no significant difference"


# --- output -----------------------------------------------------------------------------------------------------


def _fmt(x: float, spec: str = ".4f", unit: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + unit


def _step_results(root: Path) -> dict | None:
    files = sorted((root / "step").glob("*.json"))
    return json.loads(files[0].read_text()) if files else None


def _fastest_step(step_rows: dict, name: str) -> dict:
    """The step-benchmark row of ``name``'s fastest implementation, with its variant (e.g. " (compiled)")."""
    row = fastest_rows(step_rows).get(name)
    if row is None:
        return {}
    return step_rows[row] | {"variant": row[len(name):] if row != "adamw (fused)" else ""}


def write_report(suite_name: str, root: Path | None = None, command: str | None = None) -> Path:
    suite: Suite = SUITES.get(suite_name)
    out_dir = results_dir(suite_name, root)
    records = load_records(suite_name, root)
    if not records:
        raise FileNotFoundError(f"no run records in {out_dir / 'runs'}; run `lmopt bench run {suite_name}` first")
    results = collect(suite, records)
    sp = speedups(results, suite)
    plots = _plots(suite, results, sp, out_dir)
    step = _step_results(out_dir.parent)
    step_rows = step["results"] if step else {}
    envs = [r["environment"] for r in records.values()]
    commits = sorted({e["commit"] for e in envs})
    resolved = next(iter(records.values()))["resolved"]
    lines = [
        f"# Benchmark `{suite.name}`",
        "",
        suite.description.replace("\n", " "),
        "",
        f"- produced by: `{command or f'lmopt bench run {suite.name} && lmopt bench report {suite.name}'}`",
        f"- runs made at commit(s): {', '.join(f'`{c}`' for c in commits)}",
        f"- machine: {envs[0]['device']} ({envs[0]['device_name'] or platform.machine()}), torch {envs[0]['torch']}, "
        f"{envs[0]['threads']} thread(s) per run",
        f"- report written: {datetime.date.today().isoformat()} from {len(records)} stored runs",
        f"- model `{suite.preset}` ({resolved['params']:,} params), data `{suite.data}`, {suite.steps} steps x "
        f"{suite.batch_tokens:,} tokens = {suite.tokens():,} tokens = {resolved['epochs']:.2f} epochs; "
        f"{suite.schedule} schedule, warm-up {suite.warmup_frac:.0%}, grad clip {suite.grad_clip}",
        "",
        "## Leaderboard",
        "",
        "Best lr from the sweep seed; final validation loss at that lr over all seeds (mean ± sample std). "
        "Speedup: tokens AdamW needs to reach its own final loss divided by the tokens this optimizer needs, "
        "interpolated along the seed-mean validation curves, with a 95% seed-bootstrap interval; "
        "'complete runs' interpolates the final losses of full schedules at the suite's budgets instead. "
        "p: Welch's t-test of the final losses against AdamW's.",
        "",
        "| # | optimizer | best lr | lr grid | final val loss | Δ vs AdamW | p | speedup [95% CI] | "
        "speedup, complete runs | optimizer step vs fused AdamW | state vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(sorted(results.values(), key=lambda r: r.mean), 1):
        s = sp.get(r.name, {})
        edge = "" if r.interior else " (edge: widen)"
        grid = f"{r.lrs[0]:.3g}–{r.lrs[-1]:.3g} ({len(r.lrs)})"
        cost = _fastest_step(step_rows, r.name)
        verdict_p = s.get("p", math.nan)
        significance = "" if math.isnan(verdict_p) else (" *" if verdict_p < SIGNIFICANCE else "")
        lines.append(
            f"| {rank} | `{r.name}` | {r.best_lr:.3g}{edge} | {grid} | "
            f"{r.mean:.4f} ± {_fmt(r.std)} (n={len(r.finals)}) "
            f"| {_fmt(s.get('delta'), '+.4f')}{significance} | {_fmt(verdict_p, '.3g')} | "
            f"{_fmt(s.get('speedup'), '.2f', 'x')} [{_fmt(s.get('low'), '.2f')}, {_fmt(s.get('high'), '.2f')}] | "
            f"{s.get('complete_runs_text', '—')} | {_fmt(cost.get('time_vs_fused_adamw'), '.2f', 'x')}"
            f"{cost.get('variant', '')} | "
            f"{_fmt(cost.get('state_vs_adamw'), '.2f', 'x')} |"
        )
    lines += ["", "\\* significant at p < 0.05; otherwise the honest reading is *no significant difference*.", ""]
    if step:
        lines += [f"The last two columns are each optimizer's fastest measured implementation on `{step['preset']}`'s "
                  f"parameters, from `{step['command']}` at commit `{step['commit'][:12]}` "
                  "(results/step/, with the compiled variants and the training-step and trainer measurements).", ""]
    else:
        lines += ["Optimizer step time and state memory are measured by `lmopt bench step` (not yet run for this "
                  "report). Wall-clock times of the suite's runs are not compared: runs share the machine.", ""]
    lines += ["## Plots", ""] + [f"![{title}]({path.name})" for title, path in plots] + [""]
    lines += ["## The papers' claims beside our measurement", "",
              "Reported numbers are copied from `shared/papers/` (134M Qwen on FineWeb unless noted). Ours compare "
              "the same pair of optimizers in this suite, each at its own best lr.", "",
              "| paper | claim (as reported) | ours | verdict |", "|---|---|---|---|"]
    for claim in CLAIMS:
        measured, text = verdict(claim, results, sp)
        lines.append(f"| {claim.paper} | `{claim.optimizer}` vs `{claim.versus}`: {claim.reported} | {measured} | "
                     f"{text} |")
    lines += ["", "## Learning-rate sweeps (sweep seed, final validation loss)", "",
              "| optimizer | lr: final loss |", "|---|---|"]
    for r in results.values():
        cells = ", ".join(f"{lr:.3g}: {_fmt(loss)}" for lr, loss in sorted(r.sweep_finals.items()))
        lines.append(f"| `{r.name}` | {cells} |")
    path = out_dir / "leaderboard.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    summary = {name: {"best_lr": r.best_lr, "interior": r.interior, "lrs": r.lrs, "finals": r.finals,
                      "mean": r.mean, "std": r.std, **sp.get(name, {})} for name, r in results.items()}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return path


def _plots(suite: Suite, results: dict[str, OptimizerResult], sp: dict, out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(results, key=lambda n: results[n].mean)
    colors = {n: plt.cm.tab20(i / max(1, len(names) - 1)) for i, n in enumerate(names)}
    made = []

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for n in names:
        r = results[n]
        mean = r.curves.mean(0)
        ax.plot(r.tokens[1:], mean[1:], label=f"{n} (lr {r.best_lr:.3g})", color=colors[n])
        ax.fill_between(r.tokens[1:], r.curves.min(0)[1:], r.curves.max(0)[1:], color=colors[n], alpha=0.2)
    finals = [results[n].mean for n in names]
    ax.set_ylim(min(finals) - 0.1, max(finals) + 1.0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{suite.name}: validation loss at each optimizer's best lr (mean, min-max over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    made.append(("validation loss vs tokens", out_dir / "loss_vs_tokens.png"))
    fig.tight_layout()
    fig.savefig(made[-1][1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for n in names:
        lrs = sorted(results[n].sweep_finals)
        losses = [results[n].sweep_finals[lr] for lr in lrs]
        ax.plot(lrs, losses, marker="o", label=n, color=colors[n])
    ax.set_xscale("log")
    ax.set_ylim(min(finals) - 0.1, max(finals) + 1.5)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{suite.name}: learning-rate sensitivity (sweep seed; diverged runs are missing)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    made.append(("final loss vs learning rate", out_dir / "lr_sensitivity.png"))
    fig.tight_layout()
    fig.savefig(made[-1][1], dpi=110)
    plt.close(fig)

    if sp:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        order = [n for n in names if n in sp]
        values = [sp[n]["speedup"] for n in order]
        low = [max(0.0, sp[n]["speedup"] - sp[n]["low"]) if not math.isnan(sp[n]["low"]) else 0 for n in order]
        high = [max(0.0, sp[n]["high"] - sp[n]["speedup"]) if not math.isnan(sp[n]["high"]) else 0 for n in order]
        ax.bar(order, values, yerr=[low, high], color=[colors[n] for n in order], capsize=4)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_ylabel("tokens-to-target speedup vs AdamW")
        ax.set_title(f"{suite.name}: speedup with 95% seed-bootstrap intervals")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        made.append(("speedup vs AdamW", out_dir / "speedup.png"))
        fig.tight_layout()
        fig.savefig(made[-1][1], dpi=110)
        plt.close(fig)
    return made
