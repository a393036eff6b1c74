import math

import numpy as np
import pytest
from scipy import stats

from lmopt.bench.verdict_stats import (
    holm,
    mean_sd,
    min_detectable_effect,
    paired,
    paired_power,
    seed_speedups,
    speedup_interval,
    speedup_text,
    verdict,
)

# --- paired t-test ---------------------------------------------------------------------------------------------


def test_paired_matches_hand_computed_case():
    # differences [1, 2, 3, 4, 5]: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 3 / sqrt(0.5)
    r = paired([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    t = 3 / math.sqrt(0.5)
    assert (r.n, r.mean_diff, r.sd_diff) == (5, pytest.approx(3.0), pytest.approx(math.sqrt(2.5)))
    assert r.t == pytest.approx(t)
    assert r.p == pytest.approx(2 * stats.t.sf(t, 4))
    assert r.p == pytest.approx(0.013236, abs=1e-6)
    half = 2.776445 * math.sqrt(0.5)  # t_{0.975, 4}
    assert (r.ci_low, r.ci_high) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert r.per_seed == (1.0, 2.0, 3.0, 4.0, 5.0)


def test_paired_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(4.9, 0.1, 7)
    b = a + rng.normal(0.03, 0.02, 7)
    r, ref = paired(a, b), stats.ttest_rel(a, b)
    assert r.t == pytest.approx(ref.statistic)
    assert r.p == pytest.approx(ref.pvalue)
    low, high = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_paired_pairs_by_seed_id_whatever_the_order():
    a, seeds_a = [4.90, 4.80, 5.00, 4.95], [11, 12, 13, 14]
    b = {11: 4.85, 12: 4.70, 13: 4.98, 14: 4.90, 15: 9.9}
    seeds_b = [14, 15, 12, 11, 13]
    r = paired(a, [b[s] for s in seeds_b], seeds_a, seeds_b)
    assert r.per_seed == pytest.approx((0.05, 0.10, 0.02, 0.05))
    assert r.seeds == (11, 12, 13, 14)
    assert r.unpaired == (15,)
    assert r.p == pytest.approx(stats.ttest_rel(a, [b[s] for s in seeds_a]).pvalue)
    with pytest.raises(ValueError, match="no seed in common"):
        paired([1.0], [2.0], [1], [2])
    with pytest.raises(ValueError, match="both sides"):
        paired([1.0], [2.0], [1], None)
    with pytest.raises(ValueError, match="lengths"):
        paired([1.0, 2.0], [2.0])


def test_nonfinite_runs_raise_or_are_dropped_and_recorded():
    a, b, seeds = [4.9, math.nan, 5.0, 4.8], [4.8, 4.9, math.inf, 4.7], [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"non-finite.*\[2, 3\]"):
        paired(a, b, seeds, seeds)
    r = paired(a, b, seeds, seeds, nonfinite="drop")
    assert (r.n, r.dropped, r.seeds) == (2, (2, 3), (1, 4))
    assert r.mean_diff == pytest.approx(0.1)
    with pytest.raises(ValueError, match="nonfinite must be"):
        paired(a, b, nonfinite="worst")


def test_paired_degenerate_cases():
    one = paired([5.0], [4.0])
    assert one.n == 1 and one.mean_diff == 1.0
    assert math.isnan(one.p) and math.isnan(one.sd_diff) and math.isnan(one.ci_low)
    shifted = paired([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])  # the same difference up to float noise
    assert (shifted.sd_diff, shifted.p) == (0.0, 0.0)
    assert shifted.ci_low == shifted.ci_high == pytest.approx(0.1)
    same = paired([1.0, 2.0], [1.0, 2.0])
    assert (same.t, same.p) == (0.0, 1.0)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert math.isnan(mean_sd([2.0])[1])


# --- Holm --------------------------------------------------------------------------------------------------------


def test_holm_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_is_monotone_capped_and_skips_nan():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.3, 12)
    adjusted = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)
    out = holm([0.02, math.nan, 0.6, 0.4])  # m = 3: 0.02 * 3, 0.4 * 2, then 0.6 * 1 raised to the running max
    assert math.isnan(out[1])
    assert [out[0], out[2], out[3]] == pytest.approx([0.06, 0.8, 0.8])
    assert holm([0.7, 0.8]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        holm([1.2])


# --- power -------------------------------------------------------------------------------------------------------


def test_power_is_alpha_at_zero_effect_and_grows_with_n_and_effect():
    assert paired_power(0.0, 1.0, 10) == pytest.approx(0.05)
    assert paired_power(0.0, 1.0, 10, alpha=0.01) == pytest.approx(0.01)
    by_n = [paired_power(0.5, 1.0, n) for n in (3, 5, 10, 20, 40)]
    by_effect = [paired_power(e, 1.0, 10) for e in (0.1, 0.3, 0.6, 1.0, 2.0)]
    assert np.all(np.diff(by_n) > 0) and np.all(np.diff(by_effect) > 0)
    assert paired_power(-0.5, 1.0, 10) == pytest.approx(paired_power(0.5, 1.0, 10))
    assert paired_power(5.0, 0.01, 5) == pytest.approx(1.0)  # far noncentrality: no nan from scipy's tails
    assert math.isnan(paired_power(0.5, 1.0, 1))


def test_power_matches_monte_carlo():
    n, effect, sd, trials = 8, 0.5, 1.0, 20000
    d = np.random.default_rng(2).normal(effect, sd, (trials, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(2 * stats.t.sf(np.abs(t), n - 1) < 0.05)
    assert abs(rejected - paired_power(effect, sd, n)) < 0.015


def test_min_detectable_effect_inverts_power():
    mde = min_detectable_effect(0.03, 5)
    assert paired_power(mde, 0.03, 5) == pytest.approx(0.8, abs=1e-6)
    assert min_detectable_effect(0.03, 20) < mde  # more seeds, smaller detectable effect
    assert paired_power(min_detectable_effect(1.0, 10, 0.9, 0.01), 1.0, 10, 0.01) == pytest.approx(0.9, abs=1e-6)


# --- verdicts ----------------------------------------------------------------------------------------------------

CLAIM = dict(claimed_effect=0.08, direction=-1)  # "X's loss is lower than the baseline's by 0.08"


def _verdict(diffs, **kwargs):
    r = paired(diffs, [0.0] * len(diffs))
    return verdict(r, adjusted_p=kwargs.pop("adjusted_p", r.p), **{**CLAIM, **kwargs})


def test_clearly_supported():
    v = _verdict([-0.10, -0.11, -0.09, -0.10, -0.12])
    assert (v.category, v.excludes_claim, v.claimed) == ("supported", False, -0.08)
    assert v.power > 0.99
    assert v.text.startswith("supported: Δ=-0.104 [")


def test_supported_but_smaller_than_claimed_is_flagged():
    v = _verdict([-0.010, -0.012, -0.009, -0.011, -0.010])
    assert (v.category, v.excludes_claim) == ("supported", True)
    assert "smaller than claimed" in v.text


def test_contradicted_by_significance_in_the_other_direction():
    v = _verdict([0.05, 0.06, 0.04, 0.05, 0.07])
    assert v.category == "contradicted" and v.adjusted_p < 0.05


def test_contradicted_by_interval_excluding_the_claim():
    # mean 0, 95% CI about ±0.02: not significant, but a 0.08 improvement lies beyond the interval's far end
    v = _verdict([0.01, -0.01, 0.02, -0.02, 0.0])
    assert v.adjusted_p == 1.0 and v.excludes_claim
    assert v.category == "contradicted"
    # an interval beyond the claimed difference (a larger effect than claimed) does not exclude it
    assert not _verdict([-0.2, -0.3, -0.1, -0.25, -0.15], adjusted_p=0.2).excludes_claim


def test_inconclusive_reports_low_power():
    diffs = [0.1, -0.15, 0.05, -0.2, 0.12]
    v = _verdict(diffs)
    assert v.category == "inconclusive"
    assert v.power == pytest.approx(paired_power(0.08, np.std(diffs, ddof=1), 5))
    assert v.power < 0.3
    assert f"power {100 * v.power:.0f}% to detect the claimed 0.080" in v.text


def test_holm_adjusted_p_and_comparisons_make_the_verdict_stricter():
    diffs = [-0.08, -0.02, -0.12, -0.05, -0.09]
    r = paired(diffs, [0.0] * 5)
    assert 0.01 < r.p < 0.05
    assert verdict(r, 0.08, -1, r.p).category == "supported"
    adjusted = holm([r.p, 0.3, 0.5, 0.6])[0]  # the smallest of four: 4 p
    assert adjusted == pytest.approx(4 * r.p) and adjusted > 0.05
    wide = verdict(r, 0.08, -1, adjusted, comparisons=4)
    assert wide.category == "inconclusive"
    assert wide.ci_level == pytest.approx(1 - 0.05 / 4)
    assert wide.ci_low < r.ci_low and wide.ci_high > r.ci_high
    assert wide.power_holm < wide.power == pytest.approx(paired_power(0.08, r.sd_diff, 5))


def test_comparable_and_noninferior_claims():
    tight = dict(kind="comparable", margin=0.05, claimed_effect=0.03, direction=1)
    assert _verdict([0.01, 0.0, 0.02, 0.01, 0.015], **tight).category == "supported"
    assert _verdict([0.2, 0.22, 0.19, 0.21, 0.2], **tight).category == "contradicted"
    assert _verdict([0.1, -0.1, 0.05, -0.02, 0.08], **tight).category == "inconclusive"
    no_worse = dict(kind="noninferior", margin=0.05)  # direction -1: lower loss is better, higher is worse
    assert _verdict([0.01, 0.0, 0.02, 0.01, 0.015], **no_worse).category == "supported"
    assert _verdict([-0.3, -0.2, -0.25, -0.3, -0.2], **no_worse).category == "supported"
    assert _verdict([0.2, 0.22, 0.19, 0.21, 0.2], **no_worse).category == "contradicted"
    with pytest.raises(ValueError, match="margin"):
        _verdict([0.0, 0.1], kind="comparable")


# --- speedups ----------------------------------------------------------------------------------------------------


def _loss(tokens: float, offset: float = 0.0) -> float:
    return 6.0 - 0.5 * math.log(tokens / 1000) + offset  # linear in log tokens, so interpolation is exact


def test_seed_speedups_interpolate_in_log_tokens():
    budgets = [4000.0, 16000.0, 64000.0]
    base_budget = 8000.0
    # per seed, the baseline's final loss at 8000 tokens; the optimizer reaches L at 1000 * exp(2 * (6 - L))
    base = {0: 4.5, 1: 4.6, 2: 4.0, 3: 7.0}
    finals = {s: {t: _loss(t) for t in budgets} for s in (0, 1, 2, 3, 9)}
    out = seed_speedups(base, base_budget, budgets, finals)
    assert out[0] == pytest.approx(base_budget / (1000 * math.exp(3.0)))
    assert out[1] == pytest.approx(base_budget / (1000 * math.exp(2.8)))
    assert out[2] == pytest.approx(base_budget / (1000 * math.exp(4.0)))
    assert math.isnan(out[3])  # 7.0 is above every final loss: the target lies outside the budgets
    assert 9 not in out


def test_seed_speedups_nonfinite():
    finals = {0: {1000.0: 5.0, 2000.0: math.nan}}
    with pytest.raises(ValueError, match="seed 0"):
        seed_speedups({0: 4.8}, 2000.0, [1000.0, 2000.0], finals)
    assert math.isnan(seed_speedups({0: 4.8}, 2000.0, [1000.0, 2000.0], finals, nonfinite="drop")[0])


def test_speedup_interval_is_a_geometric_mean_with_a_log_t_interval():
    point, lo, hi, n = speedup_interval([2.0, 8.0, math.nan])
    half = stats.t.ppf(0.975, 1) * (math.log(4) / math.sqrt(2)) / math.sqrt(2)
    assert (point, n) == (pytest.approx(4.0), 2)
    assert (lo, hi) == (pytest.approx(4 * math.exp(-half)), pytest.approx(4 * math.exp(half)))
    one = speedup_interval([1.5])
    assert one[0] == pytest.approx(1.5) and math.isnan(one[1]) and one[3] == 1
    assert speedup_text(1.3249, 1.1, 1.58, 5) == "1.32x [1.10, 1.58] (n=5)"
    assert "1 seed(s) outside the budgets" in speedup_text(1.5, math.nan, math.nan, 1, bounds=1)
