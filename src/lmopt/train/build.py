"""A run's parts, built from its config in one place: data, model, optimizer, schedule and batches.

The trainer (:mod:`lmopt.train.trainer`), the analysis of a checkpoint (:mod:`lmopt.analysis.collect`) and the
step benchmarks (:mod:`lmopt.bench.step`) all build through these functions, so a config means the same run
everywhere. Each raises :class:`~lmopt.train.config.ConfigError` (or the optimizer's ``OptionError``) before
anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmopt.data import BatchLoader, load_prepared
from lmopt.data.prepare import PreparedData
from lmopt.model import build_model, get_preset
from lmopt.model.user import UserModelError, build_user_model
from lmopt.optim import build
from lmopt.registry import OPTIMIZERS
from lmopt.train.config import ConfigError, TrainConfig
from lmopt.train.schedule import lr_factor


def load_data(cfg: TrainConfig, auto_prepare: bool = True, verify: bool = True) -> PreparedData:
    """The prepared data of the run (prepared on first use for the embedded corpora)."""
    return load_prepared(cfg.data, cfg.resolved_tokenizer(), auto_prepare=auto_prepare, verify=verify)


def make_model(cfg: TrainConfig, vocab_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The run's model, initialised from ``cfg.seed`` (identical on every rank): the preset, or the user's
    ``cfg.model`` factory (:mod:`lmopt.model.user`). ``vocab_size`` is the data's."""
    if cfg.model:
        if cfg.activation_checkpointing:
            raise ConfigError("activation_checkpointing is for lmopt's own model; a --model of your own can "
                              "checkpoint its blocks itself")
        try:
            return build_user_model(cfg.model, vocab_size, seed=cfg.seed, device=device)
        except UserModelError as err:
            raise ConfigError(str(err)) from None
    preset = get_preset(cfg.preset)
    if vocab_size > preset.config.vocab_size:
        raise ConfigError(f"data {cfg.data!r} has vocabulary {vocab_size} > the preset's {preset.config.vocab_size}")
    model = build_model(preset.config, seed=cfg.seed, device=device)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module, total_steps: int) -> torch.optim.Optimizer:
    """The registered optimizer over ``model``'s role groups; with ``compile`` its compiled step if it has one
    (unless ``cfg.optim`` names an ``impl``)."""
    options = dict(cfg.optim)
    if cfg.compile and "compiled" in OPTIMIZERS.get(cfg.optimizer).impls:
        options.setdefault("impl", "compiled")
    return build(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total_steps, **options)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_frac`` of the steps, then ``cfg.schedule`` down to ``min_lr_ratio``."""
    warmup = round(cfg.warmup_frac * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac))


def make_loader(cfg: TrainConfig, data: PreparedData, rank: int = 0, world_size: int = 1) -> BatchLoader:
    """One optimizer step's sequences of this rank per ``next_batch`` (the trainer cuts them into micro-batches):
    the data of a step depends neither on the number of ranks nor on the micro-batch size."""
    return BatchLoader(data.train, cfg.seq_len, cfg.rank_sequences(world_size), seed=cfg.seed, rank=rank,
                       world_size=world_size)


@dataclass
class RunParts:
    data: PreparedData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: BatchLoader
    total_steps: int


def build_run(cfg: TrainConfig, device: torch.device | str = "cpu", data: PreparedData | None = None) -> RunParts:
    """Every part of a single-process run (the trainer builds the same parts around its parallel wrapper)."""
    cfg = cfg.validate()
    data = data if data is not None else load_data(cfg)
    model = make_model(cfg, data.vocab_size, device)
    total_steps = cfg.num_steps()
    optimizer = make_optimizer(cfg, model, total_steps)
    return RunParts(data, model, optimizer, make_scheduler(cfg, optimizer, total_steps), make_loader(cfg, data),
                    total_steps)
