"""Measure gradient spectra of a real model: from a checkpoint, or live during training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lmopt.analysis.spectrum import matrix_report
from lmopt.data import BatchLoader
from lmopt.data.paths import atomic_write_text
from lmopt.optim.matrix import matrix_param_groups
from lmopt.train.build import build_run
from lmopt.train.callbacks import Callback
from lmopt.train.checkpoint import latest_checkpoint, load_checkpoint
from lmopt.train.config import TrainConfig

KINDS = {
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
}


def select_matrices(model: nn.Module, layers: list[int], kinds: tuple[str, ...] = ("mlp", "attn")) -> dict:
    """{name: parameter} for the chosen kinds of projection in the chosen layers (negative: from the end)."""
    n_layers = len(model.layers)
    chosen = sorted({layer % n_layers for layer in layers})
    out = {}
    for layer in chosen:
        for kind in kinds:
            for module in KINDS[kind]:
                name = f"layers.{layer}.{module}.weight"
                out[name] = model.get_parameter(name)
    return out


def hidden_matrix_gradients(preset: str = "nano", steps: int = 8, seed: int = 0) -> list[Tensor]:
    """The hidden matrices' gradients (float64 copies) of ``preset`` after ``steps`` AdamW steps on Brown: real
    gradients, with the spread of singular values an orthogonalisation meets in training."""
    torch.manual_seed(seed)
    cfg = TrainConfig(preset=preset, data="brown", optimizer="adamw", seq_len=64, batch_tokens=1024, steps=steps,
                      warmup_frac=0.1)
    parts = build_run(cfg)
    for _ in range(steps):
        x, y = parts.loader.next_batch()
        parts.optimizer.zero_grad(set_to_none=True)
        parts.model(x, y)[1].backward()
        parts.optimizer.step()
        parts.scheduler.step()
    groups = matrix_param_groups(parts.model, 0.1)
    return [p.grad.detach().double().clone() for g in groups if g.get("matrix", True) for p in g["params"]]


def micro_batch_gradients(model: nn.Module, params: dict[str, Tensor], loader: BatchLoader, n_micro: int,
                          device: torch.device) -> dict[str, Tensor]:
    """{name: (n_micro, m, n) gradients}, one per micro-batch; leaves every ``.grad`` as it found it (None)."""
    saved = {id(p): p.grad for p in model.parameters()}
    grads: dict[str, list[Tensor]] = {name: [] for name in params}
    for _ in range(n_micro):
        model.zero_grad(set_to_none=True)
        x, y = loader.next_batch()
        model(x.to(device), y.to(device))[1].backward()
        for name, p in params.items():
            grads[name].append(p.grad.detach().float().cpu().clone())
    for p in model.parameters():
        p.grad = saved[id(p)]
    return {name: torch.stack(g) for name, g in grads.items()}


def optimizer_moments(optimizer: torch.optim.Optimizer, p: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(first moment, second moment) of ``p`` where the optimizer keeps them."""
    state = optimizer.state.get(p, {})
    first = state.get("exp_avg", state.get("momentum_buffer", state.get("slow")))
    return first, state.get("exp_avg_sq")


def analyse_model(model: nn.Module, optimizer: torch.optim.Optimizer | None, loader: BatchLoader,
                  layers: list[int], n_micro: int, device: torch.device) -> dict:
    params = select_matrices(model, layers)
    grads = micro_batch_gradients(model, params, loader, n_micro, device)
    reports = {}
    for name, p in params.items():
        first, second = optimizer_moments(optimizer, p) if optimizer is not None else (None, None)
        reports[name] = matrix_report(grads[name], first.cpu() if first is not None else None,
                                      second.cpu() if second is not None else None)
    return reports


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a run with checkpoints")
    return checkpoint


def analyse_checkpoint(path: str | Path, layers: list[int] | None = None, n_micro: int = 16,
                       micro_batch_size: int = 8, seed: int = 1234) -> dict:
    """Load a run's checkpoint (model and optimizer) and measure the chosen matrices' spectra.

    Micro-batches come from the run's training data in an order fixed by ``seed`` (not the run's own).
    """
    checkpoint = resolve_checkpoint(path)
    run_dir = checkpoint.parent.parent
    info = json.loads((run_dir / "config.json").read_text())
    cfg = TrainConfig.from_dict(info["config"])
    device = torch.device("cpu")
    parts = build_run(cfg, device)
    model, optimizer = parts.model, parts.optimizer
    state = load_checkpoint(checkpoint, model, optimizer, parts.scheduler)
    loader = BatchLoader(parts.data.train, cfg.seq_len, micro_batch_size, seed=seed)
    n_layers = len(model.layers)
    reports = analyse_model(model, optimizer, loader, layers if layers is not None else [0, n_layers - 1],
                            n_micro, device)
    return {"run": run_dir.name, "checkpoint": str(checkpoint), "step": state["step"], "tokens": state["tokens"],
            "preset": cfg.preset, "optimizer": cfg.optimizer, "micro_batches": n_micro,
            "micro_batch_tokens": micro_batch_size * cfg.seq_len, "matrices": reports}


class SpectrumRecorder(Callback):
    """During training, every ``spectrum_interval`` steps: the gradient spectra of layers 0 and -1 into
    ``<run>/spectrum/step_<step>.json`` and a ``spectrum`` metrics record. Leaves weights, gradients and the
    training data order as they were (its micro-batches come from a loader of its own, seeded ``seed + 1``).
    ``lmopt train`` adds it when ``spectrum_interval`` is set."""

    measures_spectra = True

    def __init__(self, layers: tuple[int, ...] = (0, -1)) -> None:
        self.layers = list(layers)
        self.loader: BatchLoader | None = None

    def on_step_end(self, trainer) -> None:
        cfg = trainer.cfg
        if not cfg.spectrum_interval or trainer.step % cfg.spectrum_interval:
            return
        if self.loader is None:
            self.loader = BatchLoader(trainer.data.train, cfg.seq_len, cfg.micro_batch_size(), seed=cfg.seed + 1)
        reports = analyse_model(trainer.model, trainer.optimizer, self.loader, self.layers,
                                cfg.spectrum_micro_batches, trainer.device)
        record = {"run": trainer.run_dir.name, "step": trainer.step, "tokens": trainer.tokens, "preset": cfg.preset,
                  "optimizer": cfg.optimizer, "micro_batches": cfg.spectrum_micro_batches, "matrices": reports}
        atomic_write_text(trainer.run_dir / "spectrum" / f"step_{trainer.step:08d}.json", json.dumps(record))
        spikes = [r["spike"]["fraction"] for r in reports.values()]
        trainer.record("spectrum", step=trainer.step, tokens=trainer.tokens,
                       mean_spike_fraction=sum(spikes) / len(spikes))
