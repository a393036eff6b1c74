"""``lmopt bench overhead``: what an optimizer adds to a whole training step, through ``lmopt train`` itself.

The papers state their optimizers' cost as the end-to-end step overhead over AdamW (Spectra: +0.7% on the 134M
model). This runs the real trainer (the user's settings: preset, data, device, bf16 autocast, torch.compile,
micro-batches) once per optimizer and round, in one process, optimizers alternating within a round (A, B, C, A,
B, C, ...), so that a slow drift of the machine hits all of them alike. Each run's first ``skip`` timed steps
(allocator and autotuning warm-up) and its compilation step are left out; the step time of an optimizer is the
median of its remaining steps over all rounds, and its overhead is that median over the first optimizer's minus
one. The paired spread is the range of the per-round ratios. The optimizer's own part of the step inside the
loop (``optimizer_time`` of the metrics) is reported beside it, so that an overhead can be split into the
optimizer's step and the rest. Timings belong in results files, never in tests.
"""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path

import torch

from lmopt.bench.step import device_name
from lmopt.data.paths import atomic_write_text, temporary_runs_home


def implementation(optimizer: torch.optim.Optimizer) -> str | None:
    """lmopt's ``impl``, or torch's ``fused``/``foreach`` flag (None where the optimizer has neither)."""
    if getattr(optimizer, "impl", None):
        return optimizer.impl
    flags = [flag for flag in ("fused", "foreach") if optimizer.defaults.get(flag)]
    return flags[0] if flags else None


def run_overhead(settings: dict, optimizers: list[str], steps: int = 20, rounds: int = 2, skip: int = 2,
                 options: dict[str, dict] | None = None, log=print) -> dict:
    """Median training-step time of each optimizer under ``settings`` (``TrainConfig`` fields), as a ratio to
    ``optimizers[0]``'s. ``options``: optimizer name -> its ``optim`` options."""
    from lmopt.train.config import TrainConfig
    from lmopt.train.trainer import Trainer

    timed = steps - skip - (1 if settings.get("compile") else 0)  # the compilation step is never timed
    if timed < 1:
        raise ValueError(f"steps ({steps}) must exceed skip ({skip}) and, with compile, the compilation step: "
                         f"no step would be timed")
    times: dict[str, list[list[float]]] = {name: [] for name in optimizers}
    details: dict[str, dict] = {}
    optimizer_times: dict[str, list[float]] = {}
    rates: dict[str, dict] = {}
    peaks: dict[str, list[float | None]] = {}
    with temporary_runs_home():
        for r in range(rounds):
            for name in optimizers:
                cfg = TrainConfig(**(settings | {"optimizer": name, "optim": (options or {}).get(name, {}),
                                                 "steps": steps, "eval_interval": steps, "ckpt_interval": 0,
                                                 "run_name": f"overhead-{name}-{r}"}))
                if settings.get("compile"):
                    # a fresh compilation per run (the on-disk caches keep it short): every run's model is a
                    # new module, and dynamo's recompilation limit would otherwise fall back to eager
                    torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()  # each run's own peak, not the process's
                trainer = Trainer(cfg, overwrite=True, log=lambda _: None)
                summary = trainer.run()
                step_times = trainer._session_step_times[skip:]
                times[name].append(step_times)
                optimizer_times.setdefault(name, []).extend(trainer._session_optimizer_times[skip:])
                at_one_second = trainer._throughput(1.0)  # tokens/s and MFU scale as 1 / step time
                peaks.setdefault(name, []).append(at_one_second.pop("peak_memory_gib", None))
                rates[name] = at_one_second
                device = trainer.device.type  # as the trainer resolved it ("auto": a GPU where there is one)
                details[name] = {"optimizer_class": type(trainer.optimizer).__name__,
                                 "impl": implementation(trainer.optimizer),
                                 "micro_batch": trainer.micro_batch, "grad_accum": trainer.grad_accum,
                                 "final_val_loss": summary["final_val_loss"]}
                log(f"round {r + 1}/{rounds} {name}: median step {statistics.median(step_times) * 1e3:.1f} ms "
                    f"({len(step_times)} steps)")
                trainer.close()
                del trainer
                gc.collect()  # the trainer holds reference cycles: free its model and state before the next
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    base = optimizers[0]
    base_median = statistics.median(t for round_times in times[base] for t in round_times)
    rows = {}
    for name in optimizers:
        median = statistics.median(t for round_times in times[name] for t in round_times)
        paired = [statistics.median(a) / statistics.median(b) for a, b in zip(times[name], times[base], strict=True)]
        rows[name] = {"step_seconds": median, "optimizer_seconds": statistics.median(optimizer_times[name]),
                      "vs_baseline": median / base_median,
                      "overhead": median / base_median - 1, "round_ratio_min": min(paired),
                      "round_ratio_max": max(paired), "round_medians": [statistics.median(t) for t in times[name]],
                      **details[name], **{k: v / median for k, v in rates[name].items()}}
        if None not in peaks[name]:
            rows[name]["peak_memory_gib"] = max(peaks[name])
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"settings": settings, "optimizers": optimizers, "options": options or {}, "steps": steps,
            "rounds": rounds, "skip": skip, "baseline": base, "device": device, "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "results": rows}


def write_overhead_results(result: dict, out_dir: Path, command: str, commit: str) -> Path:
    """``<out_dir>/<device>-<preset>.md`` and ``.json``."""
    settings = result["settings"]
    stem = f"{device_name(result)}-{settings.get('preset', 'tiny')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(result | {"command": command, "commit": commit}, indent=2))
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    machine = (f"{result['gpu']} (CUDA {result['cuda']})" if result["device"] == "cuda"
               else f"CPU, {result['threads']} threads")
    lines = [f"# End-to-end training step: `{settings.get('preset', 'tiny')}` on {machine}", "",
             f"Made by `{command}` at commit `{commit}`; torch {result['torch']}.", "",
             f"`lmopt train` with {shown}; {result['steps']} steps per run, the first {result['skip']} timed steps "
             f"(and the compilation step) left out, {result['rounds']} rounds with the optimizers alternating. "
             f"*overhead* is the median step time over {result['baseline']}'s minus one; *per-round ratios* are "
             "the range of the ratio of the medians within each round; *optimizer in the loop* is the median "
             "time from `optimizer.step()` to the step's end (the schedule and `zero_grad` included).", "",
             "| optimizer | impl | step time | optimizer in the loop | overhead | per-round ratios | tokens/s | MFU "
             "| peak memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["results"].items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "—"
        memory = f"{r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else "—"
        lines.append(f"| {name} | {r['impl'] or '—'} | {r['step_seconds'] * 1e3:.1f} ms | "
                     f"{r['optimizer_seconds'] * 1e3:.1f} ms | {r['overhead']:+.1%} | "
                     f"{r['round_ratio_min']:.3f}–{r['round_ratio_max']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{memory} |")
    path = out_dir / f"{stem}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
