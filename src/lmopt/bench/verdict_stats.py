"""Statistics behind the leaderboard's verdicts on the papers' claims.

Design:

* Paired by seed. Every optimizer is run on the same held-out seeds (same initial weights, same batch order), so a
  comparison is a paired one: the per-seed differences ``a - b`` remove the seed-to-seed variation the two runs
  share. :func:`paired` pairs by seed id, gives the paired t-test and the t-interval of the mean difference, and
  never lets a diverged (non-finite) run vanish silently: it raises unless the caller asks to drop such pairs, and
  a dropped pair is recorded. Dropping is not neutral (a diverged run is a bad outcome), so the caller decides.
* Holm. The leaderboard tests several claims at once; :func:`holm` gives Holm–Bonferroni adjusted p-values, which
  control the family-wise error rate. Interval criteria in :func:`verdict` use Bonferroni intervals at level
  ``1 - alpha / comparisons``, the usual simultaneous companion of Holm (with one comparison, the 95% interval).
* Power. A claim that is not significant is only "inconclusive", and how little that means depends on power:
  :func:`paired_power` is the power of the two-sided paired t-test to detect the claimed difference given the
  measured SD of the per-seed differences (noncentral t), and every verdict reports it.
* Speedups. :func:`seed_speedups` computes a tokens-to-target speedup per seed from complete runs at several
  budgets (:func:`lmopt.bench.stats.budget_speedup`); :func:`speedup_interval` summarises them by a geometric mean
  with a t-interval on log speedups across seeds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from lmopt.bench.stats import budget_speedup

_NONFINITE = ("raise", "drop")


@dataclass(frozen=True)
class Paired:
    """A paired comparison of ``a - b`` over seeds; ``ci_low``/``ci_high`` bound the 95% t-interval of the mean."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float
    per_seed: tuple[float, ...]
    seeds: tuple[Hashable, ...] = ()
    dropped: tuple[Hashable, ...] = ()  # seeds whose pair held a non-finite value (nonfinite="drop")
    unpaired: tuple[Hashable, ...] = ()  # seeds present on one side only


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample SD with ddof=1); nan SD for fewer than 2 values, both nan for none."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if len(x) else math.nan
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return mean, sd


def t_interval(mean: float, sd: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided t-interval ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)``; nan for n < 2."""
    if n < 2 or math.isnan(sd):
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def _pair(a: Sequence[float], b: Sequence[float], seeds_a: Sequence[Hashable] | None,
          seeds_b: Sequence[Hashable] | None) -> tuple[list[Hashable], list[float], list[float], list[Hashable]]:
    """(common seeds in ``seeds_a`` order, a values, b values, seeds on one side only)."""
    if (seeds_a is None) != (seeds_b is None):
        raise ValueError("give seed ids for both sides or for neither")
    if seeds_a is None or seeds_b is None:
        if len(a) != len(b):
            raise ValueError(f"unpaired lengths {len(a)} and {len(b)} without seed ids")
        return list(range(len(a))), list(a), list(b), []
    if len(seeds_a) != len(a) or len(seeds_b) != len(b):
        raise ValueError("each seed list must be as long as its values")
    if len(set(seeds_a)) != len(seeds_a) or len(set(seeds_b)) != len(seeds_b):
        raise ValueError("duplicate seed ids")
    by_seed_b = dict(zip(seeds_b, b, strict=True))
    common = [s for s in seeds_a if s in by_seed_b]
    if not common:
        raise ValueError("the two sides have no seed in common")
    by_seed_a = dict(zip(seeds_a, a, strict=True))
    unpaired = [s for s in seeds_a if s not in by_seed_b] + [s for s in seeds_b if s not in by_seed_a]
    return common, [by_seed_a[s] for s in common], [by_seed_b[s] for s in common], unpaired


def _t_test(mean: float, sd: float, n: int) -> tuple[float, float]:
    """(t, two-sided p) of the one-sample t-test of mean 0."""
    if n < 2:
        return math.nan, math.nan
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


def paired(a: Sequence[float], b: Sequence[float], seeds_a: Sequence[Hashable] | None = None,
           seeds_b: Sequence[Hashable] | None = None, *, nonfinite: str = "raise") -> Paired:
    """Paired t-test and 95% t-interval of the mean per-seed difference ``a - b``.

    Without seed ids, ``a[i]`` pairs with ``b[i]``; with them, values pair by seed id and only seeds on both sides
    are used (the others are listed in ``unpaired``; none in common is an error). A non-finite value (a diverged
    run) raises ValueError unless ``nonfinite="drop"``, which drops that seed's pair and lists it in ``dropped``.
    With zero spread, p is 0 for a nonzero mean difference and 1 for a zero one; p is nan for n < 2.
    """
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {_NONFINITE}, not {nonfinite!r}")
    seeds, xa, xb, unpaired = _pair(a, b, seeds_a, seeds_b)
    bad = [s for s, u, v in zip(seeds, xa, xb, strict=True) if not (math.isfinite(u) and math.isfinite(v))]
    if bad and nonfinite == "raise":
        raise ValueError(f"non-finite value (diverged run?) at seeds {bad}; pass nonfinite='drop' to drop them")
    keep = [i for i, s in enumerate(seeds) if s not in bad]
    diffs = np.array([xa[i] - xb[i] for i in keep], dtype=float)
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    # float noise in identical differences (e.g. 0.3 - 0.2 vs 0.4 - 0.3) counts as zero spread
    if n > 1 and sd <= 16 * np.finfo(float).eps * np.abs(diffs).max():
        sd = 0.0
    t, p = _t_test(mean, sd, n)
    low, high = t_interval(mean, sd, n)
    return Paired(n, mean, sd, low, high, t, p, tuple(float(d) for d in diffs), tuple(seeds[i] for i in keep),
                  tuple(bad), tuple(unpaired))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in input order, capped at 1.

    Sorted ascending, the j-th smallest of the m non-nan p-values (j = 1..m) becomes
    ``max_{i <= j} min(1, (m - i + 1) p_(i))``. Nan entries stay nan and do not count in m.
    """
    p = np.asarray(pvalues, dtype=float)
    finite = np.flatnonzero(~np.isnan(p))
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.full(len(p), math.nan)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(x) for x in adjusted]


def paired_power(effect: float, sd_diff: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a true mean difference ``effect``.

    With n pairs whose differences have SD ``sd_diff``, t follows a noncentral t with df = n - 1 and
    noncentrality ``effect / (sd_diff / sqrt(n))``; the power is its mass beyond ±t_{1-alpha/2, n-1}.
    Nan for n < 2 or a nan input; with ``sd_diff == 0`` any nonzero effect is detected for sure.
    """
    if n < 2 or math.isnan(effect) or math.isnan(sd_diff):
        return math.nan
    if sd_diff == 0:
        return alpha if effect == 0 else 1.0
    df = n - 1
    nc = abs(effect) / (sd_diff / math.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    # P(T < -crit | nc) written as P(T > crit | -nc): scipy's nct.cdf returns nan far in the tail, nct.sf does not
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def min_detectable_effect(sd_diff: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference (> 0) that the paired t-test detects with probability ``power``."""
    if n < 2 or math.isnan(sd_diff) or sd_diff <= 0:
        return math.nan
    if not alpha < power < 1:
        raise ValueError("power must lie strictly between alpha and 1")
    high = sd_diff
    while paired_power(high, sd_diff, n, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda e: paired_power(e, sd_diff, n, alpha) - power, 0.0, high, xtol=1e-12))


@dataclass(frozen=True)
class Verdict:
    """The verdict on one claim: ``category`` is "supported", "contradicted" or "inconclusive"."""

    category: str
    kind: str
    claimed: float  # the claimed difference, signed (direction * claimed_effect)
    margin: float | None
    mean_diff: float
    ci_low: float
    ci_high: float
    ci_level: float
    adjusted_p: float
    excludes_claim: bool  # the interval lies wholly on the near side of the claimed difference
    power: float
    power_holm: float
    n: int
    text: str


def _difference_category(adjusted_p: float, mean: float, direction: int, excludes_claim: bool, alpha: float) -> str:
    if adjusted_p < alpha:
        return "supported" if mean * direction > 0 else "contradicted"
    return "contradicted" if excludes_claim else "inconclusive"


def _margin_category(kind: str, low: float, high: float, direction: int, margin: float) -> str:
    if kind == "comparable":
        if -margin < low and high < margin:
            return "supported"
        return "contradicted" if low > margin or high < -margin else "inconclusive"
    # noninferior: "worse" is the sign -direction; the worst plausible value must stay within the margin
    worst, best = max(-direction * low, -direction * high), min(-direction * low, -direction * high)
    if worst < margin:
        return "supported"
    return "contradicted" if best > margin else "inconclusive"


def _verdict_text(category: str, v: dict, result: Paired, claimed_effect: float) -> str:
    level = f"{100 * v['ci_level']:.3g}%"
    power = "n/a" if math.isnan(v["power"]) else f"{100 * v['power']:.0f}%"
    text = (f"{category}: Δ={v['mean_diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}] ({level} CI, "
            f"n={result.n}), Holm p={v['adjusted_p']:.2g}")
    if v["margin"] is not None:
        text += f", margin {v['margin']:.3f}"
    text += f", power {power} to detect the claimed {claimed_effect:.3f}"
    if category == "supported" and v["excludes_claim"]:
        text += f"; smaller than claimed (CI excludes {v['claimed']:+.3f})"
    if result.dropped:
        text += f"; {len(result.dropped)} non-finite pair(s) dropped"
    return text


def verdict(result: Paired, claimed_effect: float, direction: int, adjusted_p: float, alpha: float = 0.05,
            comparisons: int = 1, kind: str = "difference", margin: float | None = None) -> Verdict:
    """The verdict on a claim about the paired difference ``a - b`` (e.g. final loss of X minus AdamW's).

    ``direction`` is the claimed sign of the difference and ``claimed_effect`` its claimed size (≥ 0): "X's loss is
    lower than AdamW's by 0.08" is ``direction=-1, claimed_effect=0.08``, a claimed difference of -0.08.
    ``adjusted_p`` is the claim's Holm-adjusted p (:func:`holm`) among ``comparisons`` claims tested together.

    The interval used is the t-interval at level ``1 - alpha / comparisons`` (Bonferroni; 95% for one comparison).
    It *excludes the claim* when it lies wholly on the near side of the claimed difference, i.e. even its end
    farthest in the claimed direction falls short of it: ``max(direction * ci) < claimed_effect``. An interval
    beyond the claimed difference (a larger effect than claimed) does not exclude it.

    kind="difference": "supported" when adjusted p < alpha and the mean difference has the claimed sign;
    "contradicted" when adjusted p < alpha with the other sign, or, short of significance, when the interval
    excludes the claim; else "inconclusive". A supported claim whose interval excludes the claimed size stays
    "supported" (the sign is what the test tests); ``excludes_claim`` and the text say it is smaller than claimed.

    kind="comparable" (needs ``margin``): supported when the interval lies within (-margin, +margin), contradicted
    when it lies wholly outside, else inconclusive. kind="noninferior": "no worse than by margin", where worse
    is the sign ``-direction``: supported when the interval's worst end is within margin, contradicted when even
    its best end is beyond it. Both kinds report ``adjusted_p`` but do not use it (a significant difference can
    still be comparable).

    ``power`` is :func:`paired_power` of ``claimed_effect`` at level ``alpha`` with the measured SD and n;
    ``power_holm`` the same at ``alpha / comparisons`` (the level of Holm's first, strictest step).
    """
    if direction not in (-1, 1):
        raise ValueError("direction must be -1 or +1")
    if not claimed_effect >= 0:
        raise ValueError("claimed_effect is a size (>= 0); its sign goes in direction")
    if kind not in ("difference", "comparable", "noninferior"):
        raise ValueError(f"unknown kind {kind!r}")
    if kind != "difference" and (margin is None or margin <= 0):
        raise ValueError(f"kind={kind!r} needs a positive margin")
    level = 1 - alpha / comparisons
    low, high = t_interval(result.mean_diff, result.sd_diff, result.n, level)
    excludes_claim = bool(max(direction * low, direction * high) < claimed_effect)
    if kind == "difference":
        category = _difference_category(adjusted_p, result.mean_diff, direction, excludes_claim, alpha)
    else:
        category = _margin_category(kind, low, high, direction, margin)
    v = dict(kind=kind, claimed=direction * claimed_effect, margin=margin, mean_diff=result.mean_diff, ci_low=low,
             ci_high=high, ci_level=level, adjusted_p=adjusted_p, excludes_claim=excludes_claim,
             power=paired_power(claimed_effect, result.sd_diff, result.n, alpha),
             power_holm=paired_power(claimed_effect, result.sd_diff, result.n, alpha / comparisons), n=result.n)
    return Verdict(category=category, text=_verdict_text(category, v, result, claimed_effect), **v)


def _seed_speedup(seed: int, target: float, base_budget: float, runs: list[tuple[float, float]],
                  nonfinite: str) -> float:
    if not all(math.isfinite(x) for x in [target, *(loss for _, loss in runs)]):
        if nonfinite == "raise":
            raise ValueError(f"non-finite final loss at seed {seed}; pass nonfinite='drop' to make it nan")
        return math.nan
    if len(runs) < 2:
        return math.nan
    return budget_speedup(target, base_budget, [t for t, _ in runs], [loss for _, loss in runs])


def seed_speedups(base_final_by_seed: dict[int, float], base_budget: float, budgets: list[float],
                  finals_by_seed: dict[int, dict[float, float]], *, nonfinite: str = "raise") -> dict[int, float]:
    """Tokens-to-target speedup per seed, from complete runs at several budgets.

    For each seed on both sides, the target is the baseline's final loss at ``base_budget`` on that seed; the
    optimizer's final losses at those of ``budgets`` it has for that seed are interpolated linearly in log tokens
    (:func:`lmopt.bench.stats.budget_speedup`). Nan where the target lies outside the budgets run or the seed
    has fewer than 2 of them. A non-finite loss raises ValueError unless ``nonfinite="drop"``, which makes that
    seed's speedup nan. Seeds on one side only are left out.
    """
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {_NONFINITE}, not {nonfinite!r}")
    out = {}
    for seed, target in base_final_by_seed.items():
        if seed in finals_by_seed:
            runs = [(t, finals_by_seed[seed][t]) for t in budgets if t in finals_by_seed[seed]]
            out[seed] = _seed_speedup(seed, target, base_budget, runs, nonfinite)
    return out


def speedup_interval(speedups: Sequence[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """(geometric mean, low, high, n) over the finite per-seed speedups; the interval is the t-interval of the
    mean log speedup, exponentiated. Nan interval for n < 2, nan mean for n = 0.

    Seeds whose target lay outside the budgets (nan) are left out, and that is censoring, not missing at random:
    the caller must report how many (see :func:`speedup_text`).
    """
    x = np.asarray(speedups, dtype=float)
    x = x[np.isfinite(x)]
    if np.any(x <= 0):
        raise ValueError("speedups must be positive")
    logs = np.log(x)
    mean, sd = mean_sd(logs)
    low, high = t_interval(mean, sd, len(logs), level)
    return math.exp(mean), math.exp(low), math.exp(high), len(logs)


def speedup_text(point: float, lo: float, hi: float, n: int, bounds: int = 0) -> str:
    """Table text such as "1.32x [1.10, 1.58] (n=5)"; ``bounds`` counts seeds left out because their speedup
    was only a bound (target outside the budgets run)."""
    if math.isnan(point):
        text = "—"
    elif math.isnan(lo):
        text = f"{point:.2f}x"
    else:
        text = f"{point:.2f}x [{lo:.2f}, {hi:.2f}]"
    suffix = f"n={n}" + (f"; {bounds} seed(s) outside the budgets left out" if bounds else "")
    return f"{text} ({suffix})"
