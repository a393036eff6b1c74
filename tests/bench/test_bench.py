import json
import math

import numpy as np
import pytest

from lmopt.bench.report import write_report
from lmopt.bench.runner import BenchRunner, load_records
from lmopt.bench.stats import budget_speedup, budget_speedup_text, curve_speedup, tokens_to_reach, welch
from lmopt.bench.suites import Suite, log_grid
from lmopt.registry import SUITES


def test_log_grid_is_centred_and_log_spaced():
    assert log_grid(1e-3, 5, 2.0) == (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
    assert len(log_grid(3e-3, 3, 3.0)) == 3


def test_tokens_to_target_interpolates_linearly():
    tokens = np.array([0.0, 100.0, 200.0])
    assert tokens_to_reach(tokens, np.array([10.0, 6.0, 4.0]), 5.0) == pytest.approx(150.0)
    assert math.isnan(tokens_to_reach(tokens, np.array([10.0, 6.0, 5.5]), 5.0))
    base = np.array([10.0, 6.0, 5.0])
    # reaches 5.0 at 150 of 200 tokens: 200 / 150
    assert curve_speedup(tokens, base, tokens, np.array([10.0, 6.0, 4.0])) == pytest.approx(200 / 150)
    # never reaches 5.0; ends at 6.0, which the baseline reached at 100 of 200 tokens: 100 / 200
    assert curve_speedup(tokens, base, tokens, np.array([10.0, 8.0, 6.0])) == pytest.approx(0.5)
    # complete runs at budgets 100 and 200 with final losses 5.5 and 4.5: 5.0 is reached at sqrt(100*200)
    assert budget_speedup(5.0, 200, [100, 200], [5.5, 4.5]) == pytest.approx(200 / math.sqrt(100 * 200))
    assert budget_speedup_text(5.0, 200, [100, 200], [4.9, 4.5]) == "> 2.00x"  # beaten at half the budget
    assert budget_speedup_text(5.0, 200, [100, 200], [5.9, 5.5]) == "< 1.00x"  # not reached in the full budget
    assert budget_speedup_text(5.0, 200, [200], [5.5]) == "—"


def test_welch_says_no_difference_for_identical_samples_and_finds_a_clear_one():
    _, p = welch([1.0, 1.1, 0.9], [1.0, 1.1, 0.9])
    assert p == pytest.approx(1.0)
    _, p = welch([1.0, 1.01, 0.99], [2.0, 2.01, 1.99])
    assert p < 1e-4


def test_suites_in_the_registry_are_complete():
    full = SUITES.get("cpu-full")
    from lmopt.registry import OPTIMIZERS

    assert set(full.optimizers) == set(OPTIMIZERS.names())
    assert all(len(grid) >= 5 for grid in full.lr_grids.values())
    assert len(full.seeds) >= 3


def test_a_tiny_suite_end_to_end(tmp_path, monkeypatch):
    """Sweep with widening, seeds, a second budget, the report and its plots; then a rerun does nothing."""
    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path / "runs"))
    suite = Suite(name="cpu-quick", description="test", preset="nano", data="brown", seq_len=32,
                  batch_tokens=512, steps=8, extra_steps=(4,), lr_grids={"adamw": (1e-3, 1e-2), "spectra": (3e-3,)},
                  seeds=(0, 1), eval_points=4, eval_tokens=2048, max_widen=1)
    runner = BenchRunner(suite, jobs=2, results_root=tmp_path / "results", log=lambda _: None)
    runner.run()
    records = load_records("cpu-quick", tmp_path / "results")
    configs = [(r["config"]["optimizer"], r["config"]["lr"], r["config"]["seed"], r["config"]["steps"])
               for r in records.values()]
    sweep = {(o, lr) for o, lr, s, t in configs if s == 0 and t == 8}
    assert {("adamw", 1e-3), ("adamw", 1e-2), ("spectra", 3e-3)} <= sweep
    assert len(sweep) > 3  # at least one edge was widened
    for optimizer in ("adamw", "spectra"):
        best = min((r for r in records.values() if r["config"]["optimizer"] == optimizer
                    and r["config"]["seed"] == 0 and r["config"]["steps"] == 8),
                   key=lambda r: r["end"]["final_val_loss"])["config"]["lr"]
        assert {(s, t) for o, lr, s, t in configs if o == optimizer and lr == best} == {(0, 8), (1, 8), (0, 4), (1, 4)}
    # same seed, same initial weights and data: the step-0 validation losses agree across optimizers
    initial = {r["evals"][0]["val_loss"] for r in records.values() if r["config"]["seed"] == 0}
    assert len(initial) == 1

    monkeypatch.setattr(SUITES, "get", lambda name: suite)
    path = write_report("cpu-quick", root=tmp_path / "results")
    text = path.read_text()
    assert "| 1 |" in text and "`spectra` vs `adamw`" in text
    for plot in ("loss_vs_tokens.png", "lr_sensitivity.png", "speedup.png"):
        assert (path.parent / plot).stat().st_size > 1000
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["adamw"]["speedup"] == pytest.approx(1.0)

    ran = []
    runner2 = BenchRunner(suite, jobs=1, results_root=tmp_path / "results", log=ran.append)
    runner2.run()
    assert not any("runs to do" in line for line in ran)


def test_step_benchmark_reports_every_optimizer_against_fused_adamw(tmp_path):
    """Structure only: timings are measured by the command, never asserted."""
    from lmopt.bench.step import (
        BASELINE,
        run_step_benchmark,
        run_train_step_benchmark,
        run_trainer_overhead,
        write_step_results,
    )
    from lmopt.registry import OPTIMIZERS

    result = run_step_benchmark("nano", repeats=1, warmup=1, compiled=False, profile=["spectra"], log=lambda _: None)
    rows = result["results"]
    assert set(OPTIMIZERS.names()) - {"adamw"} <= set(rows) and BASELINE in rows
    assert {"spectra (per-matrix)", "spectra (refresh every 10)", "torch.optim.Muon (matrices only)"} <= set(rows)
    assert rows[BASELINE]["time_vs_fused_adamw"] == 1.0 and rows[BASELINE]["state_vs_adamw"] == 1.0
    spectra = rows["spectra"]  # each ratio is to the baseline's median in the row's own set, which is recorded
    assert spectra["time_vs_fused_adamw"] == pytest.approx(spectra["step_seconds"] / spectra["baseline_seconds_in_set"])
    # Spectra holds ~half of AdamW's state on the hidden matrices but a full AdamW state on the embedding,
    # which is 2/3 of nano's parameters: (1.05M x 8 + 0.49M x 4.06) / (1.54M x 8) = 0.84
    assert rows["spectra"]["state_vs_adamw"] == pytest.approx(0.84, abs=0.01)
    assert rows["adafactor"]["state_vs_adamw"] < 0.1
    result["train_step"] = run_train_step_benchmark("nano", seq_len=64, batch_tokens=256, repeats=1, warmup=1,
                                                    only=["spectra"], compiled=False, log=lambda _: None)
    assert set(result["train_step"]["results"]) == {BASELINE, "spectra"}
    assert result["train_step"]["results"][BASELINE]["time_vs_adamw"] == 1.0
    result["trainer_overhead"] = run_trainer_overhead("nano", steps=2, rounds=1, seq_len=64, batch_tokens=256,
                                                      log=lambda _: None)
    assert result["trainer_overhead"]["ratio"] > 0
    text = write_step_results(result, tmp_path, "lmopt bench step --preset nano", "abc").read_text()
    assert "| spectra |" in text and "## Training step" in text and "| ratio |" in text
    assert "Where the time goes: `spectra`" in text and result["profiles"]["spectra"][0]["calls"] >= 1
