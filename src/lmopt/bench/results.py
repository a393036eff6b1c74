"""A suite's state and results, computed from its run records alone (``results/<suite>/runs/*.jsonl``).

The runner asks it what to run next (the tuning replay); the report asks it what was found: each optimizer's
chosen configuration and tuning path, its held-out finals, and paired comparisons against AdamW and Muon
(:mod:`lmopt.bench.verdict_stats`: paired t-tests, Holm over each column, power).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmopt.bench.stats import budget_speedup, curve_speedup
from lmopt.bench.suites import Suite, tuning_space
from lmopt.bench.tuning import Knob, Point, incumbent, next_probe, point_of, sensitivity, values_at
from lmopt.bench.verdict_stats import Paired, holm, paired, speedup_interval
from lmopt.registry import SUITES

BASELINES = ("adamw", "muon")
ALPHA = 0.05


def results_dir(suite: str, root: Path | None = None) -> Path:
    return (root or Path("results")) / suite


def load_records(suite: str, root: Path | None = None) -> dict[str, dict]:
    """{run id: {"config", "resolved", "environment", "knobs", "probe", "evals", "end"}} of completed runs."""
    records = {}
    for path in sorted((results_dir(suite, root) / "runs").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        head = lines[0]
        records[path.stem] = {"config": head["config"], "resolved": head["resolved"],
                              "environment": head["environment"], "knobs": head.get("knobs", {}),
                              "probe": head.get("probe"), "evals": [r for r in lines if r["event"] == "eval"],
                              "end": next(r for r in lines if r["event"] == "end")}
    return records


def final_loss(record: dict) -> float:
    value = record["end"].get("final_val_loss")
    return float(value) if isinstance(value, int | float) else math.nan


# --- the tuning, replayed from the records ---------------------------------------------------------------------


def tuning_history(suite: Suite, optimizer: str, knobs: tuple[Knob, ...],
                   records: dict[str, dict]) -> tuple[dict[Point, float], list[Point]]:
    """(final loss of every point on the search's path, those points in the order the search runs them).

    The search is replayed from its start on the current grids: each next probe is taken from the records while
    one exists at its values (a run's id is its values, so a finished run is reused wherever the path meets it),
    and the replay stops at the first probe not run yet. Records off the path (from an earlier grid, say, before
    a knob's grid was widened) are ignored, so a change of grid re-tunes from the records without a rerun of
    what the new path shares with the old.
    """
    available: dict[Point, float] = {}
    for record in tuning_records(suite, optimizer, records):
        point = point_of(knobs, record["knobs"])
        if point is not None:
            available[point] = final_loss(record)
    history: dict[Point, float] = {}
    order: list[Point] = []
    while (probe := next_probe(knobs, history, order, suite.tuning_budget, suite.tol)) in available:
        history[probe] = available[probe]
        order.append(probe)
    return history, order


def tuning_records(suite: Suite, optimizer: str, records: dict[str, dict]) -> list[dict]:
    """The tuning runs of ``optimizer`` among ``records`` (tuning seed, full budget)."""
    return [r for r in records.values() if r["probe"] is not None and
            (r["config"]["optimizer"], r["config"]["seed"], r["config"]["steps"]) == (optimizer, suite.tuning_seed,
                                                                                     suite.steps)]


def off_path_tuning_runs(suite: Suite, optimizer: str, knobs: tuple[Knob, ...], records: dict[str, dict]) -> int:
    """Tuning records of ``optimizer`` the replayed search does not use (e.g. made on a narrower grid)."""
    history, _ = tuning_history(suite, optimizer, knobs, records)
    used = {tuple(sorted(values_at(knobs, p).items())) for p in history}
    return sum(tuple(sorted(r["knobs"].items())) not in used for r in tuning_records(suite, optimizer, records))


def knobs_for(suite: Suite, optimizer: str, root: Path | None = None) -> tuple[Knob, ...]:
    """The optimizer's tuning space on this suite (a ladder rung starts from the rung below's choice)."""
    if suite.transfer_from is None:
        return tuning_space(optimizer)
    below = chosen_values(SUITES.get(suite.transfer_from), optimizer, root)
    if below is None:
        raise RuntimeError(f"{suite.name} starts {optimizer} from {suite.transfer_from}'s tuned values: run "
                           f"`lmopt bench run {suite.transfer_from}` first")
    return tuning_space(optimizer, start=below, only=suite.rung_knobs)


def chosen_values(suite: Suite, optimizer: str, root: Path | None = None,
                  records: dict[str, dict] | None = None) -> dict | None:
    """The configuration the tuning chose (None until the tuning budget is spent)."""
    records = load_records(suite.name, root) if records is None else records
    knobs = knobs_for(suite, optimizer, root)
    history, order = tuning_history(suite, optimizer, knobs, records)
    if not order or next_probe(knobs, history, order, suite.tuning_budget, suite.tol) is not None:
        return None
    return values_at(knobs, incumbent(history, order, suite.tol))


# --- what was found ---------------------------------------------------------------------------------------------


@dataclass
class OptimizerResult:
    name: str
    knobs: tuple[Knob, ...]
    chosen: dict  # knob key -> value
    tuning: list[tuple[dict, float]]  # (values, final loss) in the order run
    sensitivity: dict[str, dict]  # knob key -> {value: final loss} around the chosen point
    finals: dict[int, float] = field(default_factory=dict)  # held-out seed -> final loss, full budget
    budget_finals: dict[int, dict[int, float]] = field(default_factory=dict)  # steps -> seed -> final loss
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # seed -> (tokens, val loss)

    @property
    def tuning_complete(self) -> bool:
        return bool(self.chosen)

    def finite_finals(self) -> list[float]:
        return [v for v in self.finals.values() if math.isfinite(v)]

    @property
    def mean(self) -> float:
        values = self.finite_finals()
        return float(np.mean(values)) if values else math.nan

    @property
    def std(self) -> float:
        values = self.finite_finals()
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    @property
    def diverged(self) -> int:
        return sum(not math.isfinite(v) for v in self.finals.values())


def collect(suite: Suite, records: dict[str, dict], root: Path | None = None,
            optimizers: list[str] | None = None) -> dict[str, OptimizerResult]:
    out = {}
    for name in optimizers or _optimizers_in(records):
        knobs = knobs_for(suite, name, root)
        history, order = tuning_history(suite, name, knobs, records)
        if not order:
            continue
        done = next_probe(knobs, history, order, suite.tuning_budget, suite.tol) is None
        best = incumbent(history, order, suite.tol)
        chosen = values_at(knobs, best) if done else {}
        result = OptimizerResult(name, knobs, chosen, [(values_at(knobs, p), history[p]) for p in order],
                                 sensitivity(knobs, history, best))
        if done:
            _add_held_out(result, suite, records)
        out[name] = result
    return out


def _optimizers_in(records: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys(r["config"]["optimizer"] for r in records.values()))


def _add_held_out(result: OptimizerResult, suite: Suite, records: dict[str, dict]) -> None:
    for record in records.values():
        c = record["config"]
        if c["optimizer"] != result.name or c["seed"] not in suite.seeds or record["knobs"] != result.chosen:
            continue
        loss = final_loss(record)
        result.budget_finals.setdefault(c["steps"], {})[c["seed"]] = loss
        if c["steps"] == suite.steps:
            result.finals[c["seed"]] = loss
            evals = record["evals"]
            result.curves[c["seed"]] = (np.array([e["tokens"] for e in evals], dtype=float),
                                        np.array([e["val_loss"] for e in evals], dtype=float))


# --- comparisons --------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """``optimizer`` against ``baseline`` on the held-out seeds: loss difference and speedup, both paired."""

    optimizer: str
    baseline: str
    diff: Paired  # final loss, optimizer - baseline
    holm_p: float = math.nan
    speedups: dict[int, float] = field(default_factory=dict)  # seed -> complete-run speedup (bounds included)
    bounds: dict[int, str] = field(default_factory=dict)  # seed -> ">" or "<" where only a bound is known
    speedup: tuple[float, float, float, int] = (math.nan, math.nan, math.nan, 0)  # geo mean, low, high, n
    curve_speedup: float = math.nan  # along the seed-mean curves (secondary)


def compare(results: dict[str, OptimizerResult], suite: Suite, baseline: str) -> dict[str, Comparison]:
    """Every optimizer with held-out finals against ``baseline``, Holm-adjusted over this set of comparisons."""
    base = results.get(baseline)
    if base is None or not base.finals:
        return {}
    out = {}
    for name, r in results.items():
        if name == baseline or not r.finals:
            continue
        common = sorted(set(r.finals) & set(base.finals))
        if len(common) < 2:
            continue
        diff = paired([r.finals[s] for s in common], [base.finals[s] for s in common], common, common,
                      nonfinite="drop")
        comparison = Comparison(name, baseline, diff)
        _add_speedups(comparison, r, base, suite)
        out[name] = comparison
    adjusted = holm([c.diff.p for c in out.values()])
    for comparison, p in zip(out.values(), adjusted, strict=True):
        comparison.holm_p = p
    return out


def _add_speedups(c: Comparison, r: OptimizerResult, base: OptimizerResult, suite: Suite) -> None:
    """Per seed: the budget at which r's complete runs reach the baseline's full-budget final loss (interpolated
    in log tokens); when r never reaches it, the inverse: the budget the baseline needs to reach r's final loss.
    Where the target lies beyond every budget run, the seed gives only a bound (the ratio at the nearest budget)."""
    budgets = list(suite.budgets())
    full = suite.steps
    for seed in sorted(set(r.finals) & set(base.finals)):
        mine = [r.budget_finals.get(b, {}).get(seed, math.nan) for b in budgets]
        theirs = [base.budget_finals.get(b, {}).get(seed, math.nan) for b in budgets]
        if not all(math.isfinite(x) for x in (*mine, *theirs)):
            continue
        target = theirs[-1]
        value = budget_speedup(target, full, budgets, mine)
        if math.isnan(value) and mine[-1] > target:
            inverse = budget_speedup(mine[-1], full, budgets, theirs)
            value = 1.0 / inverse if inverse == inverse and inverse > 0 else math.nan
        if math.isnan(value):
            if mine[0] <= target:  # even r's shortest run beats the baseline's full one
                value, c.bounds[seed] = full / budgets[0], ">"
            else:  # even the baseline's shortest run beats r's full one
                value, c.bounds[seed] = budgets[0] / full, "<"
        c.speedups[seed] = value
    c.speedup = speedup_interval(list(c.speedups.values()))
    if r.curves and base.curves:
        tokens, mine_curve = _mean_curve(r)
        base_tokens, base_curve = _mean_curve(base)
        c.curve_speedup = curve_speedup(base_tokens, base_curve, tokens, mine_curve)


def _mean_curve(r: OptimizerResult) -> tuple[np.ndarray, np.ndarray]:
    curves = [losses for tokens, losses in r.curves.values() if np.all(np.isfinite(losses))]
    tokens = next(iter(r.curves.values()))[0]
    return tokens, np.mean(curves, axis=0)


def beats_baseline(suite_name: str, root: Path | None = None, baseline: str = "adamw") -> list[str]:
    """Optimizers whose held-out final loss is significantly below the baseline's (paired, Holm-adjusted)."""
    suite = SUITES.get(suite_name)
    results = collect(suite, load_records(suite_name, root), root)
    return [name for name, c in compare(results, suite, baseline).items()
            if c.diff.mean_diff < 0 and c.holm_p < ALPHA]
