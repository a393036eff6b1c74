"""The training configuration: one dataclass, read from a TOML file and/or ``--key value`` flags, validated
before anything is built. Unknown keys and names fail with a message that lists the valid ones."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmopt.optim import validate_options
from lmopt.registry import OPTIMIZERS, PRESETS, TOKENIZERS
from lmopt.train.errors import ConfigError
from lmopt.train.rundir import RunDirError, check_run_name

__all__ = ["ConfigError", "TrainConfig"]

SCHEDULES = ("cosine", "linear", "wsd", "constant")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
LOGGERS = ("tensorboard", "wandb")
PROGRESS = ("auto", "bar", "lines")


@dataclass
class TrainConfig:
    # --- what to train ---
    preset: str = "tiny"
    """model preset (``lmopt presets``)"""
    model: str = ""
    """your own model instead of the preset: ``package.module:factory`` returning an ``nn.Module`` that maps token
    ids to logits (lmopt.model.user); the preset then only chooses the tokenizer"""
    tokenizer: str = ""
    """tokenizer; empty: the preset's own"""
    data: str = "brown"
    """prepared data name: an embedded corpus (prepared on first use) or a name given to ``lmopt data prepare``"""
    # --- optimizer ---
    optimizer: str = "adamw"
    """optimizer name (``lmopt optimizers``)"""
    lr: float | None = None
    """peak learning rate; unset: the optimizer's registered default"""
    weight_decay: float | None = None
    """decoupled weight decay (the optimizer decides which parameters it applies to); unset: its default"""
    optim: dict = field(default_factory=dict)
    """optimizer-specific options, e.g. ``{betas = [0.9, 0.95]}``"""
    # --- schedule ---
    schedule: str = "cosine"
    """after warm-up: cosine | linear (decay to the floor) | wsd (warmup-stable-decay) | constant"""
    warmup_frac: float = 0.05
    """linear warm-up length as a fraction of all steps"""
    min_lr_ratio: float = 0.1
    """the floor the decay ends at, as a fraction of the peak lr"""
    decay_frac: float = 0.2
    """wsd only: the final fraction of steps over which lr decays linearly to the floor"""
    # --- batch and length ---
    seq_len: int = 128
    """tokens per sequence"""
    batch_tokens: int = 4096
    """tokens per optimizer step, over all ranks and accumulation steps"""
    grad_accum: int = 0
    """micro-batches per optimizer step; 0: derived from micro_batch_tokens (1 if that is 0 too, except on CUDA)"""
    micro_batch_tokens: int = 0
    """tokens per forward pass on one rank; 0: batch_tokens / (grad_accum x ranks), or with grad_accum 0 on CUDA
    the largest micro-batch that fits the GPU's memory (lmopt.train.memory)"""
    activation_checkpointing: bool = False
    """recompute each transformer block in backward instead of keeping its activations (less memory, ~1/3 more
    compute)"""
    steps: int = 0
    """optimizer steps; 0: total_tokens / batch_tokens"""
    total_tokens: int = 1_228_800
    """training tokens, used when steps is 0"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 disables"""
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 50
    """steps between validation evaluations (also at step 0 and at the end)"""
    eval_tokens: int = 65536
    """validation tokens per evaluation"""
    log_interval: int = 10
    """steps between progress lines"""
    ckpt_interval: int = 100
    """steps between checkpoints (also at the end); 0: only at the end"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    # --- reproducibility and hardware ---
    seed: int = 0
    """seed of the initial weights and of the data order"""
    device: str = "auto"
    """auto | cpu | cuda"""
    dtype: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | fp32 (strict: no TF32 matmuls on a GPU) | bf16"""
    compile: bool = False
    """torch.compile the model, and the step of optimizers with a compiled path (unless optim sets impl)"""
    dist: str = "auto"
    """auto (FSDP2 under torchrun with several processes) | none | fsdp | ddp"""
    threads: int = 0
    """CPU threads for torch (0: torch's default); results can differ in the last bits across thread counts"""
    peak_flops: float = 0.0
    """the device's peak FLOP/s for MFU (per rank); 0: from lmopt.train.memory's table of known GPUs (bf16 dense)"""
    spectrum_interval: int = 0
    """every this many steps, measure gradient spectra (layers 0 and -1) into <run>/spectrum/; 0: never"""
    spectrum_micro_batches: int = 8
    """micro-batches averaged per spectrum measurement (>= 2)"""
    run_name: str = ""
    """run directory name under $LMOPT_RUNS; empty: derived from the config (deterministic)"""
    loggers: str = ""
    """also log to: tensorboard and/or wandb, comma-separated (written inside the run folder; optional extras)"""
    progress: str = "auto"
    """auto (a live progress bar on a terminal, else a line every log_interval) | bar | lines"""

    # -------------------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def type_name(cls, key: str) -> str:
        """The value type of ``key`` as the CLI help shows it: FLOAT, INT, STR, BOOL or JSON (a table)."""
        hint = typing.get_type_hints(cls)[key]
        if isinstance(hint, types.UnionType):
            hint = next(h for h in typing.get_args(hint) if h is not type(None))
        return {float: "FLOAT", int: "INT", str: "STR", bool: "BOOL", dict: "JSON"}.get(hint, "VALUE")

    @classmethod
    def help(cls, key: str) -> str:
        return _field_docs(cls).get(key, "")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.field_names())}")
        hints = typing.get_type_hints(cls)
        checked = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
        return cls(**checked)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A TOML file (or JSON, for files whose name ends in .json), then ``overrides``."""
        try:
            text = Path(path).read_text()
            values = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must hold a table of keys, not a {type(values).__name__}")
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of everything that affects the result (not the run's name or logging cadence).

        How a step's batch is split (ranks, micro-batches, recomputation) changes only the summation order, not
        the data or the update, so it is left out like ``dist``; ``grad_accum`` hashes as 1, its value before it
        could be derived, so that earlier runs keep their fingerprint (and their checkpoints resume).
        """
        cosmetic = {"run_name", "log_interval", "ckpt_interval", "keep_checkpoints", "threads", "dist",
                    "spectrum_interval", "spectrum_micro_batches", "micro_batch_tokens", "activation_checkpointing",
                    "peak_flops", "loggers", "progress"}
        content = {k: v for k, v in self.to_dict().items() if k not in cosmetic} | {"grad_accum": 1}
        if not self.model:  # a field added later: left out at its default, so earlier fingerprints hold
            del content["model"]
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def default_run_name(self) -> str:
        lr = "default" if self.lr is None else f"{self.lr:g}"
        return f"{self.preset}-{self.data}-{self.optimizer}-lr{lr}-s{self.seed}-{self.fingerprint()}"

    def logger_names(self) -> list[str]:
        return [name.strip() for name in self.loggers.split(",") if name.strip()]

    def resolved_tokenizer(self) -> str:
        return self.tokenizer or PRESETS.get(self.preset).tokenizer

    def num_steps(self) -> int:
        return self.steps or self.total_tokens // self.batch_tokens

    def rank_sequences(self, world_size: int = 1) -> int:
        """Sequences per optimizer step on one rank (all its micro-batches)."""
        per_step = self.seq_len * world_size
        if self.batch_tokens % per_step:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len x ranks "
                              f"({self.seq_len} x {world_size} = {per_step})")
        return self.batch_tokens // per_step

    def auto_micro_batch(self) -> bool:
        """Whether the micro-batch is left to the trainer (neither grad_accum nor micro_batch_tokens given)."""
        return self.grad_accum == 0 and self.micro_batch_tokens == 0

    def micro_batch_size(self, world_size: int = 1, auto: int | None = None) -> int:
        """Sequences per forward pass on one rank; ``auto``: the trainer's choice when :meth:`auto_micro_batch`."""
        sequences = self.rank_sequences(world_size)
        if self.micro_batch_tokens:
            if self.micro_batch_tokens % self.seq_len or sequences % (self.micro_batch_tokens // self.seq_len):
                raise ConfigError(
                    f"micro_batch_tokens ({self.micro_batch_tokens}) must be a multiple of seq_len ({self.seq_len}) "
                    f"that divides each rank's batch_tokens / ranks ({self.batch_tokens} / {world_size})")
            micro = self.micro_batch_tokens // self.seq_len
            if self.grad_accum and self.grad_accum != sequences // micro:
                raise ConfigError(
                    f"grad_accum ({self.grad_accum}) and micro_batch_tokens ({self.micro_batch_tokens}) disagree: "
                    f"batch_tokens {self.batch_tokens} / ({self.micro_batch_tokens} x {world_size} ranks) = "
                    f"{sequences // micro} micro-batches; give one of the two")
            return micro
        accum = self.grad_accum or 1
        if not self.grad_accum and auto is not None:
            return auto
        if sequences % accum:
            per_micro = self.seq_len * accum * world_size
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len x grad_accum x ranks "
                f"({self.seq_len} x {accum} x {world_size} = {per_micro})"
            )
        return sequences // accum

    def grad_accum_steps(self, world_size: int = 1, auto: int | None = None) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.rank_sequences(world_size) // self.micro_batch_size(world_size, auto)

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check every name and number; raise :class:`ConfigError` or an ``UnknownNameError``."""
        preset = PRESETS.get(self.preset)
        tokenizer = TOKENIZERS.get(self.resolved_tokenizer())
        if self.model and ":" not in self.model:
            raise ConfigError(f"model {self.model!r} must be package.module:factory (or leave it empty and choose "
                              "a --preset)")
        if not self.model and tokenizer.vocab_size > preset.config.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but preset {self.preset!r} "
                f"has a vocabulary of {preset.config.vocab_size}"
            )
        validate_options(OPTIMIZERS.get(self.optimizer), self.optim)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("dist", self.dist, ("auto", "none", "fsdp", "ddp"))
        _choice("progress", self.progress, PROGRESS)
        for logger in self.logger_names():
            _choice("logger", logger, LOGGERS)
        if self.model and self.spectrum_interval:
            raise ConfigError("spectrum_interval measures lmopt's own model (its attention and MLP matrices); "
                              "it is not available with --model")
        positive = ("seq_len", "batch_tokens", "eval_interval", "eval_tokens", "log_interval", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "grad_clip", "steps", "total_tokens", "ckpt_interval", "seed", "threads",
                    "grad_accum", "micro_batch_tokens", "peak_flops"):
            if getattr(self, key) is not None and getattr(self, key) < 0:  # (a NaN passes here; caught below)
                raise ConfigError(f"{key} must be non-negative, got {getattr(self, key)}")
        if self.spectrum_interval < 0 or self.spectrum_micro_batches < 2:
            raise ConfigError("spectrum_interval must be >= 0 and spectrum_micro_batches >= 2")
        for key in ("lr", "weight_decay", "grad_clip", "warmup_frac", "min_lr_ratio", "decay_frac", "peak_flops"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        if self.run_name:
            try:
                check_run_name(self.run_name)
            except RunDirError as err:
                raise ConfigError(str(err)) from None
        for key in ("warmup_frac", "min_lr_ratio", "decay_frac"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        if not self.model and self.seq_len > preset.config.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the preset's max_seq_len {preset.config.max_seq_len}")
        if self.num_steps() <= 0:
            raise ConfigError(
                f"no training steps: steps={self.steps}, total_tokens={self.total_tokens} "
                f"< batch_tokens={self.batch_tokens}"
            )
        self.micro_batch_size(world_size)
        return self


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {key} {value!r}; choose one of {', '.join(choices)}")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it) from the class's source, parsed once per process."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: nxt.value.value for node, nxt in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Accept TOML values and CLI strings for a field of type ``hint``."""
    if isinstance(hint, types.UnionType):
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is dict:
            if isinstance(value, str):
                value = parse_options(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (ValueError, TypeError, json.JSONDecodeError, tomllib.TOMLDecodeError):
        expected = ("a table: KEY=VALUE[,KEY=VALUE...], JSON or a TOML inline table" if hint is dict
                    else hint.__name__)
        raise ConfigError(f"invalid value for {key}: {value!r} (expected {expected})") from None
    return value


def parse_options(text: str) -> dict:
    """Options from the command line: ``KEY=VALUE[,KEY=VALUE...]`` (each VALUE read as JSON where it parses,
    e.g. ``betas=[0.9,0.95]``, else kept as a string: ``rotation=kronecker``), a JSON object
    (``{"momentum": 0.9}``) or a TOML inline table (``{betas = [0.9, 0.95]}``)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return tomllib.loads(f"options = {text}")["options"]
    out = {}
    for item in filter(None, re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text)):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(item)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw.strip()
    return out
