"""The statistics of the leaderboard: tokens-to-target speedups with seed-bootstrap intervals, Welch's t-test."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats


def tokens_to_reach(tokens: np.ndarray, losses: np.ndarray, target: float) -> float:
    """The first token count at which the piecewise-linear loss curve reaches ``target`` (nan if never)."""
    for i in range(1, len(tokens)):
        if losses[i] <= target:
            if losses[i - 1] <= target:
                return float(tokens[i - 1])
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return float(tokens[i - 1] + frac * (tokens[i] - tokens[i - 1]))
    return math.nan


def curve_speedup(base_tokens: np.ndarray, base_losses: np.ndarray, tokens: np.ndarray, losses: np.ndarray) -> float:
    """Tokens the baseline needs to reach its own final loss / tokens this curve needs to reach it.

    When this curve never gets there, the ratio is taken the other way round, at this curve's final loss:
    (tokens the baseline needs to reach it) / (this curve's total), which is < 1.
    """
    target = base_losses[-1]
    needed = tokens_to_reach(tokens, losses, target)
    if not math.isnan(needed):
        return float(base_tokens[-1] / needed)
    baseline_needs = tokens_to_reach(base_tokens, base_losses, losses[-1])
    return float(baseline_needs / tokens[-1]) if not math.isnan(baseline_needs) else math.nan


def budget_speedup(base_final: float, base_budget: float, budgets: list[float], finals: list[float]) -> float:
    """The same ratio from complete runs at several budgets: the budget at which this optimizer's final loss
    (interpolated linearly in log-tokens between budgets) equals the baseline's final loss; nan when the
    target lies outside the budgets run."""
    pairs = sorted(zip(budgets, finals, strict=True))
    for (t0, l0), (t1, l1) in itertools.pairwise(pairs):
        if min(l0, l1) <= base_final <= max(l0, l1) and l0 != l1:
            frac = (l0 - base_final) / (l0 - l1)
            needed = math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
            return base_budget / needed
    return math.nan


def budget_speedup_text(base_final: float, base_budget: float, budgets: list[float], finals: list[float]) -> str:
    """:func:`budget_speedup` as table text, with a bound when the target lies outside the budgets run:
    "> 2.00x" when even the shortest complete run ends below the baseline's final loss, "< 1.00x" when even
    the longest ends above it."""
    value = budget_speedup(base_final, base_budget, budgets, finals)
    if not math.isnan(value):
        return f"{value:.2f}x"
    if len(finals) > 1 and all(f <= base_final for f in finals):
        return f"> {base_budget / min(budgets):.2f}x"
    if len(finals) > 1 and all(f > base_final for f in finals):
        return f"< {base_budget / max(budgets):.2f}x"
    return "—"


def bootstrap_speedup(base_curves: np.ndarray, curves: np.ndarray, tokens: np.ndarray, base_tokens: np.ndarray,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(speedup of the seed-mean curves, 2.5th and 97.5th percentile over seed resamples).

    ``base_curves`` and ``curves`` are (seeds, evals) arrays; seeds are resampled with replacement,
    independently for the two optimizers.
    """
    point = curve_speedup(base_tokens, base_curves.mean(0), tokens, curves.mean(0))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        b = base_curves[rng.integers(0, len(base_curves), len(base_curves))].mean(0)
        c = curves[rng.integers(0, len(curves), len(curves))].mean(0)
        samples.append(curve_speedup(base_tokens, b, tokens, c))
    samples = np.asarray(samples)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return point, math.nan, math.nan
    low, high = np.percentile(samples, [2.5, 97.5])
    return point, float(low), float(high)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's t-test that mean(a) != mean(b); nan when either has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)
