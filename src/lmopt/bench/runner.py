"""``lmopt bench run``: a suite's protocol as ordinary ``lmopt train`` processes, resumable at any point.

For each optimizer, one pipeline:

1. tuning on the suite's tuning seed: the next probe of the coordinate search (:mod:`lmopt.bench.tuning`),
   computed from the records so far, until ``tuning_budget`` runs are done (one after the other: each probe
   depends on the results before it);
2. the chosen configuration on every held-out seed, at every budget of :meth:`Suite.budgets` (independent runs).

``--jobs N`` runs N at once (:class:`Slots`): each pipeline holds one slot from its first run to its last, in the
suite's order, so optimizers finish in order; a pipeline in its held-out phase also borrows any slot no other
pipeline is waiting for, so the suite's last optimizer (or a variant's seeds) does not leave cores idle.

Each run has a deterministic id (``<optimizer>-lr<lr>-s<seed>-t<steps>-<hash of its knob values>``), trains in
``$LMOPT_RUNS/bench/<suite>/<id>/`` and, once complete, leaves a compact record in
``results/<suite>/runs/<id>.jsonl`` (its resolved config and knob values, every ``eval`` record, its ``end``
summary). The records are what the report reads and what is committed; a run whose record exists is skipped,
and an interrupted run resumes from its last checkpoint. For a given seed, every optimizer starts from the same
initial weights and sees the same batches (both come from the seed).

Only one ``lmopt bench run`` may work on a results folder at a time (a lock); SIGINT/SIGTERM are forwarded to
the running ``lmopt train`` processes, which are waited for.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from lmopt.bench.results import (
    beats_baseline,
    final_loss,
    knobs_for,
    load_records,
    results_dir,
    tuning_history,
)
from lmopt.bench.suites import Suite, tuning_space
from lmopt.bench.tuning import Knob, incumbent, next_probe, start_point, values_at
from lmopt.data.paths import atomic_write_text, runs_home
from lmopt.optim.spec import OptionError
from lmopt.registry import OPTIMIZERS, SUITES
from lmopt.train.config import TrainConfig
from lmopt.train.errors import ConfigError
from lmopt.train.metrics import read_metrics
from lmopt.train.rundir import RunLock
from lmopt.train.trainer import format_duration


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    values: tuple[tuple[str, float | str], ...]  # knob values, sorted by key
    seed: int
    steps: int
    probe: int | None = None  # position in the tuning search (tuning runs only)

    @property
    def run_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.values).encode()).hexdigest()[:8]
        lr = dict(self.values).get("lr", 0.0)
        return f"{self.optimizer}-lr{lr:.3g}-s{self.seed}-t{self.steps}-{digest}"


def spec(optimizer: str, values: dict, seed: int, steps: int, probe: int | None = None) -> RunSpec:
    return RunSpec(optimizer, tuple(sorted(values.items())), seed, steps, probe)


def check_search_space(suite: Suite, optimizer: str) -> None:
    """Every value of every knob of ``optimizer``'s tuning grid must make a valid ``lmopt train`` config: a bad
    grid value fails here, before any run starts, not hours into the suite."""
    knobs = tuning_space(optimizer)
    start = values_at(knobs, start_point(knobs))
    for knob in knobs:
        for value in knob.values:
            config = suite.train_config(optimizer, start | {knob.key: value}, 0, suite.steps, "check", curve=False)
            try:
                TrainConfig.from_dict(config).validate()
            except (ConfigError, OptionError) as err:
                raise ConfigError(f"suite {suite.name!r}: {optimizer}'s tuning grid value {knob.key}={value!r} "
                                  f"is not a valid setting: {err}") from err


def rung_optimizers(suite: Suite, root: Path | None = None) -> list[str]:
    """A ladder rung's optimizers: the suite's own, plus those that beat AdamW significantly on the first rung."""
    names = list(suite.optimizers)
    if suite.transfer_from is not None:
        names += [name for name in beats_baseline(suite.transfer_from, root) if name not in names]
    return names


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out (``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_groups(suite: Suite, jobs: int) -> queue.Queue | None:
    """For a GPU suite, ``jobs`` disjoint groups of ``suite.gpus_per_job`` GPUs, one per concurrent run."""
    if suite.device != "cuda":
        return None
    gpus = visible_gpus()
    need = jobs * suite.gpus_per_job
    if len(gpus) < need:
        raise ValueError(f"--jobs {jobs} x {suite.gpus_per_job} GPU(s) per job needs {need} GPUs; "
                         f"{len(gpus)} visible ({', '.join(gpus) or 'none'})")
    groups: queue.Queue = queue.Queue()
    for j in range(jobs):
        groups.put(gpus[j * suite.gpus_per_job:(j + 1) * suite.gpus_per_job])
    return groups


class Slots:
    """At most ``n`` runs at once; a freed slot goes to the waiting request of lowest ``priority`` (the suite's
    order), first come first served among equals."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket), sorted
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, priority: int, give_up: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """Wait for a slot (yields True while holding it), or yield False once ``give_up()`` turns true (checked
        whenever :meth:`wake` is called or a slot frees)."""
        with self._cond:
            request = (priority, next(self._tickets))
            bisect.insort(self._waiting, request)
            self._cond.wait_for(lambda: give_up() or (self._free > 0 and self._waiting[0] == request))
            self._waiting.remove(request)
            granted = self._free > 0 and not give_up()
            self._free -= granted
            self._cond.notify_all()  # the next request in line may be served too
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._free += 1
                    self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class BenchRunner:
    def __init__(self, suite: Suite, jobs: int = 1, only: list[str] | None = None, results_root: Path | None = None,
                 log: Callable[[str], None] = print, extra: list[str] | None = None) -> None:
        self.suite, self.jobs, self.log = suite, jobs, log
        self.root = results_root
        for name in extra or []:
            OPTIMIZERS.get(name)  # a user's optimizer must load here, before any run starts
        candidates = rung_optimizers(suite, results_root) + [n for n in extra or [] if n not in suite.optimizers]
        self.optimizers = [o for o in candidates if not only or any(fnmatch(o, pat) for pat in only)]
        if only and not self.optimizers:
            raise ValueError(f"--only {only} matches none of the suite's optimizers: {', '.join(candidates)}")
        for name in self.optimizers:
            check_search_space(suite, name)
        self.results = results_dir(suite.name, results_root)
        self.run_seconds: list[float] = []
        self.runs_done = 0
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._stopping = False
        self._devices = device_groups(suite, jobs)
        self._slots = Slots(jobs)

    def records(self) -> dict[str, dict]:
        return load_records(self.suite.name, self.root)

    def is_done(self, run: RunSpec) -> bool:
        return (self.results / "runs" / f"{run.run_id}.jsonl").exists()

    # --- the pipeline of one optimizer -----------------------------------------------------------------------

    def next_tuning_run(self, optimizer: str, knobs: tuple[Knob, ...]) -> RunSpec | None:
        history, order = tuning_history(self.suite, optimizer, knobs, self.records())
        probe = next_probe(knobs, history, order, self.suite.tuning_budget, self.suite.tol)
        if probe is None:
            return None
        return spec(optimizer, values_at(knobs, probe), self.suite.tuning_seed, self.suite.steps, len(order))

    def held_out_runs(self, optimizer: str, knobs: tuple[Knob, ...]) -> list[RunSpec]:
        history, order = tuning_history(self.suite, optimizer, knobs, self.records())
        values = values_at(knobs, incumbent(history, order, self.suite.tol))
        return [spec(optimizer, values, seed, steps) for seed in self.suite.seeds for steps in self.suite.budgets()]

    def pipeline(self, optimizer: str) -> None:
        """Tuning, then the held-out runs; called holding a slot (see :meth:`run`)."""
        knobs = knobs_for(self.suite, optimizer, self.root)
        while not self._stopping and (run := self.next_tuning_run(optimizer, knobs)) is not None:
            self._run_one(run, phase=f"tune {run.probe + 1}/{self.suite.tuning_budget}")
        if self._stopping:  # the tuning may be unfinished (or not started): no configuration to run yet
            return
        self.run_independent(self.held_out_runs(optimizer, knobs), "held-out", self.optimizers.index(optimizer))

    def run_independent(self, runs: list[RunSpec], phase: str, priority: int) -> None:
        """``runs`` in any order: by this thread, in its slot, and by helpers in slots no one else waits for."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for run in runs:
            if not self.is_done(run):
                todo.put(run)

        def drain() -> None:
            while not self._stopping:
                try:
                    run = todo.get_nowait()
                except queue.Empty:
                    return
                self._run_one(run, phase)

        def helper() -> None:
            with self._slots.hold(priority, give_up=lambda: todo.empty() or self._stopping) as granted:
                if granted:
                    drain()

        helpers = min(self.jobs, todo.qsize()) - 1
        if helpers <= 0:
            return drain()
        with ThreadPoolExecutor(max_workers=helpers) as pool:
            futures = [pool.submit(helper) for _ in range(helpers)]
            try:
                drain()
            finally:
                self._slots.wake()  # helpers still waiting for a slot give up: nothing is left
            for future in futures:
                future.result()

    def _pipeline_in_slot(self, optimizer: str) -> None:
        with self._slots.hold(self.optimizers.index(optimizer)):
            if not self._stopping:
                self.pipeline(optimizer)

    # --- running ------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Every optimizer's pipeline, holding the results folder's lock; SIGINT/SIGTERM stop the running jobs."""
        lock = RunLock(self.results, what="benchmark results folder")
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = ({sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                    if in_main_thread else {})
        start = time.time()
        try:
            self.log(f"[bench {self.suite.name}] {len(self.optimizers)} optimizers, {self.jobs} job(s): "
                     f"{', '.join(self.optimizers)}")
            with ThreadPoolExecutor(max_workers=len(self.optimizers)) as pool:
                for future in [pool.submit(self._pipeline_in_slot, name) for name in self.optimizers]:
                    future.result()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()
        if self._stopping:
            raise KeyboardInterrupt(f"bench {self.suite.name} stopped by a signal; run it again to continue")
        self.log(f"[bench {self.suite.name}] complete in {format_duration(time.time() - start)}; "
                 f"records in {self.results / 'runs'}")

    def _on_signal(self, signum: int, _frame) -> None:
        """Forward the signal to every running `lmopt train` and let the pipelines wind down (no new runs)."""
        self._stopping = True
        self._slots.wake()
        with self._lock:
            children = list(self._children)
        self.log(f"[bench {self.suite.name}] {signal.Signals(signum).name}: stopping {len(children)} running job(s)")
        for child in children:
            child.send_signal(signum)

    def _run_one(self, run: RunSpec, phase: str) -> None:
        if self._stopping or self.is_done(run):
            return
        name = f"bench/{self.suite.name}/{run.run_id}"
        run_dir = runs_home() / name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # the runner's own files sit beside the run folder, which belongs to `lmopt train` alone
        config_path = run_dir.with_name(f"{run.run_id}.config.json")
        log_path = run_dir.with_name(f"{run.run_id}.log")
        curve = run.probe is None and run.steps == self.suite.steps
        config = self.suite.train_config(run.optimizer, dict(run.values), run.seed, run.steps, name, curve)
        atomic_write_text(config_path, json.dumps(config))
        started = time.time()
        env = os.environ | {"OMP_NUM_THREADS": str(self.suite.threads_per_job or os.cpu_count())}
        devices = self._devices.get() if self._devices is not None else None
        command = [sys.executable, "-m", "lmopt.cli", "train", "--config", str(config_path), "--resume-or-start"]
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            if len(devices) > 1:  # one FSDP job over this group of GPUs
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={len(devices)}", "-m", *command[2:]]
        try:
            with open(log_path, "a") as log_file:
                proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                with self._lock:
                    self._children.add(proc)
                try:
                    returncode = proc.wait()
                finally:
                    with self._lock:
                        self._children.discard(proc)
        finally:
            if devices is not None:
                self._devices.put(devices)
        if self._stopping:
            return
        if returncode not in (0, 3):  # 3: the run diverged, which is a result, not a failure
            raise RuntimeError(f"run {run.run_id} failed (exit {returncode}); see {log_path}")
        self._store_record(run, run_dir, diverged=returncode == 3)
        with self._lock:
            self.run_seconds.append(time.time() - started)
            self.runs_done += 1
            mean = sum(self.run_seconds) / len(self.run_seconds)
            self.log(f"[bench {self.suite.name}] {run.optimizer} {phase}: {run.run_id} "
                     f"final val loss {final_loss(self.records()[run.run_id]):.4f} | {self.runs_done} runs this "
                     f"session, {format_duration(mean)} per run")

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
        head = {"event": "config", "config": config["config"], "resolved": config["resolved"],
                "environment": config["environment"], "knobs": dict(run.values), "probe": run.probe}
        atomic_write_text(self.results / "runs" / f"{run.run_id}.jsonl",
                          "".join(json.dumps(line) + "\n" for line in [head, *evals, end]))


def run_suite(name: str, jobs: int = 1, only: list[str] | None = None, log: Callable[[str], None] = print,
              extra: list[str] | None = None) -> None:
    BenchRunner(SUITES.get(name), jobs=jobs, only=only, log=log, extra=extra).run()
