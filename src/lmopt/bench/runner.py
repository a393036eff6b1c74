"""``lmopt bench run``: every run of a suite as an ordinary ``lmopt train`` process, resumable.

Each run has a deterministic id (``<optimizer>-lr<lr>-s<seed>-t<steps>``), trains in
``$LMOPT_RUNS/bench/<suite>/<id>/`` and, once complete, leaves a compact record in
``results/<suite>/runs/<id>.jsonl`` (its resolved config, every ``eval`` record, its ``end`` summary). The
records are what the report reads and what is committed; a run whose record exists is skipped, and an
interrupted run resumes from its last checkpoint. For a given seed, every optimizer starts from the same
initial weights and sees the same batches (both come from the seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from lmopt.bench.suites import Suite
from lmopt.data.paths import atomic_write_text, runs_home
from lmopt.registry import SUITES
from lmopt.train.metrics import read_metrics
from lmopt.train.rundir import RunLock
from lmopt.train.trainer import format_duration


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    lr: float
    seed: int
    steps: int

    @property
    def run_id(self) -> str:
        return f"{self.optimizer}-lr{self.lr:.3g}-s{self.seed}-t{self.steps}"


def results_dir(suite: str, root: Path | None = None) -> Path:
    return (root or Path("results")) / suite


def load_records(suite: str, root: Path | None = None) -> dict[str, dict]:
    """{run id: {"config", "evals", "end"}} for every completed run of ``suite``."""
    records = {}
    for path in sorted((results_dir(suite, root) / "runs").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        record = {"config": lines[0]["config"], "resolved": lines[0]["resolved"],
                  "environment": lines[0]["environment"], "evals": [r for r in lines if r["event"] == "eval"],
                  "end": next(r for r in lines if r["event"] == "end")}
        records[path.stem] = record
    return records


def best_lr(records: dict[str, dict], optimizer: str, seed: int, steps: int) -> tuple[float, list[float]] | None:
    """(lr with the lowest final validation loss, all lrs tried) for one optimizer, seed and budget."""
    finals = {}
    for record in records.values():
        c = record["config"]
        if (c["optimizer"], c["seed"], c["steps"]) == (optimizer, seed, steps):
            finals[c["lr"]] = record["end"]["final_val_loss"]
    if not finals:
        return None
    lrs = sorted(finals)
    return min(lrs, key=lambda lr: _finite_or_inf(finals[lr])), lrs


def _finite_or_inf(x: float) -> float:
    return x if isinstance(x, float) and x == x else float("inf")


class BenchRunner:
    def __init__(self, suite: Suite, jobs: int = 1, only: list[str] | None = None, results_root: Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.suite, self.jobs, self.log = suite, jobs, log
        self.optimizers = [o for o in suite.optimizers if not only or any(fnmatch(o, pat) for pat in only)]
        if only and not self.optimizers:
            raise ValueError(f"--only {only} matches none of the suite's optimizers: {', '.join(suite.optimizers)}")
        self.results = results_dir(suite.name, results_root)
        self.done_count, self.run_seconds = 0, []
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._stopping = False

    # --- planning -------------------------------------------------------------------------------------------

    def records(self) -> dict[str, dict]:
        return load_records(self.suite.name, self.results.parent)

    def sweep_runs(self) -> list[RunSpec]:
        s = self.suite
        return [RunSpec(o, lr, s.sweep_seed, s.steps) for o in self.optimizers for lr in s.lr_grids[o]]

    def widening_runs(self) -> list[RunSpec]:
        """One more lr beyond each edge where the best lr of the sweep sits (up to max_widen per side)."""
        s, records, out = self.suite, self.records(), []
        for o in self.optimizers:
            found = best_lr(records, o, s.sweep_seed, s.steps)
            if found is None:
                continue
            best, lrs = found
            grid = s.lr_grids[o]
            if best == lrs[0] and sum(lr < min(grid) for lr in lrs) < s.max_widen:
                out.append(RunSpec(o, float(f"{lrs[0] / s.widen_factor:.3g}"), s.sweep_seed, s.steps))
            if best == lrs[-1] and sum(lr > max(grid) for lr in lrs) < s.max_widen:
                out.append(RunSpec(o, float(f"{lrs[-1] * s.widen_factor:.3g}"), s.sweep_seed, s.steps))
        return out

    def final_runs(self) -> list[RunSpec]:
        """Every seed at the best lr at the main budget; the budget seeds at each extra budget."""
        s, records, out = self.suite, self.records(), []
        budget_seeds = s.seeds if s.budget_seeds is None else s.budget_seeds
        for o in self.optimizers:
            found = best_lr(records, o, s.sweep_seed, s.steps)
            if found is None:
                continue
            out.extend(RunSpec(o, found[0], seed, s.steps) for seed in s.seeds)
            for steps in s.extra_steps:
                out.extend(RunSpec(o, found[0], seed, steps) for seed in budget_seeds)
        return out

    # --- running --------------------------------------------------------------------------------------------

    def is_done(self, run: RunSpec) -> bool:
        return (self.results / "runs" / f"{run.run_id}.jsonl").exists()

    def run(self) -> None:
        """Every phase, holding the results folder's lock; SIGINT/SIGTERM stop the running jobs, then return."""
        lock = RunLock(self.results, what="benchmark results folder")
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = ({sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                    if in_main_thread else {})
        try:
            self._run_phases()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()
        if self._stopping:
            raise KeyboardInterrupt(f"bench {self.suite.name} stopped by a signal; run it again to continue")

    def _on_signal(self, signum: int, _frame) -> None:
        """Forward the signal to every running `lmopt train` and let the phases wind down (no new runs)."""
        self._stopping = True
        with self._lock:
            children = list(self._children)
        self.log(f"[bench {self.suite.name}] {signal.Signals(signum).name}: stopping {len(children)} running job(s)")
        for child in children:
            child.send_signal(signum)

    def _run_phases(self) -> None:
        start = time.time()
        self._run_all("sweep", self.sweep_runs())
        for _ in range(self.suite.max_widen):
            widen = [r for r in self.widening_runs() if not self.is_done(r)]
            if not widen:
                break
            self._run_all("widen", widen)
        self._run_all("seeds and budgets", self.final_runs())
        if self._stopping:
            return
        self.log(f"[bench {self.suite.name}] complete in {format_duration(time.time() - start)}; "
                 f"records in {self.results / 'runs'}")

    def _run_all(self, phase: str, runs: Iterable[RunSpec]) -> None:
        todo = [r for r in dict.fromkeys(runs) if not self.is_done(r)]
        if not todo:
            return
        self.log(f"[bench {self.suite.name}] phase {phase}: {len(todo)} runs to do")
        self._phase_total, self._phase_done = len(todo), 0
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in [pool.submit(self._run_one, run) for run in todo]:
                future.result()

    def _run_one(self, run: RunSpec) -> None:
        if self._stopping:
            return
        name = f"bench/{self.suite.name}/{run.run_id}"
        run_dir = runs_home() / name
        # the runner's own files sit beside the run folder, which belongs to `lmopt train` alone
        config_path = run_dir.with_name(f"{run.run_id}.config.json")
        log_path = run_dir.with_name(f"{run.run_id}.log")
        atomic_write_text(config_path, json.dumps(self.suite.train_config(run.optimizer, run.lr, run.seed,
                                                                          run.steps, name)))
        started = time.time()
        env = os.environ | {"OMP_NUM_THREADS": str(self.suite.threads_per_job or os.cpu_count())}
        with open(log_path, "a") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "lmopt.cli", "train", "--config", str(config_path),
                                     "--resume-or-start"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
            with self._lock:
                self._children.add(proc)
            try:
                returncode = proc.wait()
            finally:
                with self._lock:
                    self._children.discard(proc)
        if self._stopping:
            return
        if returncode not in (0, 3):  # 3: the run diverged, which is a result, not a failure
            raise RuntimeError(f"run {run.run_id} failed (exit {returncode}); see {log_path}")
        self._store_record(run, run_dir, diverged=returncode == 3)
        with self._lock:
            self.run_seconds.append(time.time() - started)
            self._phase_done += 1
            left = self._phase_total - self._phase_done
            eta = left * (sum(self.run_seconds) / len(self.run_seconds)) / self.jobs
            self.log(f"[bench {self.suite.name}] {self._phase_done}/{self._phase_total} runs done in this phase "
                     f"| {run.run_id} {self._final(run)} | ETA {format_duration(eta)}")

    def _final(self, run: RunSpec) -> str:
        lines = (self.results / "runs" / f"{run.run_id}.jsonl").read_text().splitlines()
        end = json.loads(lines[-1])
        return f"final val loss {end['final_val_loss']:.4f}"

    def _store_record(self, run: RunSpec, run_dir: Path, diverged: bool) -> None:
        config = json.loads((run_dir / "config.json").read_text())
        metrics = read_metrics(run_dir / "metrics.jsonl")
        evals = [r for r in metrics if r["event"] == "eval"]
        if diverged:
            end = {"event": "end", "diverged": True, "final_val_loss": float("nan"), "steps": run.steps,
                   "tokens": run.steps * self.suite.batch_tokens,
                   "diverged_at": next(r for r in metrics if r["event"] == "diverged")["step"]}
        else:
            end = next(r for r in metrics if r["event"] == "end") | {"diverged": False}
        train = [r for r in metrics if r["event"] == "train"]
        end["median_step_time"] = sorted(r["step_time"] for r in train)[len(train) // 2] if train else None
        lines = [{"event": "config", "config": config["config"], "resolved": config["resolved"],
                  "environment": config["environment"]}, *evals, end]
        atomic_write_text(self.results / "runs" / f"{run.run_id}.jsonl",
                          "".join(json.dumps(line) + "\n" for line in lines))


def run_suite(name: str, jobs: int = 1, only: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    BenchRunner(SUITES.get(name), jobs=jobs, only=only, log=log).run()
