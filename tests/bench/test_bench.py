import json
import math
import sys
import threading
import time

import numpy as np
import pytest

from lmopt.bench.report import machines, write_ladder_report, write_report
from lmopt.bench.results import chosen_values, collect, compare, load_records, off_path_tuning_runs, tuning_history
from lmopt.bench.runner import BenchRunner, Slots, check_search_space
from lmopt.bench.stats import budget_speedup, budget_speedup_text, curve_speedup, tokens_to_reach
from lmopt.bench.suites import OWN_KNOBS, Suite, ladder_rungs, tuning_space
from lmopt.bench.tuning import Knob, apply_values, incumbent, log_values, next_probe, sensitivity, values_at
from lmopt.bench.variants import (
    VariantRunner,
    grid_end_variants,
    grid_end_verdicts,
    judge,
    load_variants,
    make_variant,
    parse_setting,
    write_variants_report,
)
from lmopt.model import get_preset
from lmopt.model.qwen3 import Qwen3
from lmopt.registry import OPTIMIZERS, SUITES, Entry
from lmopt.train.errors import ConfigError


def test_one_step_past_a_grid_end_follows_the_grid_spacing():
    assert Knob("optim.betas.1", (0.9, 0.95, 0.99), 0.95).beyond_end(0.9) == 0.8  # 1 - x doubles
    assert Knob("optim.betas.1", (0.9, 0.99, 0.999), 0.99).beyond_end(0.999) == 0.9999  # 1 - x / 10
    assert Knob("lr", (0.01, 0.02, 0.04), 0.02).beyond_end(0.04) == 0.08
    assert Knob("weight_decay", (0.0, 0.1, 0.2), 0.1).beyond_end(0.0) is None  # 0 is a natural bound
    assert Knob("lr", (0.01, 0.02, 0.04), 0.02).beyond_end(0.02) is None  # not an end
    assert Knob("optim.shift", (-0.1, 0.1), 0.1).beyond_end(0.1) == 0.3  # crosses zero: linear


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_freed_slot_goes_to_the_earliest_optimizer_and_idle_helpers_give_up():
    slots, served, stop = Slots(1), [], threading.Event()

    def request(priority):
        with slots.hold(priority, give_up=stop.is_set) as granted:
            served.append((priority, granted))

    with slots.hold(0):  # the only slot is taken; three requests queue up out of order
        threads = [threading.Thread(target=request, args=(p,)) for p in (3, 1, 2)]
        for queued, thread in enumerate(threads, start=1):
            thread.start()
            wait_until(lambda n=queued: len(slots._waiting) == n)
    for thread in threads:
        thread.join(timeout=10)
    assert served == [(1, True), (2, True), (3, True)]

    with slots.hold(0):
        waiting = threading.Thread(target=request, args=(1,))
        waiting.start()
        wait_until(lambda: len(slots._waiting) == 1)
        stop.set()
        slots.wake()
        waiting.join(timeout=10)
    assert served[-1] == (1, False)  # gave up without a slot, while the slot was still held


def test_a_stop_before_the_tuning_ends_runs_nothing_else(tmp_path):
    runner = BenchRunner(SUITES.get("cpu-quick"), jobs=2, results_root=tmp_path)
    runner._stopping = True  # as after SIGTERM: no tuning record exists, so there is no configuration to hold out
    runner.pipeline("adamw")
    assert not (tmp_path / "cpu-quick" / "runs").exists() or not any((tmp_path / "cpu-quick" / "runs").iterdir())


def test_log_values_are_log_spaced_around_the_centre():
    assert log_values(1e-3, 2, 2) == (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)


def search(knobs, objective, budget, tol=0.0):
    history, order = {}, []
    while (point := next_probe(knobs, history, order, budget, tol)) is not None:
        history[point] = objective(values_at(knobs, point))
        order.append(point)
    return history, order


def test_coordinate_search_walks_to_the_optimum_with_exactly_the_budget():
    knobs = (Knob("lr", log_values(1e-3, 4, 4), 1e-3), Knob("weight_decay", (0.0, 0.1, 0.2), 0.1))

    def objective(v):  # optimum at lr 8e-3 (3 steps up), wd 0
        return (math.log2(v["lr"] / 8e-3)) ** 2 + 10 * v["weight_decay"]

    history, order = search(knobs, objective, budget=10)
    assert len(order) == 10 and len(set(order)) == 10
    assert values_at(knobs, incumbent(history, order, 0.0)) == {"lr": 8e-3, "weight_decay": 0.0}
    # the same results replay to the same incumbent, and a tolerance keeps the search from moving on noise
    assert incumbent(history, order, tol=100.0) == order[0]


def test_coordinate_search_stops_when_nothing_is_left_to_try():
    knobs = (Knob("lr", (1e-3, 2e-3), 1e-3),)
    _history, order = search(knobs, lambda v: v["lr"], budget=12)
    assert len(order) == 2


def test_a_diverged_probe_never_becomes_the_incumbent():
    knobs = (Knob("lr", (1e-3, 2e-3, 4e-3), 2e-3),)
    history, order = search(knobs, lambda v: float("nan") if v["lr"] == 4e-3 else v["lr"], budget=3)
    assert values_at(knobs, incumbent(history, order, 0.0)) == {"lr": 1e-3}
    assert sensitivity(knobs, history, incumbent(history, order, 0.0))["lr"][4e-3] != 4e-3


def test_knob_values_reach_the_train_config():
    config = apply_values({"optim": {}}, {"lr": 0.01, "optim.betas.1": 0.99, "optim.momentum": 0.9},
                          {"betas": (0.9, 0.95)})
    assert config["lr"] == 0.01 and config["optim"] == {"betas": [0.9, 0.99], "momentum": 0.9}


def test_every_optimizer_has_a_tuning_space_starting_at_its_defaults():
    for name in OPTIMIZERS.names():
        knobs = tuning_space(name)
        keys = [k.key for k in knobs]
        assert keys[0] == "lr" and {"weight_decay", "warmup_frac"} <= set(keys)
        assert len(keys) == 3 + len(OWN_KNOBS[name]), name  # every optimizer has its own knob(s)
        assert knobs[0].start == pytest.approx(OPTIMIZERS.get(name).default_lr, rel=1e-3)


def test_registered_suites_and_ladders_follow_the_protocol():
    full = SUITES.get("cpu-full")
    assert set(full.optimizers) == set(OPTIMIZERS.names()) and full.optimizers[:2] == ("adamw", "muon")
    assert len(full.seeds) >= 5 and full.tuning_seed not in full.seeds and len(full.budgets()) >= 3
    for ladder in ("cpu-ladder", "gpu-ladder"):
        rungs = ladder_rungs(ladder)
        assert len(rungs) >= 3
        counts = [get_preset(s.preset).param_counts() for s in rungs]
        assert counts[-1][1] / counts[0][1] >= 8  # >= 8x in non-embedding parameters
        assert all(s.transfer_from in (None, *(r.name for r in rungs)) for s in rungs)
    small_total, small_non_embedding = get_preset(ladder_rungs("cpu-ladder")[-1].preset).param_counts()
    assert small_non_embedding / small_total >= 2 / 3


def test_every_value_of_every_tuning_grid_is_a_valid_setting():
    for name in SUITES.names():
        suite = SUITES.get(name)
        for optimizer in suite.optimizers:
            check_search_space(suite, optimizer)


def test_a_bad_grid_value_stops_the_suite_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setitem(OWN_KNOBS, "muon", (("optim.momentum", (0.95, 1.5)),))
    with pytest.raises(ConfigError, match=r"muon's tuning grid value optim.momentum=1.5 is not a valid setting"):
        BenchRunner(SUITES.get("cpu-quick"), results_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_tokens_to_target_interpolates_linearly():
    tokens = np.array([0.0, 100.0, 200.0])
    assert tokens_to_reach(tokens, np.array([10.0, 6.0, 4.0]), 5.0) == pytest.approx(150.0)
    assert math.isnan(tokens_to_reach(tokens, np.array([10.0, 6.0, 5.5]), 5.0))
    base = np.array([10.0, 6.0, 5.0])
    assert curve_speedup(tokens, base, tokens, np.array([10.0, 6.0, 4.0])) == pytest.approx(200 / 150)
    assert curve_speedup(tokens, base, tokens, np.array([10.0, 8.0, 6.0])) == pytest.approx(0.5)
    assert budget_speedup(5.0, 200, [100, 200], [5.5, 4.5]) == pytest.approx(200 / math.sqrt(100 * 200))
    assert budget_speedup_text(5.0, 200, [100, 200], [4.9, 4.5]) == "> 2.00x"
    assert budget_speedup_text(5.0, 200, [100, 200], [5.9, 5.5]) == "< 1.00x"


def register(monkeypatch, suite):
    SUITES.names()  # populate before adding a test suite
    monkeypatch.setitem(SUITES._entries, suite.name, Entry(suite.name, suite, suite.description))
    return suite


TINY = dict(data="brown", seq_len=32, batch_tokens=512, steps=8, seeds=(0, 1), budget_fractions=(0.5,),
            eval_points=4, eval_tokens=2048, ladder="test-ladder")


def test_a_tiny_suite_and_ladder_end_to_end(tmp_path, monkeypatch):
    """Tuning, held-out seeds at two budgets, the report (regenerated bit for bit), a second rung that starts
    from the first rung's choice, the ladder report; a rerun does nothing."""
    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setitem(OWN_KNOBS, "muon", (("optim.momentum", (0.9, 0.95)),))  # Muon's default is a grid end
    results = tmp_path / "results"
    first = register(monkeypatch, Suite(name="test-rung1", description="rung 1", preset="nano",
                                        optimizers=("adamw", "muon"), tuning_budget=2, **TINY))
    BenchRunner(first, jobs=2, results_root=results, log=lambda _: None).run()
    records = load_records(first.name, results)
    assert len(records) == 2 * (2 + 2 * 2)
    tuned = [r for r in records.values() if r["config"]["seed"] == first.tuning_seed]
    assert all(r["probe"] in (0, 1) for r in tuned)
    # same seed, same initial weights and data: the step-0 validation losses agree across optimizers
    assert len({r["evals"][0]["val_loss"] for r in records.values() if r["config"]["seed"] == 0}) == 1
    found = collect(first, records, results)
    assert set(found["adamw"].finals) == {0, 1} and set(found["adamw"].budget_finals) == {4, 8}
    comparison = compare(found, first, "adamw")["muon"]
    assert comparison.diff.n == 2 and set(comparison.speedups) == {0, 1}

    path = write_report(first.name, root=results)
    text, summary = path.read_text(), (path.parent / "summary.json").read_text()
    assert "| 1 |" in text and "Δ vs AdamW" in text and "**" in text
    for plot in ("loss_vs_tokens.png", "speedup_vs_adamw.png", "sensitivity.png"):
        assert (path.parent / plot).stat().st_size > 1000
    write_report(first.name, root=results)
    assert path.read_text() == text and (path.parent / "summary.json").read_text() == summary
    assert json.loads(summary)["muon"]["vs_adamw"]["diff"] == pytest.approx(comparison.diff.mean_diff)

    rung2 = {**TINY, "seeds": (0,), "budget_fractions": ()}  # 2 runs: what a rung takes over is the point here
    second = register(monkeypatch, Suite(name="test-rung2", description="rung 2", preset="tiny",
                                         optimizers=("adamw",), tuning_budget=1, transfer_from=first.name,
                                         rung_knobs=("lr", "own"), **rung2))
    log = []
    BenchRunner(second, jobs=1, results_root=results, log=log.append).run()
    start = chosen_values(first, "adamw", results)
    rung2 = load_records(second.name, results)
    first_probe = next(r for r in rung2.values() if r["probe"] == 0)
    assert first_probe["knobs"] == start  # every knob starts at rung 1's choice; wd and warm-up stay there
    assert first_probe["config"]["weight_decay"] == start["weight_decay"]
    ladder = write_ladder_report("test-ladder", root=results)
    assert "test-rung1" in ladder.read_text() and (ladder.parent / "speedup_vs_size.png").exists()
    assert "| cpu (CPU), torch " in ladder.read_text()  # the device each rung ran on

    ran = []
    BenchRunner(first, jobs=1, results_root=results, log=ran.append).run()
    assert not any("final val loss" in line for line in ran)

    # a variant: Muon at its tuned configuration with fp32 Newton-Schulz, paired with the suite's own runs
    variant = make_variant(first, "muon", ["optim.ns_dtype=float32", "optim.ns_steps=5"], "fp32-ns")
    VariantRunner(first, variant, jobs=2, results_root=results, log=lambda _: None).run()
    [found_variant] = load_variants(first, results)
    assert set(found_variant.finals) == set(found_variant.base) == {0, 1}
    runs = load_records("fp32-ns", results / first.name / "variants")
    assert all(r["config"]["optim"]["ns_dtype"] == "float32" for r in runs.values())
    assert all(r["knobs"]["lr"] == chosen_values(first, "muon", results)["lr"] for r in runs.values())
    report = write_variants_report(first.name, root=results)
    text = report.read_text()
    assert "| fp32-ns | muon | `optim.ns_dtype=\"float32\"`, `optim.ns_steps=5` | 2 |" in text
    assert write_variants_report(first.name, root=results).read_text() == text
    # a run made at an earlier tuned configuration (before a re-tune) is left out, and said to be
    folder = results / first.name / "variants" / "fp32-ns" / "runs"
    lines = next(folder.glob("*.jsonl")).read_text().splitlines()
    head = json.loads(lines[0])
    head["knobs"]["lr"] *= 2
    (folder / "earlier.jsonl").write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    [again] = load_variants(first, results)
    assert again.finals == found_variant.finals and again.stale == 1
    assert "Not used: " in write_variants_report(first.name, root=results).read_text()
    (folder / "earlier.jsonl").unlink()
    # more seeds than the suite holds out: the base configuration runs on them too, and they pair
    more = make_variant(first, "muon", ["optim.ns_dtype=float32"], "fp32-more", extra_seeds=(7,))
    VariantRunner(first, more, jobs=2, results_root=results, log=lambda _: None).run()
    [fp32_more] = [v for v in load_variants(first, results) if v.variant.name == "fp32-more"]
    assert set(fp32_more.finals) == set(fp32_more.base) == {0, 1, 7} and fp32_more.stale == 0
    assert fp32_more.base[0] == found_variant.base[0]  # the suite's own run where it has one
    with pytest.raises(ValueError, match="must be new and distinct seeds"):
        make_variant(first, "muon", ["optim.ns_dtype=float32"], "x", extra_seeds=(1,))
    ran = []
    VariantRunner(first, variant, results_root=results, log=ran.append).run()
    assert not any("final val loss" in line for line in ran)
    with pytest.raises(ValueError, match="no option 'refresh'"):
        make_variant(first, "muon", ["optim.refresh=3"], "x")
    with pytest.raises(RuntimeError, match="no finished tuning of lamb"):
        VariantRunner(first, make_variant(first, "lamb", ["optim.max_trust=5"], "lamb-5"), results_root=results)
    with pytest.raises(ConfigError, match="variant 'm' is not a valid setting: Invalid momentum: 1.5"):
        VariantRunner(first, make_variant(first, "muon", ["optim.momentum=1.5"], "m"), results_root=results)

    # grid ends: Muon's momentum stayed at 0.95, the end of its grid: one step further is 1 - 0.05^2/0.1
    [edge] = grid_end_variants(first, results)
    assert (edge.optimizer, edge.settings, edge.purpose) == ("muon", (("optim.momentum", 0.975),), "grid-end")
    VariantRunner(first, edge, jobs=2, results_root=results, log=lambda _: None).run()
    [verdict] = grid_end_verdicts(first, results).values()
    assert "momentum (**0.95: " in write_report(first.name, root=results).read_text()
    assert f"grid end [one step further: {verdict}]" in write_report(first.name, root=results).read_text()
    tables = write_variants_report(first.name, root=results).read_text().split("## Beyond the grid's ends")
    assert "fp32-ns" in tables[0] and "edge-muon-momentum-0.975" in tables[1] and "fp32-ns" not in tables[1]


def test_variant_verdicts_on_known_differences():
    from lmopt.bench.verdict_stats import paired

    seeds = [0, 1, 2, 3, 4]
    base = [5.0, 5.1, 4.9, 5.05, 4.95]
    def shifted(deltas):
        return paired([b + d for b, d in zip(base, deltas, strict=True)], base, seeds, seeds)

    same = shifted([0.001, -0.002, 0.0, 0.001, -0.001])
    assert judge(same, 1.0, 0.01).startswith("equivalent")
    worse = shifted([0.05, 0.06, 0.04, 0.05, 0.055])
    assert judge(worse, worse.p, 0.01) == "worse"
    noisy = shifted([0.05, -0.04, 0.03, -0.06, 0.01])
    assert judge(noisy, noisy.p, 0.01).startswith("inconclusive (80% power at |Δ| ≥")
    assert parse_setting("optim.ns_coefficients=polar-express") == ("optim.ns_coefficients", "polar-express")
    assert parse_setting("optim.refresh_interval=10") == ("optim.refresh_interval", 10)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_setting("ns_dtype")


def test_step_benchmark_reports_every_optimizer_against_fused_adamw(tmp_path):
    """Structure only: timings are measured by the command, never asserted."""
    from lmopt.bench.step import (
        BASELINE,
        run_step_benchmark,
        run_train_step_benchmark,
        run_trainer_overhead,
        write_step_results,
    )
    from lmopt.train.trainer import cpu_description

    result = run_step_benchmark("nano", repeats=1, warmup=1, compiled=False, profile=["spectra"], log=lambda _: None,
                                muon_layers=1)
    rows = result["results"]
    assert result["compared_repeats"] == 4  # the rows compared with each other take 4x the repeats
    with pytest.raises(ValueError, match="at least 1"):
        run_step_benchmark("nano", repeats=1, compared_repeats=0, log=lambda _: None)
    # the Muon pair ran on the first layer's 7 hidden matrices only (one fp32 buffer per entry)
    assert result["muon_pair_layers"] == 1 and result["layers"] > 1
    assert rows["lmopt muon (matrices only)"]["state_bytes"] == 4 * sum(
        p.numel() for p in Qwen3(get_preset("nano").config).layers[0].parameters() if p.dim() == 2)
    assert set(OPTIMIZERS.names()) - {"adamw"} <= set(rows) and BASELINE in rows
    assert {"spectra (for-loop)", "spectra (refresh every 10)", "torch.optim.Muon (matrices only)"} <= set(rows)
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
    with pytest.raises(ValueError, match="no step pair would be timed"):
        run_trainer_overhead("nano", steps=3, skip=1, log=lambda _: None)
    overhead = run_trainer_overhead("nano", steps=4, rounds=2, skip=1, seq_len=64, batch_tokens=256,
                                    log=lambda _: None)
    assert overhead["ratio_min"] <= overhead["ratio"] <= overhead["ratio_max"] and overhead["ratio_min"] > 0
    result["trainer_overhead"] = overhead
    text = write_step_results(result, tmp_path, "lmopt bench step --preset nano", "abc").read_text()
    assert "| spectra |" in text and "## Training step" in text and "| ratio |" in text
    assert "Where the time goes: `spectra`" in text and result["profiles"]["spectra"][0]["calls"] >= 1
    assert f"({cpu_description()})" in text.splitlines()[2]  # the CPU is named: its bf16 support decides "auto"
    # Spectra on the Muon pair's matrices (a CPU: the fused row too), reported against torch's Muon in the file
    assert {"spectra (matrices only)", "spectra (fused, matrices only)"} <= set(rows)
    assert "on the same matrices, in the same set:" in text


def test_a_step_row_that_does_not_exist_here_fails_before_any_timing():
    from lmopt.bench.step import run_step_benchmark

    logged = []
    with pytest.raises(ValueError, match=r"No step row named 'muon \(gram\)', 'spectra \(householder qr\)' on cpu"):
        run_step_benchmark("nano", repeats=1, warmup=1, compiled=False, log=logged.append,
                           only=["muon", "muon (gram)", "spectra (householder qr)"])  # misspelt; a GPU's row
    assert not logged  # nothing was timed


def test_rows_compared_with_each_other_share_one_interleaved_set():
    """The optimizers timed on the same matrices (torch's and lmopt's Muon, Spectra) in one set, Spectra beside
    its Householder-QR row (a GPU's), everything else alone with the baseline."""
    from lmopt.bench.step import _interleaving_sets

    names = ["lamb", "torch.optim.Muon (matrices only)", "spectra", "spectra (matrices only)",
             "lmopt muon (matrices only)", "spectra (householder qr)"]
    assert _interleaving_sets(names) == [
        ["lamb"], ["torch.optim.Muon (matrices only)", "lmopt muon (matrices only)", "spectra (matrices only)"],
        ["spectra", "spectra (householder qr)"]]
    assert _interleaving_sets(["lamb", "spectra"]) == [["lamb"], ["spectra"]]


def test_gpu_step_tables_are_named_after_the_gpu(tmp_path):
    from lmopt.bench.step import device_name

    assert device_name({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == "cuda-nvidia-h100-80gb-hbm3"
    assert device_name({"threads": 2}) == "cpu-2threads"


def test_end_to_end_overhead_trains_each_optimizer_through_the_trainer(tmp_path, monkeypatch):
    """Structure only: the runs happen through lmopt train (losses recorded), the first optimizer is the
    baseline, and the table names the implementation each ran."""
    from lmopt.bench.overhead import run_overhead, write_overhead_results

    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path / "runs"))
    settings = dict(preset="nano", seq_len=32, batch_tokens=256, eval_tokens=256, device="cpu")
    result = run_overhead(settings, ["adamw", "spectra"], steps=3, rounds=2, skip=1,
                          options={"adamw": {"impl": "fused"}}, log=lambda _: None)
    rows = result["results"]
    assert rows["adamw"]["overhead"] == 0 and rows["adamw"]["impl"] == "fused" and rows["spectra"]["impl"]
    assert len(rows["spectra"]["round_medians"]) == 2 and rows["spectra"]["final_val_loss"] > 0
    assert 0 < rows["spectra"]["optimizer_seconds"] < rows["spectra"]["step_seconds"]
    assert not (tmp_path / "runs").exists()  # the runs lived in a temporary folder
    text = write_overhead_results(result, tmp_path, "lmopt bench overhead", "abc").read_text()
    assert "| spectra | foreach |" in text and len(list(tmp_path.glob("cpu-*threads-nano.json"))) == 1
    with pytest.raises(ValueError, match="must exceed skip"):
        run_overhead(settings, ["adamw"], steps=2, skip=2)
    with pytest.raises(ValueError, match="compilation step"):  # with compile, steps 3 and skip 2 time nothing
        run_overhead(settings | {"compile": True}, ["adamw"], steps=3, skip=2)


def test_gpu_jobs_get_disjoint_devices_and_the_dry_run_counts_the_protocol(monkeypatch):
    import dataclasses

    from lmopt.bench.plan import suite_plan
    from lmopt.bench.runner import device_groups

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    suite = SUITES.get("gpu-134m")
    groups = device_groups(suite, 4)
    assert [groups.get() for _ in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert device_groups(dataclasses.replace(suite, gpus_per_job=2), 2).get() == ["0", "1"]
    with pytest.raises(ValueError, match="needs 8 GPUs"):
        device_groups(dataclasses.replace(suite, gpus_per_job=2), 4)
    assert device_groups(SUITES.get("cpu-full"), 2) is None
    plan = suite_plan(suite, list(suite.optimizers))
    per_optimizer = suite.tuning_budget * 2000 + len(suite.seeds) * (500 + 1000 + 2000)
    assert plan["runs"] == 11 * (12 + 5 * 3) and plan["tokens"] == 11 * per_optimizer * 262144
    assert plan["gpu_hours"] > 0


@pytest.mark.parametrize("name", SUITES.names())
def test_every_suite_has_a_dry_run_plan(name):
    from lmopt.bench.plan import plan_text, suite_plan

    suite = SUITES.get(name)
    plan = suite_plan(suite, list(suite.optimizers))
    assert plan["runs"] > 0 and plan["memory"] and "suite" in plan_text(plan)


def test_the_search_sweeps_every_knob_before_revisiting_one():
    """Round-robin: with 4 knobs and 12 runs every knob is probed, even when the first keeps improving early
    (protocol v1 went back to the first knob after each improvement and never reached the last)."""
    knobs = (Knob("lr", log_values(1e-3, 4, 4), 1e-3), Knob("optim.betas.1", (0.9, 0.95, 0.99), 0.95),
             Knob("weight_decay", (0.0, 0.1, 0.2), 0.1), Knob("warmup_frac", (0.0, 0.05, 0.1, 0.2), 0.05))

    def objective(v):  # everything helps a little: lr up, β2 down, wd up, warm-up up
        return (-math.log2(v["lr"]) * 0.1 + v["optim.betas.1"] - v["weight_decay"] * 0.5 - v["warmup_frac"])

    _history, order = search(knobs, objective, budget=12)
    best, axes = order[0], []
    for p in order[1:]:  # the knob each probe moved, relative to the incumbent of its time
        axes.append(next(axis for axis in range(4) if p[axis] != best[axis]))
        best = p if objective(values_at(knobs, p)) < objective(values_at(knobs, best)) else best
    assert set(axes) == {0, 1, 2, 3} and axes == sorted(axes)  # one sweep, in order, no knob revisited early
    # moving along an improving knob continues on it before the next knob: lr 2e-3 then 4e-3
    assert [values_at(knobs, p)["lr"] for p in order[1:4]] == [5e-4, 2e-3, 4e-3]


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "adamw", "nope"], "nope"),
    (["--set", "nope.impl=fused"], "nope"),
    (["--set", "preset=huge"], "huge"),
    (["--set", "seq_len=0"], "seq_len"),
    (["--set", 'optim={"impl": "fused"}'], "optim.KEY=VALUE"),
    (["--optimizers", "adamw", "--set", "muon.impl=x"], "which --optimizers does not list"),
])
def test_bench_overhead_refuses_bad_input_before_training(tmp_path, monkeypatch, capsys, args, message):
    from lmopt.cli import main

    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path / "runs"))
    assert main(["bench", "overhead", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_machines_names_the_device_of_every_run():
    """A rung may run on a lent GPU: the report says which device each run used, counted."""
    cpu = {"environment": {"device": "cpu", "device_name": "", "torch": "2.13.0+cpu"}}
    gpu = {"environment": {"device": "cuda", "device_name": "NVIDIA H100", "torch": "2.9.0+cu128"}}
    assert machines({"a": cpu, "b": cpu}) == "cpu (CPU), torch 2.13.0+cpu"
    assert machines({"a": gpu, "b": cpu, "c": gpu}) == ("cpu (CPU), torch 2.13.0+cpu: 1 runs; "
                                                        "cuda (NVIDIA H100), torch 2.9.0+cu128: 2 runs")


def test_a_widened_grid_re_tunes_from_the_records():
    """The tuning path is replayed on the current grids: after a knob's grid is widened (its end was chosen), the
    replay keeps the records the new path shares with the old, stops at the first new probe, and counts the rest
    as off the path; once the new probes have run, the choice is the new grid's."""
    suite = Suite(name="t", description="t", preset="nano", optimizers=("muon",), tuning_budget=6, tol=0.0, **TINY)

    def objective(v):  # optimum at momentum 0.6, beyond the narrow grid's end
        return abs(v["optim.momentum"] - 0.6) + abs(math.log2(v["lr"] / 0.02))

    def records_of(knobs, points_and_losses, first_probe=0):
        return {f"r{first_probe + i}": {"config": {"optimizer": "muon", "seed": suite.tuning_seed,
                                                   "steps": suite.steps},
                                        "knobs": values_at(knobs, p), "probe": first_probe + i,
                                        "end": {"final_val_loss": loss}}
                for i, (p, loss) in enumerate(points_and_losses)}

    def grid(momenta):
        return (Knob("lr", (0.01, 0.02, 0.04), 0.02), Knob("optim.momentum", momenta, 0.95))

    narrow, wide = grid((0.8, 0.9, 0.95)), grid((0.6, 0.8, 0.9, 0.95))
    history, order = search(narrow, objective, suite.tuning_budget)
    records = records_of(narrow, [(p, history[p]) for p in order])
    assert tuning_history(suite, "muon", narrow, records) == (history, order)  # the same path, replayed

    replayed, path = tuning_history(suite, "muon", wide, records)
    shared = len(path)
    assert 0 < shared < len(order)  # the prefix both grids share; then the first new probe has no record
    assert [values_at(wide, p) for p in path] == [values_at(narrow, p) for p in order[:shared]]
    assert next_probe(wide, replayed, path, suite.tuning_budget, suite.tol) is not None
    assert values_at(wide, next_probe(wide, replayed, path, suite.tuning_budget, suite.tol))["optim.momentum"] == 0.6
    assert off_path_tuning_runs(suite, "muon", wide, records) == len(order) - shared

    new_history, new_order = search(wide, objective, suite.tuning_budget)
    records |= records_of(wide, [(p, new_history[p]) for p in new_order[shared:]], first_probe=len(order))
    assert tuning_history(suite, "muon", wide, records) == (new_history, new_order)
    assert values_at(wide, incumbent(new_history, new_order, 0.0)) == {"lr": 0.02, "optim.momentum": 0.6}


def test_a_speedup_known_only_as_a_bound_on_every_seed_says_so():
    from lmopt.bench.report import _speedup_text
    from lmopt.bench.results import Comparison

    every = Comparison("muon", "adamw", diff=None, speedups={0: 4.0, 1: 4.0}, bounds={0: ">", 1: ">"},
                       speedup=(4.0, 4.0, 4.0, 2))
    assert _speedup_text(every) == "≥ 4.00x (n=2; every seed a bound)"
    some = Comparison("muon", "adamw", diff=None, speedups={0: 4.0, 1: 3.0}, bounds={0: ">"},
                      speedup=(3.46, 1.0, 12.0, 2))
    assert _speedup_text(some) == "3.46x [1.00, 12.00] (n=2; 1 bound)"
    below = Comparison("adamw", "muon", diff=None, speedups={0: 0.25}, bounds={0: "<"}, speedup=(0.25, 0.25, 0.25, 1))
    assert _speedup_text(below).startswith("≤ 0.25x")


def test_a_grid_end_check_is_superseded_once_the_grid_holds_its_value():
    from types import SimpleNamespace

    from lmopt.bench.variants import Variant, _inside_grid

    check = Variant("edge-muon-momentum-0.6", "muon", (("optim.momentum", 0.6),), purpose="grid-end")
    narrow = SimpleNamespace(knobs=(Knob("optim.momentum", (0.8, 0.9), 0.9),))
    wide = SimpleNamespace(knobs=(Knob("optim.momentum", (0.6, 0.8, 0.9), 0.9),))
    assert not _inside_grid(check, narrow) and _inside_grid(check, wide)
    assert not _inside_grid(Variant("v", "muon", (("optim.momentum", 0.6),)), wide)  # only grid-end checks


def test_results_files_quote_the_command_so_it_can_be_pasted_back(monkeypatch):
    import shlex

    from lmopt.cli import invoked_command

    argv = ["lmopt", "bench", "step", "--only", "lamb (fused)", "adamw", "--threads", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    command = invoked_command()
    assert "'lamb (fused)'" in command
    assert shlex.split(command) == argv


def test_interleaved_medians_runs_each_candidate_once_untimed_then_in_turns():
    from lmopt.bench.step import interleaved_medians

    calls: list[str] = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def test_a_probe_file_names_its_command_commit_and_machine_then_its_body(tmp_path, monkeypatch):
    from lmopt.bench.step import probe_arguments, write_probe

    argv = ["--repeats", "3", "--out", str(tmp_path / "probe.md")]
    args = probe_arguments("A probe.\n\nMore.", "unused.md", 9, argv)
    assert (args.repeats, args.threads) == (3, 2)
    out = write_probe("scripts/some_probe.py", argv, args, "Title", ["## Body", "| a | 1 |"])
    text = out.read_text()
    assert text.startswith("# Title\n\nMade by `python scripts/some_probe.py --repeats 3 --out ")
    assert "Medians of 3 interleaved repeats" in text and text.endswith("## Body\n| a | 1 |\n")
