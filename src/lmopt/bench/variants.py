"""``lmopt bench variant``: does a change to an optimizer keep its results? A paired study on the held-out seeds.

A variant is one optimizer of a finished suite with some options changed (``--set optim.ns_dtype=float32``, a
faster Newton–Schulz, a longer Spectra refresh interval): it is trained at the configuration the suite's tuning
chose for that optimizer, on the suite's held-out seeds at the full budget, and compared per seed with the
suite's own held-out runs of that configuration (same seeds: same initial weights and batches). ``--extra-seeds``
adds paired seeds beyond the suite's, on which the base configuration runs too (in the variant's folder), for a
difference too small for the suite's seeds to settle.

Records go to ``results/<suite>/variants/<name>/runs/`` (the same record format as the suite's, run by the same
:class:`~lmopt.bench.runner.BenchRunner`); ``results/<suite>/variants.md`` holds one row per variant:

- the paired mean difference of final validation loss (variant - base) with its 95% t-interval and p, Holm-
  adjusted over the variants of the table;
- a verdict: **equivalent** when the 90% interval lies inside ±``margin`` (two one-sided tests at 5%; the margin
  is the suite's ``tol``, the seed noise the tuning search ignores), **worse** / **better** when the Holm-
  adjusted p < 0.05, else **inconclusive** with the smallest difference the test detects with 80% power.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmopt.bench.results import chosen_values, collect, final_loss, load_records, results_dir
from lmopt.bench.runner import BenchRunner, spec
from lmopt.bench.suites import Suite
from lmopt.bench.verdict_stats import holm, min_detectable_effect, paired, t_interval
from lmopt.data.paths import atomic_write_text
from lmopt.optim.spec import OptionError
from lmopt.registry import OPTIMIZERS, SUITES
from lmopt.train.config import TrainConfig
from lmopt.train.errors import ConfigError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True)
class Variant:
    name: str
    optimizer: str
    settings: tuple[tuple[str, object], ...]  # knob key ("optim.NAME" or a train setting) -> value, sorted
    purpose: str = "variant"  # or "grid-end": one knob one step past the end of its tuning grid
    extra_seeds: tuple[int, ...] = ()  # more seeds than the suite's held-out ones: base and variant run on them

    def to_json(self) -> str:
        extra = {"extra_seeds": list(self.extra_seeds)} if self.extra_seeds else {}
        return json.dumps({"name": self.name, "optimizer": self.optimizer, "set": dict(self.settings),
                           "purpose": self.purpose, **extra}, indent=1)

    def seeds(self, suite: Suite) -> tuple[int, ...]:
        return (*suite.seeds, *self.extra_seeds)


def parse_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE``: VALUE read as JSON (numbers, true/false, lists), else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes KEY=VALUE (e.g. optim.ns_dtype=float32), not {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def make_variant(suite: Suite, optimizer: str, settings: list[str], name: str,
                 extra_seeds: tuple[int, ...] = ()) -> Variant:
    """Check a variant before anything runs: a known optimizer of the suite, options the optimizer accepts."""
    if not name or not set(name) <= NAME_CHARS:
        raise ValueError(f"variant name {name!r}: use lowercase letters, digits, '-', '_' or '.'")
    if not settings:
        raise ValueError("a variant changes something: give at least one --set KEY=VALUE")
    pairs = dict(parse_setting(s) for s in settings)
    spec_ = OPTIMIZERS.get(optimizer)
    for key in pairs:
        if key.startswith("optim.") and key.split(".")[1] not in spec_.defaults:
            raise ValueError(f"{optimizer} has no option {key.split('.')[1]!r}; its options: "
                             f"{', '.join(sorted(spec_.defaults))}")
    clash = sorted(set(extra_seeds) & {*suite.seeds, suite.tuning_seed})
    if clash or len(set(extra_seeds)) != len(extra_seeds):
        raise ValueError(f"--extra-seeds must be new and distinct seeds: {clash or list(extra_seeds)} "
                         f"(the suite holds out {list(suite.seeds)} and tunes on {suite.tuning_seed})")
    return Variant(name, optimizer, tuple(sorted(pairs.items())), extra_seeds=tuple(extra_seeds))


def grid_end_variants(suite: Suite, root: Path | None = None) -> list[Variant]:
    """One variant per tuned knob whose chosen value is an end of its grid: that knob one step past the end.

    The tuning never tried a value beyond its grid; if the optimum lies there, the optimizer is under-tuned. The
    check runs on the held-out seeds and is reported as a check, never used to change the chosen configuration
    (which would choose on the reporting seeds).
    """
    out = []
    for name, result in collect(suite, load_records(suite.name, root), root).items():
        if not result.tuning_complete:
            continue
        for knob in result.knobs:
            beyond = knob.beyond_end(result.chosen[knob.key])
            if beyond is not None:
                label = f"edge-{name}-{knob.key.removeprefix('optim.')}-{beyond:g}"
                out.append(Variant(label, name, ((knob.key, beyond),), purpose="grid-end"))
    return out


def variants_root(suite: str, root: Path | None = None) -> Path:
    return results_dir(suite, root) / "variants"


class VariantRunner(BenchRunner):
    """The variant's runs on the suite's held-out seeds at the full budget; records in its own folder."""

    def __init__(self, suite: Suite, variant: Variant, jobs: int = 1, results_root: Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        base = chosen_values(suite, variant.optimizer, results_root)
        if base is None:
            raise RuntimeError(f"{suite.name} has no finished tuning of {variant.optimizer}: run "
                               f"`lmopt bench run {suite.name}` first (a variant starts from its tuned values)")
        super().__init__(suite, jobs=jobs, only=[variant.optimizer], results_root=results_root, log=log)
        config = suite.train_config(variant.optimizer, base | dict(variant.settings), 0, suite.steps, "check", False)
        try:
            TrainConfig.from_dict(config).validate()
        except (ConfigError, OptionError) as err:
            raise ConfigError(f"variant {variant.name!r} is not a valid setting: {err}") from err
        self.variant, self.base = variant, base
        self.folder = variants_root(suite.name, results_root) / variant.name
        self.results = self.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "variant.json", variant.to_json() + "\n")

    def records(self) -> dict[str, dict]:
        return load_records(self.variant.name, self.folder.parent)

    def pipeline(self, optimizer: str) -> None:
        values = self.base | dict(self.variant.settings)
        runs = [spec(optimizer, values, seed, self.suite.steps) for seed in self.variant.seeds(self.suite)]
        # on extra seeds the suite has no runs of its own: the base configuration runs here too, to pair with
        runs += [spec(optimizer, self.base, seed, self.suite.steps) for seed in self.variant.extra_seeds]
        self.run_independent(runs, f"variant {self.variant.name}", priority=0)


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    base: dict[int, float]
    finals: dict[int, float]
    step_time_ratio: float  # median over seeds of the variant's median step time / the base run's
    stale: int = 0  # records made at another base configuration (before a re-tune), not used
    superseded: bool = False  # a grid-end check whose value a widened grid now holds: no longer beyond an end


def load_variants(suite: Suite, root: Path | None = None) -> list[VariantResult]:
    """Every variant of the suite with its final losses and the base's, by seed (full budget)."""
    base_records = load_records(suite.name, root)
    found = collect(suite, base_records, root)
    out = []
    for folder in sorted(p for p in variants_root(suite.name, root).glob("*") if (p / "variant.json").exists()):
        meta = json.loads((folder / "variant.json").read_text())
        variant = Variant(meta["name"], meta["optimizer"], tuple(sorted(meta["set"].items())),
                          meta.get("purpose", "variant"), tuple(meta.get("extra_seeds", ())))
        result = found.get(variant.optimizer)
        every = load_records(folder.name, folder.parent)
        # only runs at the current tuned configuration with the variant's change count (a re-tune leaves the
        # earlier ones behind; a variant that the tuning has since chosen is no variant at all)
        chosen = result.chosen if result is not None else {}
        expected = chosen | dict(variant.settings)
        if not chosen or expected == chosen:  # untuned, or a variant the tuning has since chosen: none count
            records, extra_base = {}, {}
        else:
            records = _runs_at(every, expected, variant.seeds(suite), suite.steps)
            extra_base = _runs_at(every, chosen, variant.extra_seeds, suite.steps)
        finals = {r["config"]["seed"]: final_loss(r) for r in records.values()}
        base = dict(result.finals) if result is not None else {}
        base |= {r["config"]["seed"]: final_loss(r) for r in extra_base.values()}
        out.append(VariantResult(variant, base, finals, _step_time_ratio(records, base_records | extra_base,
                                                                          result, suite),
                                 stale=len(every) - len(records) - len(extra_base),
                                 superseded=_inside_grid(variant, result)))
    return out


def _inside_grid(variant: Variant, result) -> bool:
    """A grid-end check whose value is now on its knob's grid (the grid was widened after the check)."""
    if variant.purpose != "grid-end" or result is None:
        return False
    (key, value), = variant.settings
    return any(knob.key == key and value in knob.values for knob in result.knobs)


def _runs_at(records: dict, values: dict, seeds: tuple[int, ...], steps: int) -> dict:
    """The full-budget runs among ``records`` at these knob values and seeds."""
    return {k: r for k, r in records.items()
            if r["knobs"] == values and r["config"]["steps"] == steps and r["config"]["seed"] in seeds}


def _step_time_ratio(records: dict, base_records: dict, result, suite: Suite) -> float:
    if result is None:
        return math.nan
    base_times = {r["config"]["seed"]: r["end"].get("median_step_time") for r in base_records.values()
                  if r["config"]["optimizer"] == result.name and r["knobs"] == result.chosen
                  and r["config"]["steps"] == suite.steps}
    ratios = sorted(r["end"]["median_step_time"] / base_times[r["config"]["seed"]] for r in records.values()
                    if r["end"].get("median_step_time") and base_times.get(r["config"]["seed"]))
    return ratios[len(ratios) // 2] if ratios else math.nan


def judge(diff, adjusted_p: float, margin: float, alpha: float = 0.05) -> str:
    """equivalent (90% CI inside ±margin), worse / better (Holm-adjusted p < alpha), else inconclusive."""
    if diff.n < 2 or math.isnan(diff.mean_diff):
        return "too few seeds"
    low, high = t_interval(diff.mean_diff, diff.sd_diff, diff.n, level=1 - 2 * alpha)
    if diff.sd_diff == 0.0:
        low = high = diff.mean_diff
    if -margin < low and high < margin:
        return f"equivalent (within ±{margin:g})"
    if adjusted_p < alpha:
        return "worse" if diff.mean_diff > 0 else "better"
    mde = min_detectable_effect(diff.sd_diff, diff.n)
    return f"inconclusive (80% power at |Δ| ≥ {mde:.3f})" if math.isfinite(mde) else "inconclusive"


def judged(suite: Suite, results: list[VariantResult]) -> list[tuple[VariantResult, object, float, str]]:
    """Each variant with its paired difference (None before any run), Holm-adjusted p over ``results``, verdict."""
    diffs = []
    for r in results:
        seeds = sorted(set(r.base) & set(r.finals))
        diffs.append(paired([r.finals[s] for s in seeds], [r.base[s] for s in seeds], seeds, seeds, nonfinite="drop")
                     if seeds else None)
    adjusted = holm([d.p if d is not None else math.nan for d in diffs])
    return [(r, d, p, judge(d, p, suite.tol) if d is not None else "waiting for runs")
            for r, d, p in zip(results, diffs, adjusted, strict=True)]


def variants_table(suite: Suite, results: list[VariantResult]) -> str:
    rows = []
    for r, diff, p_adj, verdict in judged(suite, results):
        settings = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r.variant.settings)
        if diff is None:
            rows.append(f"| {r.variant.name} | {r.variant.optimizer} | {settings} | 0 | — | — | — | — | — | "
                        f"{verdict} |")
            continue
        base = sum(r.base[s] for s in diff.seeds) / diff.n
        ratio = f"{r.step_time_ratio:.2f}x" if math.isfinite(r.step_time_ratio) else "—"
        rows.append(
            f"| {r.variant.name} | {r.variant.optimizer} | {settings} | {diff.n} | {base:.4f} | "
            f"{diff.mean_diff:+.4f} [{diff.ci_low:+.4f}, {diff.ci_high:+.4f}] | {diff.p:.3g} | {p_adj:.3g} | "
            f"{ratio} | {verdict} |")
    head = ["| variant | optimizer | changed | seeds | base final loss | Δ loss (variant - base) [95% CI] | p | "
            "Holm p | step time vs base | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    return "\n".join(head + rows)


def grid_end_verdicts(suite: Suite, root: Path | None = None) -> dict[tuple[str, str], str]:
    """(optimizer, knob key) -> the verdict of its grid-end check, for the checks that have run."""
    checks = [r for r in load_variants(suite, root) if r.variant.purpose == "grid-end" and not r.superseded]
    return {(r.variant.optimizer, r.variant.settings[0][0]): verdict
            for r, diff, _p, verdict in judged(suite, checks) if diff is not None}


def write_variants_report(suite_name: str, root: Path | None = None) -> Path:
    """``results/<suite>/variants.md`` from the records (regenerates bit for bit)."""
    suite = SUITES.get(suite_name)
    results = load_variants(suite, root)
    commits = sorted({r["environment"].get("commit", "")[:7]
                      for v in results for r in load_records(v.variant.name, variants_root(suite_name, root))
                      .values()} - {""})
    lines = [
        f"# Variants on `{suite_name}`: does a change keep an optimizer's results?", "",
        f"Made by `lmopt bench variant {suite_name} OPTIMIZER --name NAME --set KEY=VALUE ...` (one per row; "
        f"`lmopt bench variant {suite_name} --report` rewrites this file from the records); runs made at "
        f"commit(s) {', '.join(commits) or '—'}.", "",
        f"Each variant is its optimizer at the configuration the suite's tuning chose, with the listed options "
        f"changed, on the held-out seeds {list(suite.seeds)} at the full budget ({suite.tokens():,} tokens), paired "
        f"by seed with the suite's own runs of that configuration (a row with more seeds ran them with `--extra-"
        f"seeds`, the base configuration too). Equivalent: the 90% interval of the mean "
        f"difference lies inside ±{suite.tol:g} nats (the suite's seed-noise tolerance; two one-sided tests at 5%). "
        f"Holm's correction is over this table's rows. Step times are the runs' median training step, measured "
        f"while other runs shared the machine: a rough indication only (`lmopt bench step` measures speed).", "",
        "## Faster or different settings", "",
        variants_table(suite, [r for r in results if r.variant.purpose != "grid-end"]), "",
        "## Beyond the grid's ends", "",
        f"Where the tuning chose the last value of a knob's grid (other than 0), the optimum may lie outside the "
        f"grid. `lmopt bench variant {suite_name} --grid-ends` runs that knob one grid step further (β and momentum "
        f"in steps of 1 - x) on the held-out seeds. **better** means the optimizer is under-tuned at this grid "
        f"(its leaderboard row is then not its best); **worse** or **equivalent** means the grid end costs "
        f"nothing measurable. A check, not a choice: the chosen configuration never changes on the reporting "
        f"seeds. Holm over this table.", "",
        variants_table(suite, [r for r in results if r.variant.purpose == "grid-end" and not r.superseded]), "",
    ]
    stale = [f"{r.variant.name} ({r.stale}{'; its value is now on the widened grid' if r.superseded else ''})"
             for r in results if r.stale]
    if stale:
        lines += [f"Not used: runs made at an earlier tuned configuration of their optimizer (before a re-tune), "
                  f"or a variant the tuning has since chosen: {', '.join(stale)}.", ""]
    path = results_dir(suite_name, root) / "variants.md"
    atomic_write_text(path, "\n".join(lines))
    return path
