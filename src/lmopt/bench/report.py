"""``lmopt bench report SUITE`` and ``lmopt bench ladder LADDER``: leaderboards, plots and the papers' claims
beside our measurements, from the stored run records alone (so they regenerate anywhere, bit for bit).

Statistics (:mod:`lmopt.bench.results`, :mod:`lmopt.bench.verdict_stats`): every comparison is paired by
held-out seed; each column of comparisons (vs AdamW, vs Muon, the claims) is Holm-adjusted; every "no
difference" comes with the power the test had; speedups come from complete runs at several budgets, per seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmopt.bench.claims import CLAIMS, Claim
from lmopt.bench.results import (
    ALPHA,
    Comparison,
    OptimizerResult,
    collect,
    compare,
    load_records,
    off_path_tuning_runs,
    results_dir,
)
from lmopt.bench.step_summary import fastest_rows
from lmopt.bench.suites import Suite, ladder_rungs
from lmopt.bench.variants import grid_end_verdicts
from lmopt.bench.verdict_stats import Verdict, holm, min_detectable_effect, paired, verdict
from lmopt.data.paths import atomic_write_text
from lmopt.registry import SUITES

LINESTYLES = ("-", "--", "-.", ":")


def _fmt(x: float | None, spec: str = ".4f", unit: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + unit


def _values_text(r: OptimizerResult) -> str:
    return ", ".join(f"{k.label} {_value(r.chosen[k.key])}" for k in r.knobs)


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _diff_text(c: Comparison | None) -> str:
    if c is None:
        return "—"
    d = c.diff
    star = " *" if c.holm_p < ALPHA else ""
    return f"{d.mean_diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}] p={_fmt(c.holm_p, '.2g')}{star}"


def bound_side(c: Comparison) -> str:
    """">" or "<" where every seed's speedup is only a bound on the same side, else ""."""
    sides = set(c.bounds.values())
    return next(iter(sides)) if len(c.bounds) == c.speedup[3] and len(sides) == 1 else ""


def _speedup_text(c: Comparison | None) -> str:
    if c is None or not c.speedups:
        return "—"
    point, low, high, n = c.speedup
    bounds = f"; {len(c.bounds)} bound" if c.bounds else ""
    if side := bound_side(c):  # every seed only a bound: the budgets run cannot say more
        return f"{'≥' if side == '>' else '≤'} {point:.2f}x (n={n}; every seed a bound)"
    return f"{point:.2f}x [{_fmt(low, '.2f')}, {_fmt(high, '.2f')}] (n={n}{bounds})"


# --- claims -----------------------------------------------------------------------------------------------------


def claim_verdicts(results: dict[str, OptimizerResult], comparisons: dict[str, dict[str, Comparison]]
                   ) -> list[tuple[Claim, str, Verdict | None, str]]:
    """(claim, our measurement, verdict, text) for every claim, Holm-adjusted over the testable ones."""
    rows, tests = [], []
    for claim in CLAIMS:
        c = comparisons.get(claim.versus, {}).get(claim.optimizer)
        if claim.kind == "untestable":
            rows.append([claim, "—", None, "not testable here: needs downstream evaluation of a multi-billion-"
                                           "parameter model"])
            continue
        if c is None:
            missing = [name for name in (claim.optimizer, claim.versus) if name not in results]
            rows.append([claim, "—", None, f"not run here: {', '.join(missing)}" if missing else
                         "not testable yet: not both run on the held-out seeds"])
            continue
        result = _claim_quantity(claim, c)
        rows.append([claim, _measured_text(claim, c), None, ""])
        tests.append((len(rows) - 1, claim, result))
    adjusted = holm([result.p for _, _, result in tests])
    for (i, claim, result), p in zip(tests, adjusted, strict=True):
        v = _verdict(claim, result, p, len(tests))
        rows[i][2], rows[i][3] = v, _verdict_text(claim, v, result)
    return [tuple(row) for row in rows]


def _claim_quantity(claim: Claim, c: Comparison):
    """The paired quantity a claim is about: final-loss difference, or log speedup (against 0)."""
    if claim.kind == "speedup":
        logs = [math.log(v) for v in c.speedups.values()]
        return paired(logs, [0.0] * len(logs), list(c.speedups), list(c.speedups))
    return c.diff


def _verdict(claim: Claim, result, p: float, comparisons: int) -> Verdict:
    if claim.kind == "speedup":
        return verdict(result, math.log(claim.effect), +1, p, ALPHA, comparisons)
    if claim.kind == "noninferior":
        return verdict(result, claim.effect, -1, p, ALPHA, comparisons, kind="noninferior", margin=claim.effect)
    effect = claim.effect if claim.effect is not None else min_detectable_effect(result.sd_diff, result.n)
    return verdict(result, effect, -1, p, ALPHA, comparisons)


def _measured_text(claim: Claim, c: Comparison) -> str:
    if claim.kind == "speedup":
        return f"speedup {_speedup_text(c)}"
    return f"Δ {c.diff.mean_diff:+.3f} [{c.diff.ci_low:+.3f}, {c.diff.ci_high:+.3f}] (n={c.diff.n})"


def _verdict_text(claim: Claim, v: Verdict, result) -> str:
    if claim.kind == "lower_loss" and claim.effect is None:
        return (f"**{v.category}** (Holm p={_fmt(v.adjusted_p, '.2g')}); no claimed size: our test detects "
                f"{v.claimed and abs(v.claimed):.3f} nats with 80% power")
    power = f"power {v.power:.0%} to detect the claimed {'x' if claim.kind == 'speedup' else ''}" + (
        f"{claim.effect:g}")
    return f"**{v.category}** (Holm p={_fmt(v.adjusted_p, '.2g')}; {power})"


# --- the suite report -------------------------------------------------------------------------------------------


def _step_results(root: Path) -> dict | None:
    files = sorted((root / "step").glob("*.json"))
    return json.loads(files[0].read_text()) if files else None


def _fastest_step(step_rows: dict, name: str) -> dict:
    """The step-benchmark row of ``name``'s fastest implementation, with its variant (e.g. " (compiled)")."""
    row = fastest_rows(step_rows).get(name)
    if row is None:
        return {}
    return step_rows[row] | {"variant": row[len(name):] if row != "adamw (fused)" else ""}


def analyse(suite: Suite, root: Path | None = None) -> tuple[dict, dict, dict]:
    """(results, comparisons by baseline, records) of a suite."""
    records = load_records(suite.name, root)
    if not records:
        raise FileNotFoundError(f"no run records in {results_dir(suite.name, root) / 'runs'}; run "
                                f"`lmopt bench run {suite.name}` first")
    results = collect(suite, records, root)
    comparisons = {b: compare(results, suite, b) for b in ("adamw", "muon")}
    return results, comparisons, records


def write_report(suite_name: str, root: Path | None = None, command: str | None = None) -> Path:
    suite: Suite = SUITES.get(suite_name)
    out_dir = results_dir(suite_name, root)
    results, comparisons, records = analyse(suite, root)
    step = _step_results(out_dir.parent)
    lines = _header(suite, records, command)
    lines += _leaderboard(suite, results, comparisons, step)
    lines += _claims_section(results, comparisons)
    lines += _tuning_section(suite, results, records, root)
    plots = _plots(suite, results, comparisons, out_dir)
    lines += ["## Plots", ""] + [f"![{title}]({path.name})" for title, path in plots] + [""]
    path = out_dir / "leaderboard.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "summary.json", json.dumps(_summary(results, comparisons), indent=1) + "\n")
    return path


def _header(suite: Suite, records: dict, command: str | None) -> list[str]:
    envs = [r["environment"] for r in records.values()]
    commits = sorted({e["commit"] for e in envs})
    resolved = next(iter(records.values()))["resolved"]
    tokens = suite.tokens()
    return [
        f"# Benchmark `{suite.name}`", "",
        suite.description.replace("\n", " "), "",
        f"- produced by: `{command or f'lmopt bench run {suite.name} && lmopt bench report {suite.name}'}`",
        f"- runs made at commit(s): {', '.join(f'`{c}`' for c in commits)}; {len(records)} stored runs",
        f"- machine: {machines(records)}, {envs[0]['threads']} thread(s) per run",
        f"- model `{suite.preset}`: {resolved['params']:,} params ({resolved['non_embedding_params']:,} "
        f"non-embedding); data `{suite.data}`; {suite.steps} steps x {suite.batch_tokens:,} tokens = {tokens:,} "
        f"tokens = {resolved['epochs']:.2f} epochs = {tokens / resolved['params']:.2f} tokens/param; "
        f"{suite.schedule} schedule to {suite.min_lr_ratio:g} x peak, grad clip {suite.grad_clip}",
        f"- protocol: each optimizer tuned by the same coordinate search (lmopt/bench/tuning.py) with "
        f"**{suite.tuning_budget} runs** on seed {suite.tuning_seed} (a move needs a gain > {suite.tol} nats); "
        f"the chosen configuration then run on the held-out seeds {', '.join(map(str, suite.seeds))} at "
        f"{', '.join(str(b) for b in suite.budgets())} steps (complete schedules); only held-out runs are "
        "reported.", "",
    ]


def _leaderboard(suite: Suite, results: dict, comparisons: dict, step: dict | None) -> list[str]:
    step_rows = step["results"] if step else {}
    lines = [
        "## Leaderboard", "",
        "Final validation loss on the held-out seeds (mean ± SD). Δ: paired difference of final loss per seed "
        "(this optimizer minus the baseline), mean and 95% t-interval, with the Holm-adjusted p over the column "
        "(\\* p < 0.05). Speedup: for each seed, the tokens the baseline's full run takes to reach its final loss "
        "divided by the tokens this optimizer needs, interpolated (log tokens) between its complete runs at the "
        "suite's budgets; geometric mean over seeds with a 95% t-interval on log speedups ('bound': a seed where "
        "the target lay beyond the budgets run, counted at the nearest budget's ratio). Along-curve: the same "
        "ratio read off the seed-mean validation curve of the full run (secondary: mid-curve points of a cosine "
        "schedule are not complete runs).", "",
        "| # | optimizer | tuned values | final val loss | Δ vs AdamW | Δ vs Muon | speedup vs AdamW "
        "(complete runs) | speedup vs Muon | along-curve vs AdamW | step vs fused AdamW | state vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted((r for r in results.values() if r.finals), key=lambda r: r.mean)
    for rank, r in enumerate(ranked, 1):
        vs_adamw, vs_muon = comparisons["adamw"].get(r.name), comparisons["muon"].get(r.name)
        cost = _fastest_step(step_rows, r.name)
        diverged = f", {r.diverged} diverged" if r.diverged else ""
        lines.append(
            f"| {rank} | `{r.name}` | {_values_text(r)} | {r.mean:.4f} ± {_fmt(r.std, '.4f')} "
            f"(n={len(r.finite_finals())}{diverged}) | {_diff_text(vs_adamw)} | {_diff_text(vs_muon)} | "
            f"{_speedup_text(vs_adamw)} | {_speedup_text(vs_muon)} | "
            f"{_fmt(vs_adamw.curve_speedup if vs_adamw else None, '.2f', 'x')} | "
            f"{_fmt(cost.get('time_vs_fused_adamw'), '.2f', 'x')}{cost.get('variant', '')} | "
            f"{_fmt(cost.get('state_vs_adamw'), '.2f', 'x')} |")
    pending = [r.name for r in results.values() if not r.finals]
    missing = [o for o in suite.optimizers if o not in results]
    if pending or missing:
        lines += ["", f"Not yet on the leaderboard (tuning or held-out runs in progress): "
                      f"{', '.join(f'`{n}`' for n in pending + missing)}."]
    if step:
        lines += ["", f"Step cost columns: each optimizer's fastest measured implementation on `{step['preset']}`'s "
                      f"parameters, from `{step['command']}` at commit `{step['commit'][:12]}` (results/step/)."]
    return [*lines, ""]


def _claims_section(results: dict, comparisons: dict) -> list[str]:
    lines = [
        "## The papers' claims beside our measurement", "",
        "A verdict tests **lmopt's reading** of each paper ([docs/optimizers.md](../../docs/optimizers.md)) at this "
        "suite's scale, not the paper's number at its own: *supported* = significant in the claimed direction "
        "(Holm over the testable claims); *contradicted* = significant against it, or the interval excludes the "
        "claimed effect; *inconclusive* otherwise, with the power the paired test had to detect the claimed "
        "effect size (the paper's own gap, in nats, or its speedup).", "",
        "| paper | claim (as reported) | ours (held-out seeds, paired) | verdict |", "|---|---|---|---|"]
    for claim, measured, _v, text in claim_verdicts(results, comparisons):
        lines.append(f"| {claim.paper} | `{claim.optimizer}` vs `{claim.versus}`: {claim.reported} | {measured} | "
                     f"{text} |")
    return [*lines, ""]


def _tuning_section(suite: Suite, results: dict, records: dict, root: Path | None = None) -> list[str]:
    lines = ["## Tuning", "",
             f"Every optimizer: {suite.tuning_budget} runs on seed {suite.tuning_seed}. Sensitivity: final loss of "
             "the tuning runs that differ from the chosen configuration in one knob only (chosen value in bold; "
             "'div' = diverged; 'grid end' = the chosen value is the last of its knob's grid on that side (other "
             "than 0), so the search never tried a value beyond it; `lmopt bench variant SUITE --grid-ends` then "
             "tries one grid step further on the held-out seeds, and its verdict follows in brackets (variants.md)."
             "", "",
             "| optimizer | runs | knob: value → final loss |", "|---|---|---|"]
    checks = grid_end_verdicts(suite, root)
    for r in results.values():
        cells = []
        for knob in r.knobs:
            row = r.sensitivity.get(knob.key, {})
            chosen = r.chosen.get(knob.key)
            items = [f"{'**' if v == chosen else ''}{_value(v)}: {_loss_cell(loss)}{'**' if v == chosen else ''}"
                     for v, loss in row.items()]
            # 0 (no weight decay, no warm-up) is a natural bound, not a grid end
            edge = (r.tuning_complete and len(knob.values) > 1 and chosen in (knob.values[0], knob.values[-1])
                    and chosen != 0)
            check = f" [one step further: {checks[(r.name, knob.key)]}]" if (r.name, knob.key) in checks else ""
            cells.append(f"{knob.label} ({'; '.join(items)}){' grid end' + check if edge else ''}")
        status = "" if r.tuning_complete else " (in progress)"
        off_path = off_path_tuning_runs(suite, r.name, r.knobs, records)
        status += f" (+{off_path} off the path: an earlier grid)" if off_path else ""
        lines.append(f"| `{r.name}` | {len(r.tuning)}{status} | {' · '.join(cells)} |")
    return [*lines, ""]


def _loss_cell(loss: float) -> str:
    return f"{loss:.3f}" if math.isfinite(loss) else "div"


def _summary(results: dict, comparisons: dict) -> dict:
    out = {}
    for name, r in results.items():
        entry = {"chosen": r.chosen, "tuning_runs": len(r.tuning), "finals": {str(k): v for k, v in r.finals.items()},
                 "mean": r.mean, "std": r.std}
        for base, table in comparisons.items():
            c = table.get(name)
            if c is not None:
                entry[f"vs_{base}"] = {"diff": c.diff.mean_diff, "ci": [c.diff.ci_low, c.diff.ci_high],
                                       "p": c.diff.p, "holm_p": c.holm_p, "speedup": list(c.speedup),
                                       "speedups": {str(k): v for k, v in c.speedups.items()},
                                       "bounds": {str(k): v for k, v in c.bounds.items()},
                                       "curve_speedup": c.curve_speedup}
        out[name] = entry
    return out


# --- plots -------------------------------------------------------------------------------------------------------


def styles(names: list[str]) -> dict[str, dict]:
    """A distinct (colour, line style, marker) for each of up to 40 series."""
    import matplotlib.pyplot as plt

    markers = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
    cmap = plt.get_cmap("tab10")
    return {n: {"color": cmap(i % 10), "linestyle": LINESTYLES[(i // 10) % 4], "marker": markers[i % 10]}
            for i, n in enumerate(names)}


def _plots(suite: Suite, results: dict, comparisons: dict, out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted((n for n, r in results.items() if r.finals), key=lambda n: results[n].mean)
    style = styles(sorted(results))
    made = []
    if names:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for n in names:
            r = results[n]
            tokens, mean = _mean_curve(r)
            band = np.array([c for _, c in r.curves.values() if np.all(np.isfinite(c))])
            s = style[n]
            ax.plot(tokens[1:], mean[1:], label=f"{n} ({r.mean:.3f})", color=s["color"], linestyle=s["linestyle"])
            ax.fill_between(tokens[1:], band.min(0)[1:], band.max(0)[1:], color=s["color"], alpha=0.12)
        finals = [results[n].mean for n in names]
        ax.set_ylim(min(finals) - 0.1, max(finals) + 1.0)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{suite.name}: held-out seeds, full budget (mean; band: min-max over seeds)")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        made.append(("validation loss vs tokens", _save(fig, out_dir / "loss_vs_tokens.png")))
    for base in ("adamw", "muon"):
        table = comparisons[base]
        order = [n for n in names if n in table and table[n].speedups]
        if not order:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        points = [table[n].speedup for n in order]
        values = [p[0] for p in points]
        low = [max(0.0, p[0] - p[1]) if math.isfinite(p[1]) else 0.0 for p in points]
        high = [max(0.0, p[2] - p[0]) if math.isfinite(p[2]) else 0.0 for p in points]
        ax.bar(order, values, yerr=[low, high], color=[style[n]["color"] for n in order], capsize=4)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel(f"speedup vs {base} (complete runs)")
        ax.set_title(f"{suite.name}: tokens-to-target speedup vs {base}, held-out seeds, 95% interval")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        made.append((f"speedup vs {base}", _save(fig, out_dir / f"speedup_vs_{base}.png")))
    made.append(("tuning sensitivity", _sensitivity_plot(suite, results, style, out_dir / "sensitivity.png")))
    return made


def _mean_curve(r: OptimizerResult) -> tuple[np.ndarray, np.ndarray]:
    curves = [c for _, c in r.curves.values() if np.all(np.isfinite(c))]
    return next(iter(r.curves.values()))[0], np.mean(curves, axis=0)


def _sensitivity_plot(suite: Suite, results: dict, style: dict, path: Path) -> Path:
    """One panel per knob kind (lr, weight decay, warm-up, own knob); the chosen value circled, divergence as x."""
    import matplotlib.pyplot as plt

    kinds = ["lr", "weight_decay", "warmup_frac", "own"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5), sharey=True)
    finite = [loss for r in results.values() for _, loss in r.tuning if math.isfinite(loss)]
    top = (min(finite) + 1.5) if finite else 10.0
    for ax, kind in zip(axes, kinds, strict=True):
        for name, r in sorted(results.items()):
            for knob in r.knobs:
                own = knob.key.startswith("optim.")
                if (kind == "own") != own or (not own and knob.key != kind):
                    continue
                row = r.sensitivity.get(knob.key, {})
                if not row or isinstance(next(iter(row)), str):
                    continue
                xs = list(row)
                if kind == "own":  # own knobs differ in scale: plot against their grid position
                    xs = [knob.values.index(v) for v in xs]
                ys = [loss if math.isfinite(loss) else top for loss in row.values()]
                s = style[name]
                ax.plot(xs, ys, color=s["color"], linestyle=s["linestyle"], marker=s["marker"], ms=4,
                        label=f"{name}" + (f" ({knob.label})" if own else ""))
                chosen = r.chosen.get(knob.key)
                if chosen in row:
                    x = knob.values.index(chosen) if kind == "own" else chosen
                    ax.scatter([x], [row[chosen]], s=90, facecolors="none", edgecolors=s["color"])
                for x, loss in zip(xs, row.values(), strict=True):
                    if not math.isfinite(loss):
                        ax.scatter([x], [top], marker="x", color=s["color"], s=50)
        if kind == "lr":
            ax.set_xscale("log")
        ax.set_xlabel({"lr": "peak learning rate", "weight_decay": "weight decay", "warmup_frac": "warm-up fraction",
                       "own": "own knob (grid position)"}[kind])
        ax.set_ylabel("final validation loss (tuning seed)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_ylim(top=top + 0.05)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{suite.name}: tuning runs differing from the chosen configuration in one knob "
                 "(circle: chosen; x at the top: diverged)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


# --- the ladder ----------------------------------------------------------------------------------------------------


def machines(records: dict) -> str:
    """The devices and torch builds a suite's runs used, with how many runs each (a rung may run on a GPU)."""
    counts: dict[str, int] = {}
    for record in records.values():
        env = record["environment"]
        key = f"{env['device']} ({env['device_name'] or 'CPU'}), torch {env['torch']}"
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{key}: {n} runs" for key, n in sorted(counts.items()))


def write_ladder_report(ladder: str, root: Path | None = None) -> Path:
    """results/<ladder>/ladder.md and speedup_vs_size.png: speedup vs AdamW against non-embedding parameters."""
    from lmopt.model import get_preset

    rungs = ladder_rungs(ladder)
    if not rungs:
        raise ValueError(f"no suites form the ladder {ladder!r}")
    rows, series = [], {}
    for suite in rungs:
        params, non_embedding = get_preset(suite.preset).param_counts()
        try:
            _results, comparisons, records = analyse(suite, root)
        except (FileNotFoundError, RuntimeError):
            rows.append(f"| `{suite.name}` | `{suite.preset}` | {non_embedding / 1e6:.2f}M | — | — | — | not run yet |")
            continue
        epochs = next(iter(records.values()))["resolved"]["epochs"]
        cells = []
        for name, c in sorted(comparisons["adamw"].items()):
            if c.speedups:
                cells.append(f"`{name}` {_speedup_text(c)}")
                series.setdefault(name, []).append((non_embedding, *c.speedup[:3], bound_side(c)))
        rows.append(f"| `{suite.name}` | `{suite.preset}` | {non_embedding / 1e6:.2f}M of {params / 1e6:.2f}M | "
                    f"{suite.tokens() / params:.2f} | {epochs:.2f} | {machines(records)} | "
                    f"{'; '.join(cells) or 'in progress'} |")
    out_dir = results_dir(ladder, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = _ladder_plot(ladder, series, out_dir / "speedup_vs_size.png")
    lines = [f"# Ladder `{ladder}`", "",
             f"Produced by `lmopt bench ladder {ladder}` from the rungs' records. Each rung's optimizers are "
             "tuned on that rung (see each suite's description for how coarsely) and compared with AdamW on "
             "held-out seeds; speedups from complete runs, geometric mean with a 95% interval.", "",
             "| rung | preset | non-embedding params | tokens/param | epochs | runs on "
             "| speedup vs AdamW (complete runs) |",
             "|---|---|---|---|---|---|---|", *rows, "", f"![speedup vs model size]({plot.name})", ""]
    path = out_dir / "ladder.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _ladder_plot(ladder: str, series: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styles(sorted(series))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in sorted(series.items()):
        points.sort()
        x = [p[0] for p in points]
        y = [p[1] for p in points]
        low = [max(0.0, p[1] - p[2]) if math.isfinite(p[2]) else 0.0 for p in points]
        high = [max(0.0, p[3] - p[1]) if math.isfinite(p[3]) else 0.0 for p in points]
        s = style[name]
        ax.errorbar(x, y, yerr=[low, high], label=name, color=s["color"], linestyle=s["linestyle"],
                    marker=s["marker"], capsize=3)
        for p in points:  # a rung where every seed gave only a bound: an arrowhead on it, pointing the open way
            if p[4]:
                ax.plot([p[0]], [p[1]], marker="^" if p[4] == ">" else "v", markersize=12, color=s["color"],
                        fillstyle="none")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("speedup vs AdamW (complete runs)")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x" if v in (0.5, 2, 3, 5) else ""))
    ax.set_title(f"{ladder}: speedup vs model size (95% intervals over held-out seeds;\n"
                 "open arrowheads: only a bound, every seed past the budgets run)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
