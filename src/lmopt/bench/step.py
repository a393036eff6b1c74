"""``lmopt bench step``: what an optimizer costs, as ratios to the fastest torch AdamW measured in the same run.

Three measurements, each written to ``results/step/<device>-<preset>.md`` and ``.json``:

1. **Optimizer step** on a preset's real parameter shapes (default ``qwen3-134m``): gradients are random
   (fixed seed) and present; every optimizer first takes ``warmup`` steps (state created, caches filled,
   ``torch.compile`` done), then its repeats alternate with the baseline's (base, A, base, A, ...) so that
   machine noise hits both alike, and its ratio is taken to the baseline's median in the same set (holding
   every optimizer's state at once would not fit in memory at 134M); medians are reported with the state
   bytes. Baseline: torch AdamW ``fused=True``; the foreach and for-loop AdamW, the compiled path of every
   per-tensor optimizer, Spectra's refresh intervals and per-matrix path, and ``torch.optim.Muon`` against
   lmopt's Muon (in one set) on the same hidden matrices are beside it.
2. **Training step** (forward + backward + clip + step) of every optimizer on a smaller preset and real text,
   interleaved the same way, as ratios to AdamW's.
3. **``lmopt train`` against a bare loop**: the trainer (metrics JSONL, progress, the lr schedule, loss and
   grad-norm reads) against the plainest loop over the same model, data, optimizer and schedule, in rounds whose
   steps alternate (one trainer step, one bare step, ...); warm-up steps and the trainer's final
   evaluation and checkpoint, which the bare loop does not have, are left out, and the ratio is the median of
   the rounds' median paired ratios, with their range.

Timings are wall-clock medians in one process with ``threads`` pinned; they belong in results files, never in
tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmopt.data.paths import atomic_write_text, temporary_runs_home
from lmopt.model import Qwen3, build_model, get_preset
from lmopt.optim import Muon, Spectra, build, matrix_param_groups
from lmopt.optim.spectra import householder_basis
from lmopt.registry import OPTIMIZERS

BASELINE = "adamw (fused)"
SPECTRA_REFRESH = 10  # the refresh interval measured beside Spectra's default
CPU = torch.device("cpu")


LAMB_PREVIOUS = "lamb (fused, trust from the previous step)"  # LAMB's one-pass option
LAMB_REUSE = "lamb (fused, direction in the gradient)"  # the paper's timing with reuse_grad=True
SPECTRA_HOUSEHOLDER = "spectra (householder qr)"  # a GPU row: the stacked step's QR before CholeskyQR3
MUON_GRAM = "muon (gram)"  # a GPU row: the bf16 Gram segments, which "auto" does not take there yet


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def optimizer_variants(compiled: bool = True) -> dict[str, tuple[str, dict]]:
    """Name shown -> (registered optimizer, options): every optimizer at its defaults, plus the variants."""
    out: dict[str, tuple[str, dict]] = {BASELINE: ("adamw", {"impl": "fused"})}
    for name in OPTIMIZERS.names():
        if name != "adamw":
            out[name] = (name, {})
        if compiled and "compiled" in OPTIMIZERS.get(name).impls:
            out[f"{name} (compiled)"] = (name, {"impl": "compiled"})
        if name != "adamw" and "foreach" in OPTIMIZERS.get(name).impls[1:]:  # multi-tensor, not the default
            out[f"{name} (foreach)"] = (name, {"impl": "foreach"})
    out["spectra (for-loop)"] = ("spectra", {"impl": "for-loop"})
    out[f"spectra (refresh every {SPECTRA_REFRESH})"] = ("spectra", {"refresh_interval": SPECTRA_REFRESH})
    out["spectra (refresh after the step)"] = ("spectra", {"refresh_timing": "after"})
    out["spectra (fused)"] = ("spectra", {"impl": "fused"})
    out[f"spectra (fused, refresh every {SPECTRA_REFRESH})"] = ("spectra", {"impl": "fused",
                                                                        "refresh_interval": SPECTRA_REFRESH})
    out["spectra (fused, refresh after the step)"] = ("spectra", {"impl": "fused", "refresh_timing": "after"})
    out["adafactor (fused)"] = ("adafactor", {"impl": "fused"})
    out["muon (fused)"] = ("muon", {"impl": "fused"})
    out["lamb (fused)"] = ("lamb", {"impl": "fused"})
    out[LAMB_PREVIOUS] = ("lamb", {"impl": "fused", "trust_from": "previous"})
    out[LAMB_REUSE] = ("lamb", {"impl": "fused", "reuse_grad": True})
    out["stable-adamw (fused)"] = ("stable-adamw", {"impl": "fused"})
    out["msam (fused)"] = ("msam", {"impl": "fused"})
    out["msam (fused, γ from this step)"] = ("msam", {"impl": "fused", "gamma_from": "current"})
    out["ortho-adam (kronecker)"] = ("ortho-adam", {"rotation": "kronecker"})
    if compiled:
        out["ortho-adam (kronecker, compiled)"] = ("ortho-adam", {"rotation": "kronecker", "impl": "compiled"})
        out["ortho-adam (fp32 rotations, compiled)"] = ("ortho-adam", {"rotation_dtype": "param",
                                                                       "impl": "compiled"})
    return out


def _step_candidates(model: torch.nn.Module, compiled: bool,
                     muon_layers: int = 0) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        shown: (lambda name=name, opts=opts: build(name, model, total_steps=1000, **opts))
        for shown, (name, opts) in optimizer_variants(compiled).items()
    }
    out["adamw (foreach)"] = lambda: build("adamw", model, impl="foreach")
    out["adamw (for-loop)"] = lambda: build("adamw", model, impl="for-loop")
    out["adafactor (for-loop)"] = lambda: build("adafactor", model, impl="for-loop")
    matrices = [p for g in matrix_param_groups(model, 0.1) if g["matrix"] for p in g["params"]]
    if muon_layers:  # the first layers' hidden matrices only (every layer has the same shapes)
        kept = {id(p) for layer in list(model.layers)[:muon_layers] for p in layer.parameters()}
        matrices = [p for p in matrices if id(p) in kept]
    out["torch.optim.Muon (matrices only)"] = lambda: torch.optim.Muon(matrices, lr=1e-3)
    out["lmopt muon (matrices only)"] = lambda: Muon(matrices, lr=1e-3, adjust_lr="original")
    out[SPECTRA_MATRICES[0]] = lambda: Spectra(matrices)
    out["muon (standard Newton–Schulz)"] = lambda: build("muon", model, ns_method="standard")
    if next(model.parameters()).is_cuda:  # the stacked step's QR runs on a GPU only
        out[SPECTRA_HOUSEHOLDER] = lambda: householder_refresh(build("spectra", model, total_steps=1000))
        out[MUON_GRAM] = lambda: build("muon", model, ns_method="gram")  # bf16 Gram segments ("auto": standard)
    else:  # the C++ kernels are the CPU's
        out[SPECTRA_MATRICES[1]] = lambda: Spectra(matrices, impl="fused")
        out[LMOPT_MUON_FUSED] = lambda: Muon(matrices, lr=1e-3, adjust_lr="original", impl="fused")
    return out


def householder_refresh(opt: Spectra) -> Spectra:
    """Spectra whose stacked GPU step refreshes its basis by torch.linalg.qr, the QR it used before CholeskyQR3."""
    opt.refine = householder_basis
    return opt


MUON_PAIR = ("torch.optim.Muon (matrices only)", "lmopt muon (matrices only)")
LMOPT_MUON_FUSED = "lmopt muon (fused, matrices only)"  # a CPU row: impl="fused", in the Muon pair's set
SPECTRA_MATRICES = ("spectra (matrices only)", "spectra (fused, matrices only)")  # on the Muon pair's matrices


def _interleaving_sets(names: list[str]) -> list[list[str]]:
    """Each candidate alone with the baseline, except the optimizers timed on the same matrices only (torch's and
    lmopt's Muon, Spectra), which are compared directly in one set, and Spectra beside its Householder-QR row
    (a GPU's launch-bound rows move too much between sets to compare them across)."""
    together = [[n for n in (*MUON_PAIR, LMOPT_MUON_FUSED, *SPECTRA_MATRICES) if n in names]]
    if SPECTRA_HOUSEHOLDER in names:
        together.append([n for n in ("spectra", SPECTRA_HOUSEHOLDER) if n in names])
    grouped = {n for members in together for n in members}
    return [[n] for n in names if n not in grouped] + [members for members in together if members]


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers the kernels a step launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm(name: str, make: Callable[[], torch.optim.Optimizer], warmup: int, log,
          device: torch.device = CPU) -> torch.optim.Optimizer:
    start = time.perf_counter()
    opt = make()
    for _ in range(warmup):
        opt.step()
    _synchronize(device)
    log(f"warmed up {name} ({time.perf_counter() - start:.1f} s)")
    return opt


def _interleaved_times(steps: dict[str, Callable[[], None]], repeats: int,
                       device: torch.device = CPU) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int,
                        device: torch.device = CPU) -> dict[str, float]:
    """Each callable run once untimed, then ``repeats`` rounds of all of them in turn: the median of each, in ms
    (the probes in scripts/ time their candidates this way)."""
    for step in steps.values():
        step()
    return {name: statistics.median(t) * 1e3 for name, t in _interleaved_times(steps, repeats, device).items()}


def probe_arguments(doc: str, out: str, repeats: int, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of a probe in scripts/ (--repeats, --threads, --out), with torch's threads set."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_probe(script: str, argv: list[str] | None, args: argparse.Namespace, title: str, body: list[str]) -> Path:
    """A probe's markdown file: ``title``, the command as typed, the commit, CPU, torch and threads, then ``body``;
    written atomically to ``args.out`` and printed."""
    from lmopt.train.trainer import cpu_description, git_commit

    command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# {title}", "",
             f"Made by `{command}` at commit `{git_commit()}`; {cpu_description()}, torch {torch.__version__}, "
             f"{args.threads} threads. Medians of {args.repeats} interleaved repeats; a shared VM, so read the second "
             "digit loosely.", "", *body]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def paired_ratio_spread(times: list[float], base_times: list[float]) -> dict:
    """The ratio of each repeat to the baseline step timed next to it: its median, min and max. Machine noise
    that lasts longer than a step hits both sides of a pair, so the spread of paired ratios shows how far a
    ratio can be trusted on this machine (a wide one: re-run with more repeats on a quieter machine)."""
    ratios = sorted(t / b for t, b in zip(times, base_times, strict=True))
    return {"ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def _machine(threads: int, device: torch.device = CPU) -> dict:
    from lmopt.optim.kernels import fast_matmul_dtype
    from lmopt.train.trainer import cpu_description

    gpu = ({"device": "cuda", "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
           if device.type == "cuda" else {})
    return {"threads": threads, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_description(),
            "muon_ns_dtype": str(fast_matmul_dtype(device)).removeprefix("torch."), **gpu}


def profile_table(step: Callable[[], None], top: int = 8, device: torch.device = CPU) -> list[dict]:
    """Where one call of ``step`` spends its time: the ``top`` operators by self time (torch.profiler), CPU time
    on a CPU and, on a GPU, the kernels' GPU time (operators launch them and would count their time twice)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        step()
        _synchronize(device)
    attribute = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = prof.key_averages()
    if gpu:  # the kernels only: an operator and the ranges around it carry its kernels' time again
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    events = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attribute) / 1e3,
             "share": getattr(e, attribute) / total} for e in events[:top]]


def run_step_benchmark(preset: str = "qwen3-134m", repeats: int = 5, warmup: int = 2,
                       only: list[str] | None = None, compiled: bool = True, profile: list[str] | None = None,
                       log=print, muon_layers: int = 0, device: str = "cpu",
                       compared_repeats: int | None = None) -> dict:
    """Optimizer step time and state memory of every candidate on ``preset``'s parameter shapes.

    ``compared_repeats`` (default 4 x ``repeats``): the repeats of the sets whose rows are compared with each
    other directly (torch's and lmopt's Muon and Spectra on the same matrices; on a GPU Spectra and its
    Householder-QR row): their ratio is a target of its own, and 7 repeats of the Muon pair moved it from 1.26x
    (the median of five runs of 31) to 1.76x in one table.

    ``device`` "cuda": parameters, gradients and state on the GPU (fp32, as the trainer keeps them), and every
    timed step waits for the GPU before and after, so its time covers the kernels it launched.

    ``muon_layers`` > 0 times torch's and lmopt's Muon (the "matrices only" pair) on the hidden matrices of the
    first ``muon_layers`` layers instead of all: on a CPU without bf16 instructions, torch.optim.Muon's bf16
    Newton–Schulz takes minutes per qwen3-134m step. Every layer has the same shapes and torch's Muon works
    matrix by matrix, so its whole-model time is this one's x layers / muon_layers (the summary says so where it
    uses it)."""
    if repeats < 1 or (compared_repeats is not None and compared_repeats < 1):
        raise ValueError(f"repeats ({repeats}) and compared_repeats ({compared_repeats}) must be at least 1")
    dev = torch.device(device)
    torch.manual_seed(0)
    model = Qwen3(get_preset(preset).config)
    model.init_weights(0)
    model.to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    # every set starts from these gradients: a row may write over them (LAMB's reuse_grad)
    gradients = [p.grad.clone() for p in model.parameters()]
    candidates = _step_candidates(model, compiled, muon_layers)
    unknown = [name for name in only or [] if name not in candidates]
    if unknown:  # before any timing: a misspelt row would otherwise be silently missing from the table
        raise ValueError(f"No step row named {', '.join(map(repr, unknown))} on {dev.type} (compiled rows need "
                         f"compilation on); the rows here: {', '.join(candidates)}")
    baseline = _warm(BASELINE, candidates.pop(BASELINE), warmup, log, dev)
    candidates = {k: v for k, v in candidates.items() if not only or k in only}
    n_params = sum(p.numel() for p in model.parameters())
    base_state = state_bytes(baseline)
    base_times: list[float] = []
    rows, profiles = {}, {}
    compared = compared_repeats or 4 * repeats
    for members in _interleaving_sets(list(candidates)):
        # One set at a time (all of them at once would not fit in memory on qwen3-134m), interleaved with the
        # baseline, whose median in the same set is the ratio's denominator.
        optimizers = {name: _warm(name, candidates[name], warmup, log, dev) for name in members}
        times = _interleaved_times({BASELINE: baseline.step} | {n: o.step for n, o in optimizers.items()},
                                   compared if len(members) > 1 else repeats, dev)
        base_times += times[BASELINE]
        for name, opt in optimizers.items():
            t, s = statistics.median(times[name]), state_bytes(opt)
            base = statistics.median(times[BASELINE])
            rows[name] = {"step_seconds": t, "time_vs_fused_adamw": t / base, "baseline_seconds_in_set": base,
                          **paired_ratio_spread(times[name], times[BASELINE]),
                          "state_bytes": s, "state_bytes_per_param": s / n_params, "state_vs_adamw": s / base_state}
            if name in (profile or []):
                profiles[name] = profile_table(opt.step, device=dev)
        del optimizers
        for p, g in zip(model.parameters(), gradients, strict=True):
            p.grad.copy_(g)
    rows[BASELINE] = {"step_seconds": statistics.median(base_times), "time_vs_fused_adamw": 1.0,
                      "state_bytes": base_state, "state_bytes_per_param": base_state / n_params, "state_vs_adamw": 1.0}
    if BASELINE in (profile or []):
        profiles[BASELINE] = profile_table(baseline.step, device=dev)
    layers = len(model.layers)
    return {"preset": preset, "params": n_params, "repeats": repeats, "compared_repeats": compared,
            "warmup": warmup, "layers": layers,
            "muon_pair_layers": min(muon_layers, layers) if muon_layers else layers,
            **_machine(torch.get_num_threads(), dev), "results": rows, "profiles": profiles}


def run_train_step_benchmark(preset: str = "tiny", data: str = "brown", seq_len: int = 256,
                             batch_tokens: int = 4096, repeats: int = 7, warmup: int = 2,
                             only: list[str] | None = None, compiled: bool = True, log=print) -> dict:
    """Forward + backward + clip + optimizer step of every optimizer on real text, relative to AdamW's."""
    from lmopt.data.loader import BatchLoader
    from lmopt.train.build import load_data
    from lmopt.train.config import TrainConfig

    config = get_preset(preset).config
    prepared = load_data(TrainConfig(preset=preset, data=data))
    loader = BatchLoader(prepared.train, seq_len, batch_tokens // seq_len, seed=0)
    batches = [loader.next_batch() for _ in range(warmup + repeats)]
    variants = {k: v for k, v in optimizer_variants(compiled).items() if not only or k in only or k == BASELINE}
    runs = {}
    for shown, (name, opts) in variants.items():
        model = build_model(config, seed=0)
        opt = build(name, model, total_steps=1000, **opts)
        runs[shown] = [model, opt, 0]
    times: dict[str, list[float]] = {shown: [] for shown in runs}

    def train_step(shown: str) -> None:
        model, opt, i = runs[shown]
        x, y = batches[i % len(batches)]
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        runs[shown][2] = i + 1

    for shown in runs:
        start = time.perf_counter()
        for _ in range(warmup):
            train_step(shown)
        log(f"warmed up {shown} training ({time.perf_counter() - start:.1f} s)")
    for _ in range(repeats):
        for shown in runs:
            start = time.perf_counter()
            train_step(shown)
            times[shown].append(time.perf_counter() - start)
    base = statistics.median(times[BASELINE])
    rows = {shown: {"step_seconds": statistics.median(t), "time_vs_adamw": statistics.median(t) / base}
            for shown, t in times.items()}
    return {"preset": preset, "data": data, "seq_len": seq_len, "batch_tokens": batch_tokens, "repeats": repeats,
            "warmup": warmup, "results": rows}


def run_trainer_overhead(preset: str = "tiny", optimizer: str = "adamw", steps: int = 40, rounds: int = 3,
                         seq_len: int = 256, batch_tokens: int = 4096, skip: int = 5, log=print) -> dict:
    """``lmopt train``'s steady-state tokens/s over a bare loop's, same model, data, optimizer and schedule.

    The two loops run step by step in turn: a callback at the end of each trainer step runs one step of the bare
    loop (its own model, optimizer, schedule and data), so a drift of the machine hits both alike. The trainer's
    time for a step is the interval from the end of the previous bare step to its own end (everything its loop
    does: metrics record and progress line included); the first ``skip`` + 1 pairs (the first trainer step has
    no interval before it; then allocator warm-up) and the last
    (the trainer's final evaluation and checkpoint, which a bare loop does not have) are left out. A round's ratio
    is the median over its pairs of bare time / trainer time; the reported ratio is the median of the rounds'
    ratios, with their range."""
    from lmopt.train.build import build_run
    from lmopt.train.callbacks import Callback
    from lmopt.train.config import TrainConfig
    from lmopt.train.trainer import Trainer

    if steps < skip + 3:
        raise ValueError(f"steps ({steps}) must be at least skip ({skip}) + 3: no step pair would be timed")
    cfg = TrainConfig(preset=preset, optimizer=optimizer, steps=steps, seq_len=seq_len, batch_tokens=batch_tokens,
                      eval_interval=steps, eval_tokens=seq_len * 4, log_interval=10, ckpt_interval=0, device="cpu",
                      run_name="overhead")

    class BareStepAfterEach(Callback):
        """After each trainer step, one bare-loop step; both times recorded."""

        def __init__(self) -> None:
            parts = build_run(cfg)  # the same parts the trainer builds, without its loop
            self.model, self.opt, self.sched, self.loader = parts.model, parts.optimizer, parts.scheduler, parts.loader
            self.trainer_times: list[float] = []
            self.bare_times: list[float] = []
            self.last_end: float | None = None

        def bare_step(self) -> None:
            x, y = self.loader.next_batch()
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()

        def on_step_end(self, trainer: Trainer) -> None:
            trainer_end = time.perf_counter()
            if self.last_end is not None:
                self.trainer_times.append(trainer_end - self.last_end)
            self.bare_step()
            self.last_end = time.perf_counter()
            self.bare_times.append(self.last_end - trainer_end)

    def paired_round() -> tuple[list[float], list[float]]:
        with temporary_runs_home():
            pairs = BareStepAfterEach()
            Trainer(cfg, overwrite=True, log=lambda _: None, callbacks=[pairs]).run_and_close()
        # trainer_times[i] is step i + 2's; bare_times[i + 1] ran right after it
        timed = range(skip, steps - 2)
        return [pairs.trainer_times[i] for i in timed], [pairs.bare_times[i + 1] for i in timed]

    trainer_times, bare_times, ratios = [], [], []
    for r in range(rounds):
        trainer, bare = paired_round()
        trainer_times += trainer
        bare_times += bare
        ratios.append(statistics.median(b / t for b, t in zip(bare, trainer, strict=True)))
        log(f"round {r + 1}/{rounds}: lmopt train {statistics.median(trainer) * 1e3:.1f} ms/step, bare loop "
            f"{statistics.median(bare) * 1e3:.1f} ms/step, paired ratio {ratios[-1]:.3f}")
    return {"preset": preset, "optimizer": optimizer, "steps": steps, "rounds": rounds, "skip": skip,
            "batch_tokens": batch_tokens, "trainer_tokens_per_s": batch_tokens / statistics.median(trainer_times),
            "bare_tokens_per_s": batch_tokens / statistics.median(bare_times), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def overhead_description(overhead: dict) -> str:
    if "skip" not in overhead:  # files written before per-step intervals: whole runs
        return (f"`{overhead['preset']}`, {overhead['optimizer']}, {overhead['steps']} steps of "
                f"{overhead['batch_tokens']:,} tokens, median of {overhead['rounds']} alternating rounds "
                "(evaluation and checkpoint time excluded from the trainer's).")
    return (f"`{overhead['preset']}`, {overhead['optimizer']}, {overhead['rounds']} rounds of {overhead['steps']} "
            f"steps of {overhead['batch_tokens']:,} tokens, the two loops stepping in turn; the first "
            f"{overhead['skip'] + 1} steps of each loop and the last (the trainer's final evaluation and checkpoint) "
            "left out; tokens/s from the median step time over all rounds; the ratio is the median over the rounds "
            "(min–max) of each round's median paired ratio.")


def overhead_ratio(overhead: dict) -> str:
    if "ratio_min" not in overhead:
        return f"{overhead['ratio']:.3f}"
    return f"{overhead['ratio']:.3f} ({overhead['ratio_min']:.3f}–{overhead['ratio_max']:.3f})"


def device_name(result: dict) -> str:
    """``cpu-<threads>threads``, or ``cuda-<gpu name>`` (e.g. ``cuda-nvidia-h100-80gb-hbm3``)."""
    if result.get("device") == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", result["gpu"].lower()).strip("-")
    return f"cpu-{result['threads']}threads"


def _capability(result: dict) -> str:
    return f" ({result['cpu_capability']})" if result.get("cpu_capability") else ""


def _machine_line(result: dict) -> str:
    cpu = f" ({result['cpu']})" if result.get("cpu") else ""  # files made before the CPU was recorded lack it
    host = (f"torch {result['torch']}, {result['processor']}, {result['cpus']} CPUs{_capability(result)}{cpu}, "
            f"{result['threads']} threads")
    if result.get("device") == "cuda":
        return f"{result['gpu']} (CUDA {result['cuda']}); {host}; each timed step synchronized before and after"
    return host


def write_step_results(result: dict, out_dir: Path, command: str, commit: str) -> Path:
    device = device_name(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device}-{result['preset']}"
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(result | {"command": command, "commit": commit}, indent=2))
    lines = [f"# Optimizer cost: `{result['preset']}` on {device}", "",
             f"Made by `{command}` at commit `{commit}`; {_machine_line(result)}.", "",
             f"## Optimizer step ({result['params']:,} parameters, gradients present)", "",
             f"Median of {result['repeats']} interleaved steps after {result['warmup']} warm-up steps"
             + (f" ({result['compared_repeats']} in the set of rows compared with each other on the same matrices)"
                if "compared_repeats" in result else "") + ". "
             "*vs fused AdamW* is the ratio of the medians; *paired ratios* are each repeat over the baseline step "
             "timed next to it: median (min–max), the spread this machine's noise leaves.", "",
             "| optimizer | step time | vs fused AdamW | paired ratios | fused AdamW in its set | "
             "state bytes / param | state vs AdamW |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(result["results"].items(), key=lambda kv: kv[1]["step_seconds"]):
        base = r.get("baseline_seconds_in_set")
        spread = (f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})" if "ratio_median" in r
                  else "—")
        lines.append(f"| {name} | {r['step_seconds'] * 1e3:.1f} ms | {r['time_vs_fused_adamw']:.2f}x | {spread} | "
                     f"{'—' if base is None else f'{base * 1e3:.1f} ms'} | "
                     f"{r['state_bytes_per_param']:.2f} | {r['state_vs_adamw']:.2f}x |")
    clock = "GPU" if result.get("device") == "cuda" else "CPU"
    for name, table in result.get("profiles", {}).items():
        lines += ["", f"### Where the time goes: `{name}` (one step, torch.profiler, self {clock} time)", "",
                  "| operator | calls | self time | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{row['op']}` | {row['calls']} | {row['self_ms']:.1f} ms | {row['share']:.0%} |" for row in table]
    train = result.get("train_step")
    if train:
        lines += ["", f"## Training step: forward + backward + clip + step, `{train['preset']}` on {train['data']}",
                  "", f"{train['batch_tokens']:,} tokens per step (sequences of {train['seq_len']}); median of "
                  f"{train['repeats']} interleaved steps after {train['warmup']} warm-up steps.", "",
                  "| optimizer | train step | vs AdamW |", "|---|---:|---:|"]
        for name, r in sorted(train["results"].items(), key=lambda kv: kv[1]["step_seconds"]):
            lines.append(f"| {name} | {r['step_seconds'] * 1e3:.1f} ms | {r['time_vs_adamw']:.3f}x |")
    overhead = result.get("trainer_overhead")
    if overhead:
        lines += ["", "## `lmopt train` against a bare loop", "", overhead_description(overhead), "",
                  "| loop | tokens/s |", "|---|---:|",
                  f"| lmopt train | {overhead['trainer_tokens_per_s']:,.0f} |",
                  f"| bare loop | {overhead['bare_tokens_per_s']:,.0f} |",
                  f"| ratio | {overhead_ratio(overhead)} |"]
    pair = [result["results"].get(name) for name in MUON_PAIR]
    if all(pair):
        layers = result.get("muon_pair_layers", result.get("layers"))
        on = "" if layers == result.get("layers") else f" (the first {layers} of {result['layers']} layers')"
        precision = result.get("muon_ns_dtype", "bfloat16")
        on_cpu = result.get("device") != "cuda" and result.get("threads", 1) > 1
        threads = (f", one matrix per thread of {result['threads']} (`lmopt.optim.threads`: each product on one "
                   "thread)" if on_cpu else "")
        torch_threads = ", one matrix after another, each product on every thread" if on_cpu else ""
        fused = result["results"].get(LMOPT_MUON_FUSED)
        also = (f" (`impl=\"fused\"`, the elementwise passes in C++: "
                f"{pair[0]['step_seconds'] / fused['step_seconds']:.2f}x)" if fused else "")
        lines += ["", f"lmopt's Muon against `torch.optim.Muon` on the same matrices{on}, interleaved in one set: "
                  f"{pair[0]['step_seconds'] / pair[1]['step_seconds']:.2f}x as fast{also}. lmopt's Newton–Schulz "
                  f"ran in {precision} (`ns_dtype=\"auto\"` on this machine), in the Gram space for the 2:1 and 4:1 "
                  f"matrices (`ns_method=\"auto\"`){threads}, torch's in bfloat16 on every matrix{torch_threads}. With "
                  "`ns_dtype=\"bfloat16\", ns_method=\"standard\"` the two agree to atol 1e-6 on the parameters "
                  "after 5 steps (tests/optim/test_papers.py); the Gram space is the same iteration, as close to the "
                  "exact one as the standard iteration in the same precision (tests/optim/test_newton_schulz.py), "
                  "and `lmopt bench variant` compares the final losses on held-out seeds "
                  "(results/cpu-full/variants.md)."]
        spectra = [result["results"][name] for name in SPECTRA_MATRICES if name in result["results"]]
        if spectra:
            fastest = min(row["step_seconds"] for row in spectra)
            lines += ["", f"Spectra (its defaults, fastest implementation) on the same matrices, in the same set: "
                      f"{pair[0]['step_seconds'] / fastest:.1f}x as fast as `torch.optim.Muon`."]
    for section in result.get("notes", []):
        lines += ["", section]
    path = out_dir / f"{stem}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
