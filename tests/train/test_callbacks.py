"""Trainer callbacks: a user's own, the TensorBoard and W&B loggers (read back from the files they write), and
the live progress bar."""

import io

import pytest

from lmopt.train import Callback, ConfigError, TrainConfig, Trainer
from lmopt.train.metrics import read_metrics

NANO = dict(preset="nano", seq_len=64, batch_tokens=1024, steps=4, eval_interval=2, eval_tokens=2048,
            log_interval=100, ckpt_interval=2)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_record(self, trainer, event, record):
        self.calls.append((event, record.get("step")))

    def on_step_end(self, trainer):
        self.calls.append(("step_end", trainer.step))

    def on_close(self, trainer, failed):
        self.calls.append(("close", failed))


def test_a_callback_sees_every_record_and_each_step(runs_dir):
    recorder = Recorder()
    Trainer(TrainConfig(**NANO, run_name="cb"), log=lambda _: None, callbacks=[recorder]).run()
    written = [(r["event"], r.get("step")) for r in read_metrics(runs_dir / "cb" / "metrics.jsonl")]
    seen = [c for c in recorder.calls if c[0] not in ("start", "step_end", "close")]
    assert seen == written
    assert recorder.calls[0] == ("start", 0) and recorder.calls[-1] == ("close", False)
    assert [c[1] for c in recorder.calls if c[0] == "step_end"] == [1, 2, 3, 4]


def test_tensorboard_logger_writes_the_metrics_and_drops_events_past_a_resumed_checkpoint(runs_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = TrainConfig(**NANO, run_name="tb", loggers="tensorboard")
    Trainer(cfg, log=lambda _: None).run(stop_at=2)
    Trainer(cfg, resume=True, log=lambda _: None).run()

    events = event_accumulator.EventAccumulator(str(runs_dir / "tb" / "tensorboard"))
    events.Reload()
    assert {"train/train_loss", "eval/val_loss", "train/grad_norm"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("train/train_loss")}
    written = {r["step"]: r["train_loss"] for r in read_metrics(runs_dir / "tb" / "metrics.jsonl")
               if r["event"] == "train"}
    assert sorted(logged) == [1, 2, 3, 4] and logged == pytest.approx(written)


def test_wandb_logger_logs_offline_inside_the_run_folder(runs_dir, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(runs_dir / "home"))  # no ~/.netrc login: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lmopt.train.callbacks import WandbLogger

    class Snapshot(WandbLogger):
        """The W&B run's own summary (its last logged values), read before the run is finished."""

        def finish(self, failed):
            self.summary = {k: self.run.summary[k] for k in ("eval/val_loss", "train/train_loss")}
            super().finish(failed)

    logger, lines = Snapshot(), []
    Trainer(TrainConfig(**NANO, run_name="wb:1"), log=lines.append, callbacks=[logger]).run()  # ":" is not a W&B id
    assert any("logging offline" in line for line in lines)
    offline = list((runs_dir / "wb:1" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0, "no offline W&B log inside the run folder"
    records = read_metrics(runs_dir / "wb:1" / "metrics.jsonl")
    final_eval = [r for r in records if r["event"] == "eval"][-1]
    final_train = [r for r in records if r["event"] == "train"][-1]
    assert logger.summary == pytest.approx({"eval/val_loss": final_eval["val_loss"],
                                            "train/train_loss": final_train["train_loss"]})
    assert not (runs_dir / "home").exists() or not list((runs_dir / "home").rglob("*wandb*"))


def test_an_unknown_logger_fails_before_the_run_folder_is_made(runs_dir):
    with pytest.raises(ConfigError, match="invalid logger 'mlflow'"):
        Trainer(TrainConfig(**NANO, run_name="bad", loggers="tensorboard,mlflow"), log=lambda _: None)
    assert not (runs_dir / "bad").exists()


def test_progress_bar_shows_steps_and_loss_and_prints_lines_above_it(runs_dir):
    from rich.console import Console

    from lmopt.train.callbacks import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(console=Console(file=out, force_terminal=True, width=150))
    Trainer(TrainConfig(**NANO, run_name="bar"), log=bar.print, callbacks=[bar]).run()
    text = out.getvalue()
    assert "4/4" in text and "loss " in text and "val loss" in text
