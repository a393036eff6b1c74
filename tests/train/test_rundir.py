"""Nothing is lost: run names stay inside the runs folder, one process per run, --overwrite only after every
check, no checkpoint of non-finite weights, damaged files detected with a fallback, torn metrics survived."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lmopt.cli import main
from lmopt.train import ConfigError, TrainConfig, Trainer, TrainingDiverged
from lmopt.train.checkpoint import latest_checkpoint, usable_checkpoints, verify_checkpoint
from lmopt.train.metrics import read_metrics
from lmopt.train.rundir import RunBusyError, RunLock, check_run_name

NANO = dict(preset="nano", seq_len=64, batch_tokens=1024, eval_interval=100, eval_tokens=2048, log_interval=100)
quiet = print if os.environ.get("LMOPT_TEST_VERBOSE") else (lambda _: None)


def precious_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


@pytest.mark.parametrize("name", ["../precious", "..", ".", "/tmp/precious", "a/../../precious", "a//b", ".hidden",
                                  "-rf", "a b", ""])
def test_unsafe_run_names_are_refused_before_anything_is_touched(runs_dir, name):
    if name == "":
        assert check_run_name("ok-name_1.5") == "ok-name_1.5"
        return
    precious = precious_folder(runs_dir.parent / "precious")
    (runs_dir / "kept").mkdir(parents=True)
    code = main(["train", "--preset", "nano", "--steps", "1", f"--run-name={name}", "--overwrite"])
    assert code == 2
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert (runs_dir / "kept").is_dir()


def test_a_folder_that_is_not_an_lmopt_run_is_never_deleted(runs_dir):
    precious = precious_folder(runs_dir / "mine")
    with pytest.raises(ConfigError, match="not an lmopt run folder; lmopt never deletes it"):
        Trainer(TrainConfig(**NANO, steps=1, run_name="mine"), overwrite=True, log=quiet)
    with pytest.raises(ConfigError, match="not an lmopt run folder"):
        Trainer(TrainConfig(**NANO, steps=1, run_name="mine"), resume="auto", log=quiet)
    assert (precious / "thesis.tex").exists()


@pytest.mark.parametrize("bad", [{"data": "nosuch"}, {"lr": float("nan")}, {"weight_decay": float("inf")},
                                 {"grad_clip": float("nan")}, {"optim": {"impl": "warp-drive"}}])
def test_overwrite_with_a_bad_config_keeps_the_old_run(runs_dir, bad):
    Trainer(TrainConfig(**NANO, steps=2, run_name="old"), log=quiet).run()
    before = sorted(p.relative_to(runs_dir) for p in (runs_dir / "old").rglob("*"))
    with pytest.raises((ValueError, FileNotFoundError)):
        Trainer(TrainConfig(**(NANO | {"steps": 2, "run_name": "old"} | bad)), overwrite=True, log=quiet)
    assert sorted(p.relative_to(runs_dir) for p in (runs_dir / "old").rglob("*")) == before


def test_a_failed_start_leaves_no_folder(runs_dir):
    with pytest.raises((ValueError, FileNotFoundError)):
        Trainer(TrainConfig(**NANO, steps=2, data="nosuch", run_name="never"), log=quiet)
    assert not (runs_dir / "never").exists()


def test_one_process_per_run(runs_dir):
    cfg = TrainConfig(**NANO, steps=2, run_name="busy")
    holder = RunLock(runs_dir / "busy")  # another process's lock (flock conflicts across open files)
    try:
        with pytest.raises(RunBusyError, match=f"in use by process {os.getpid()}"):
            Trainer(cfg, log=quiet)
        with pytest.raises(RunBusyError):
            Trainer(cfg, resume="auto", log=quiet)
    finally:
        holder.release()
    Trainer(cfg, log=quiet).run()  # the lock is gone with its owner
    assert not (runs_dir / "busy" / ".lock").exists()


def test_resume_needs_a_run_and_a_checkpoint(runs_dir, capsys):
    assert main(["train", "--preset", "nano", "--steps", "2", "--run-name", "ghost", "--resume"]) == 2
    assert "there is no run 'ghost'" in capsys.readouterr().out
    assert not (runs_dir / "ghost").exists()


def test_no_checkpoint_of_non_finite_weights(runs_dir):
    """An update that makes the weights non-finite (the loss before it was finite) is never saved."""
    cfg = TrainConfig(**NANO, steps=6, ckpt_interval=1, warmup_frac=0.0, lr=1e38, run_name="blowup")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        Trainer(cfg, log=quiet).run()
    for checkpoint in usable_checkpoints(runs_dir / "blowup"):
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint


def test_damaged_newest_checkpoint_falls_back_to_the_previous(runs_dir, capsys):
    base = dict(NANO, steps=6, ckpt_interval=2, keep_checkpoints=3)
    Trainer(TrainConfig(**base, run_name="straight"), log=quiet).run()
    Trainer(TrainConfig(**base, run_name="r"), log=quiet).run(stop_at=4)
    newest = latest_checkpoint(runs_dir / "r")
    assert newest.name == "step_00000004" and verify_checkpoint(newest) is None
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # 64 flipped bytes: same size, wrong content
    weights.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(newest)
    messages = []
    trainer = Trainer(TrainConfig(**base, run_name="r"), resume=True, log=messages.append)
    assert trainer.step == 2
    assert any("skipping checkpoint step_00000004" in m for m in messages)
    trainer.run()
    losses = [r["train_loss"] for r in read_metrics(runs_dir / "r" / "metrics.jsonl") if r["event"] == "train"]
    straight = [r["train_loss"] for r in read_metrics(runs_dir / "straight" / "metrics.jsonl")
                if r["event"] == "train"]
    assert losses == straight
    # every checkpoint damaged: a clear error, exit 2, nothing started over
    for checkpoint in usable_checkpoints(runs_dir / "r"):
        (checkpoint / "trainer.json").write_text("{")
    assert main(["train", "--config", str(write_config(runs_dir, base, "r")), "--resume"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().out


def write_config(runs_dir, base, name):
    path = runs_dir.parent / f"{name}.json"
    path.write_text(json.dumps(base | {"run_name": name}))
    return path


def test_lost_latest_pointer_and_leftovers(runs_dir):
    base = dict(NANO, steps=4, ckpt_interval=2)
    Trainer(TrainConfig(**base, run_name="p"), log=quiet).run(stop_at=2)
    root = runs_dir / "p" / "checkpoints"
    (root / "latest").unlink()
    (root / ".tmp-step_00000004").mkdir()  # a checkpoint write that a crash interrupted
    (root / ".latest.tmp-12345").write_text("step_")
    messages = []
    trainer = Trainer(TrainConfig(**base, run_name="p"), resume=True, log=messages.append)
    assert trainer.step == 2
    assert not (root / ".tmp-step_00000004").exists() and not (root / ".latest.tmp-12345").exists()
    assert any("interrupted run" in m for m in messages)


def test_torn_metrics_line_is_dropped_on_resume(runs_dir):
    base = dict(NANO, steps=4, ckpt_interval=2)
    Trainer(TrainConfig(**base, run_name="torn"), log=quiet).run(stop_at=2)
    metrics = runs_dir / "torn" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"event": "train", "step": 3, "train_lo')  # the disk filled up mid-line
    messages = []
    Trainer(TrainConfig(**base, run_name="torn"), resume=True, log=messages.append).run()
    assert any("torn last line" in m for m in messages)
    steps = [r["step"] for r in read_metrics(metrics) if r["event"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_with_another_preset_fails_before_loading_weights(runs_dir, capsys):
    Trainer(TrainConfig(**NANO, steps=2, run_name="n"), log=quiet).run()
    code = main(["train", "--preset", "tiny", "--seq-len", "64", "--batch-tokens", "1024", "--steps", "2",
                 "--eval-interval", "100", "--eval-tokens", "2048", "--log-interval", "100", "--run-name", "n",
                 "--resume"])
    assert code == 2
    out = capsys.readouterr().out
    assert "different config" in out and "Traceback" not in out
