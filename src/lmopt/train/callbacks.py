"""Hooks into the training loop: loggers (TensorBoard, W&B), the live progress bar, and measurements that other
layers plug in (``lmopt.analysis.SpectrumRecorder``) without the trainer importing them.

A callback sees every metrics record as it is written to ``metrics.jsonl`` (``on_record``: ``train``, ``eval``,
``spectrum``, ``diverged``, ``end``), and may act after each step (``on_step_end``: evaluation and checkpoint of
that step are done). Callbacks run on rank 0 only; the trainer calls ``on_start`` once the run folder is claimed
and ``on_close`` when the run ends, however it ends.

    class PrintLoss(Callback):
        def on_record(self, trainer, event, record):
            if event == "eval":
                print(record["step"], record["val_loss"])

    Trainer(cfg, callbacks=[PrintLoss()]).run_and_close()
"""

from __future__ import annotations

import json
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any

from lmopt.train.errors import ConfigError

Trainer = Any  # lmopt.train.trainer.Trainer (not imported: the trainer imports this module)


class Callback:
    """Override any of these; each does nothing by default."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_record(self, trainer: Trainer, event: str, record: dict[str, Any]) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_close(self, trainer: Trainer, failed: bool) -> None: ...


def numeric_fields(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "tokens")}


class TensorBoardLogger(Callback):
    """Scalars ``<event>/<field>`` (``train/train_loss``, ``eval/val_loss``...) at the step, written to
    ``<run>/tensorboard/``; on resume, events after the checkpoint's step are dropped (``purge_step``)."""

    def __init__(self, log_dir: Path | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("loggers: tensorboard needs the tensorboard package: pip install 'lmopt[tensorboard]'"
                              ) from err
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.writer = None

    def on_start(self, trainer: Trainer) -> None:
        log_dir = self.log_dir or trainer.run_dir / "tensorboard"
        self.writer = self._writer_class(log_dir=str(log_dir), purge_step=trainer.step + 1 if trainer.step else None)
        self.writer.add_text("config", json.dumps(trainer.cfg.to_dict(), indent=2), global_step=trainer.step)

    def on_record(self, trainer: Trainer, event: str, record: dict[str, Any]) -> None:
        if self.writer is None or "step" not in record:
            return
        for key, value in numeric_fields(record).items():
            self.writer.add_scalar(f"{event}/{key}", value, global_step=record["step"])

    def on_close(self, trainer: Trainer, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(Callback):
    """The same scalars to Weights & Biases, into ``<run>/wandb/``. Without a W&B login (``WANDB_API_KEY`` or
    ``wandb login``) and without ``WANDB_MODE`` set, it logs offline (``wandb sync <run>/wandb/offline-run-*``
    uploads it later). W&B's own config and cache folders default to inside the run folder as well."""

    def __init__(self, project: str = "lmopt") -> None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("loggers: wandb needs the wandb package: pip install 'lmopt[wandb]'") from err
        self.wandb = wandb
        self.project = project
        self.run = None

    def on_start(self, trainer: Trainer) -> None:
        folder = trainer.run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            os.environ.setdefault(key, str(folder / key.split("_")[1].lower()))
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        if mode == "offline":
            trainer.log(f"wandb: logging offline into {folder} (no W&B login); `wandb sync` uploads it")
        # one W&B run per lmopt run (a resumed run continues it); W&B ids may not contain / \ # ? % :
        run_id = trainer.cfg.fingerprint() + "-" + re.sub(r"[^A-Za-z0-9._=+-]", "-", trainer.run_dir.name)[-40:]
        self.run = self.wandb.init(project=self.project, name=trainer.run_dir.name, dir=str(trainer.run_dir),
                                   config=trainer.cfg.to_dict(), mode=mode, id=run_id, resume="allow")

    def on_record(self, trainer: Trainer, event: str, record: dict[str, Any]) -> None:
        if self.run is None or "step" not in record:
            return
        self.run.log({f"{event}/{k}": v for k, v in numeric_fields(record).items()}, step=record["step"])

    def on_close(self, trainer: Trainer, failed: bool) -> None:
        if self.run is not None:
            self.run.log({}, commit=True)  # W&B holds a step's values until a later step; the last has none
            self.finish(failed)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None


LOGGER_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def make_loggers(names: list[str]) -> list[Callback]:
    """The loggers a config names (checked: an unknown name or a missing package is a ConfigError)."""
    return [LOGGER_CLASSES[name]() for name in names]


class ProgressBar(Callback):
    """A live bar (rich) with step, loss, tokens/s and ETA; evaluation lines print above it."""

    def __init__(self, console=None) -> None:
        from rich.console import Console

        self.console = console or Console(file=sys.stdout)
        self.progress = None
        self.task = None

    def on_start(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step, status="")

    def print(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False)

    def on_record(self, trainer: Trainer, event: str, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if event == "train":
            status = f"loss {record['train_loss']:.4f} | lr {record['lr']:.2e}"
            if "tokens_per_s" in record and not record.get("compile"):
                status += f" | {record['tokens_per_s']:,.0f} tok/s"
            self.progress.update(self.task, completed=record["step"], status=status)

    def on_close(self, trainer: Trainer, failed: bool) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def wants_bar(progress: str, stream=None) -> bool:
    stream = stream or sys.stdout
    return progress == "bar" or (progress == "auto" and hasattr(stream, "isatty") and stream.isatty())
