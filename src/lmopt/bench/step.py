"""``lmopt bench step``: the time of one optimizer step and the optimizer's state memory, on a preset's real
parameter shapes, for every registered optimizer, as ratios to the fastest torch AdamW measured in the same run.

Gradients are random (fixed seed) and already present; every optimizer first takes ``warmup`` steps (state
created, caches filled), then the repeats are interleaved (optimizer A, B, C, ..., A, B, C, ...) so that
machine noise hits all alike; the median is reported. Baseline: torch AdamW ``fused=True``; the foreach and
for-loop AdamW and ``torch.optim.Muon`` (on the same hidden matrices, AdamW excluded) are shown beside it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmopt.data.paths import atomic_write_text
from lmopt.model import Qwen3, get_preset
from lmopt.optim import Muon, build, matrix_param_groups
from lmopt.registry import OPTIMIZERS

BASELINE = "adamw (fused)"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _candidates(model: torch.nn.Module) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        BASELINE: lambda: build("adamw", model, impl="fused"),
        "adamw (foreach)": lambda: build("adamw", model, impl="foreach"),
        "adamw (for-loop)": lambda: build("adamw", model, impl="for-loop"),
    }
    for name in OPTIMIZERS.names():
        if name != "adamw":
            out[name] = lambda name=name: build(name, model, total_steps=1000)
    matrices = [p for g in matrix_param_groups(model, 0.1) if g["matrix"] for p in g["params"]]
    out["torch.optim.Muon (matrices only)"] = lambda: torch.optim.Muon(matrices, lr=1e-3)
    out["lmopt muon (matrices only)"] = lambda: Muon(matrices, lr=1e-3, adjust_lr="original")
    return out


def run_step_benchmark(preset: str = "qwen3-134m", repeats: int = 5, warmup: int = 2,
                       only: list[str] | None = None, log=print) -> dict:
    torch.manual_seed(0)
    model = Qwen3(get_preset(preset).config)
    model.init_weights(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    candidates = {k: v for k, v in _candidates(model).items() if not only or k in only or k == BASELINE}
    optimizers = {}
    for name, make in candidates.items():
        opt = make()
        for _ in range(warmup):
            opt.step()
        optimizers[name] = opt
        log(f"warmed up {name}")
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    base_time = statistics.median(times[BASELINE])
    base_state = state_bytes(optimizers[BASELINE])
    rows = {}
    for name, opt in optimizers.items():
        t = statistics.median(times[name])
        s = state_bytes(opt)
        rows[name] = {"step_seconds": t, "time_vs_fused_adamw": t / base_time, "state_bytes": s,
                      "state_bytes_per_param": s / n_params, "state_vs_adamw": s / base_state}
    return {"preset": preset, "params": n_params, "repeats": repeats, "warmup": warmup,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "results": rows}


def write_step_results(result: dict, out_dir: Path, command: str, commit: str) -> Path:
    device = f"cpu-{result['threads']}threads"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{device}-{result['preset']}.json", json.dumps(result | {"command": command,
                                                                                          "commit": commit}, indent=2))
    lines = [f"# Optimizer step benchmark: `{result['preset']}` on {device}", "",
             f"Made by `{command}` at commit `{commit}`; torch {result['torch']}, {result['machine']}; median of "
             f"{result['repeats']} interleaved steps after {result['warmup']} warm-up steps; "
             f"{result['params']:,} parameters; gradients present.", "",
             "| optimizer | step time | vs fused AdamW | state bytes / param | state vs AdamW |",
             "|---|---:|---:|---:|---:|"]
    for name, r in sorted(result["results"].items(), key=lambda kv: kv[1]["step_seconds"]):
        lines.append(f"| {name} | {r['step_seconds'] * 1e3:.1f} ms | {r['time_vs_fused_adamw']:.2f}x | "
                     f"{r['state_bytes_per_param']:.2f} | {r['state_vs_adamw']:.2f}x |")
    path = out_dir / f"{device}-{result['preset']}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
