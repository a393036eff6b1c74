import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmopt.analysis import SpectrumRecorder
from lmopt.cli import main
from lmopt.registry import OPTIMIZERS
from lmopt.train import ConfigError, TrainConfig, Trainer, TrainingDiverged
from lmopt.train.checkpoint import latest_checkpoint
from lmopt.train.metrics import read_metrics

NANO = dict(preset="nano", seq_len=64, batch_tokens=1024, eval_interval=4, eval_tokens=4096, log_interval=100)


def train_losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


def test_resume_is_bit_exact(runs_dir):
    cfg = TrainConfig(**NANO, steps=12, ckpt_interval=0, run_name="straight")
    straight = Trainer(cfg, log=lambda _: None)
    straight.run()

    cfg_b = TrainConfig(**NANO, steps=12, ckpt_interval=0, run_name="resumed")
    first = Trainer(cfg_b, log=lambda _: None).run(stop_at=6)
    assert not first["complete"]
    second = Trainer(cfg_b, resume=True, log=lambda _: None)
    assert second.step == 6
    summary = second.run()
    assert summary["complete"]
    assert train_losses(runs_dir / "straight") == train_losses(runs_dir / "resumed")
    assert len(train_losses(runs_dir / "resumed")) == 12
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert summary["val_curve"] == json.loads((runs_dir / "straight" / "summary.json").read_text())["val_curve"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_every_optimizer_resumes_bit_exactly_through_checkpoint_files(runs_dir, optimizer):
    base = dict(NANO, optimizer=optimizer, steps=6, ckpt_interval=0, eval_interval=100)
    Trainer(TrainConfig(**base, run_name="a"), log=lambda _: None).run()
    Trainer(TrainConfig(**base, run_name="b"), log=lambda _: None).run(stop_at=3)
    Trainer(TrainConfig(**base, run_name="b"), resume=True, log=lambda _: None).run()
    assert train_losses(runs_dir / "a") == train_losses(runs_dir / "b")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(runs_dir):
    cfg = TrainConfig(**NANO, steps=8, ckpt_interval=2, run_name="nan")
    trainer = Trainer(cfg, log=lambda _: None)

    def poison(module, inputs, output):
        return output * float("nan") if trainer.step >= 5 else output

    trainer.model.norm.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 6.*step_00000004.*intact"):
        trainer.run()
    checkpoint = latest_checkpoint(runs_dir / "nan")
    assert checkpoint.name == "step_00000004"
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # the weights in memory were not touched by the bad step either
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = read_metrics(runs_dir / "nan" / "metrics.jsonl")
    assert records[-1]["event"] == "diverged"


def test_default_job_learns(runs_dir):
    """A short version of the README's main job: the loss must fall well below ln(vocab)."""
    summary = Trainer(TrainConfig(**NANO, steps=40, run_name="learn"), log=lambda _: None).run()
    assert summary["initial_val_loss"] == pytest.approx(math.log(8192), abs=0.1)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0
    config = json.loads((runs_dir / "learn" / "config.json").read_text())
    assert config["resolved"]["epochs"] > 0 and config["environment"]["commit"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"presett": "tiny"}, "unknown config key.*presett.*valid keys"),
        ({"preset": "huge"}, "unknown preset 'huge'; valid presets: nano, tiny"),
        ({"optimizer": "adamx"}, "unknown optimizer 'adamx'; valid optimizers: adamw"),
        ({"optim": {"beta": 0.9}}, "unknown option.*beta.*valid options: betas"),
        ({"optim": {"betas": [0.9, 1.5]}}, r"betas\[1\].*\[0, 1\)"),
        ({"lr": -1.0}, "lr must be non-negative"),
        ({"seq_len": "long"}, "invalid value for seq_len"),
        ({"schedule": "exp"}, "invalid schedule 'exp'; choose one of cosine"),
        ({"batch_tokens": 100}, "must be a multiple of seq_len"),
        ({"preset": "qwen3-134m", "tokenizer": "bpe-8192", "seq_len": 100000}, "exceeds the preset's max_seq_len"),
        ({"tokenizer": "qwen3"}, "tokenizer 'qwen3' has 151669 ids but preset 'tiny'"),
    ],
)
def test_config_errors_fail_before_training(runs_dir, values, message):
    with pytest.raises(ValueError, match=message):
        Trainer(TrainConfig.from_dict(values), log=lambda _: None)
    assert not runs_dir.exists()


def test_toml_config_and_cli_errors(tmp_path, runs_dir, capsys):
    path = tmp_path / "run.toml"
    path.write_text('preset = "nano"\nsteps = 3\n[optim]\nbetas = [0.9, 0.99]\n')
    cfg = TrainConfig.from_file(path, {"seed": 5})
    assert (cfg.preset, cfg.steps, cfg.seed, cfg.optim["betas"]) == ("nano", 3, 5, [0.9, 0.99])
    path.write_text('preset = "nano"\nwarmup = 3\n')
    with pytest.raises(ConfigError, match="unknown config key.*warmup"):
        TrainConfig.from_file(path)
    assert main(["train", "--preset", "nope"]) == 2
    assert "valid presets" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [
    ("rotation=kronecker", {"rotation": "kronecker"}),
    ("betas=[0.9, 0.99],eps=1e-6, impl=compiled", {"betas": [0.9, 0.99], "eps": 1e-6, "impl": "compiled"}),
    ('{"momentum": 0.9}', {"momentum": 0.9}),
    ("{betas = [0.9, 0.99]}", {"betas": [0.9, 0.99]}),
])
def test_optimizer_options_on_the_command_line(text, expected):
    assert TrainConfig.from_dict({"optim": text}).optim == expected


def test_unreadable_optimizer_options_say_which_forms_are_accepted():
    with pytest.raises(ConfigError, match=r"invalid value for optim: '=3' \(expected a table: KEY=VALUE"):
        TrainConfig.from_dict({"optim": "=3"})


def test_existing_run_is_not_overwritten_silently(runs_dir):
    cfg = TrainConfig(**NANO, steps=2, run_name="once")
    Trainer(cfg, log=lambda _: None).run()
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        Trainer(cfg, log=lambda _: None)
    Trainer(cfg, overwrite=True, log=lambda _: None).run()


def test_spectrum_during_training_changes_nothing_else(runs_dir):
    base = dict(NANO, steps=4, ckpt_interval=0)
    Trainer(TrainConfig(**base, run_name="plain"), log=lambda _: None).run()
    measured = TrainConfig(**base, run_name="measured", spectrum_interval=2, spectrum_micro_batches=2)
    with pytest.raises(ConfigError, match="needs lmopt.analysis.SpectrumRecorder"):
        Trainer(measured, log=lambda _: None)
    assert not (runs_dir / "measured").exists()
    Trainer(measured, log=lambda _: None, callbacks=[SpectrumRecorder()]).run()
    assert train_losses(runs_dir / "plain") == train_losses(runs_dir / "measured")
    files = sorted((runs_dir / "measured" / "spectrum").glob("*.json"))
    assert [f.name for f in files] == ["step_00000002.json", "step_00000004.json"]
    report = json.loads(files[0].read_text())
    assert set(report["matrices"]) >= {"layers.0.mlp.down_proj.weight", "layers.1.self_attn.q_proj.weight"}
    assert {"G", "M", "V"} == set(report["matrices"]["layers.1.mlp.up_proj.weight"]["cdf"])


def test_micro_batching_settings_and_their_errors():
    cfg = TrainConfig(seq_len=64, batch_tokens=1024, micro_batch_tokens=256)
    assert (cfg.micro_batch_size(), cfg.grad_accum_steps()) == (4, 4)
    assert (cfg.micro_batch_size(2), cfg.grad_accum_steps(2)) == (4, 2)  # micro_batch_tokens is per rank
    assert TrainConfig(seq_len=64, batch_tokens=1024, micro_batch_tokens=256, grad_accum=4).micro_batch_size() == 4
    assert TrainConfig(seq_len=64, batch_tokens=1024, grad_accum=2).micro_batch_size() == 8
    assert TrainConfig(seq_len=64, batch_tokens=1024).micro_batch_size() == 16  # neither set: one micro-batch
    assert TrainConfig(seq_len=64, batch_tokens=1024).micro_batch_size(auto=4) == 4  # the trainer's choice (GPU)
    with pytest.raises(ConfigError, match=r"grad_accum \(2\) and micro_batch_tokens \(256\) disagree.*4 micro"):
        TrainConfig(seq_len=64, batch_tokens=1024, micro_batch_tokens=256, grad_accum=2).validate()
    with pytest.raises(ConfigError, match="micro_batch_tokens .* must be a multiple of seq_len"):
        TrainConfig(seq_len=64, batch_tokens=1024, micro_batch_tokens=100).validate()
    with pytest.raises(ConfigError, match="micro_batch_tokens .* must be a multiple of seq_len"):
        TrainConfig(seq_len=64, batch_tokens=1024, micro_batch_tokens=384).validate()
    with pytest.raises(ConfigError, match="must be a multiple of seq_len x grad_accum"):
        TrainConfig(seq_len=64, batch_tokens=1024, grad_accum=3).validate()
    with pytest.raises(ConfigError, match="micro_batch_tokens must be non-negative"):
        TrainConfig(micro_batch_tokens=-64).validate()


def test_fingerprint_ignores_how_a_step_is_split_and_keeps_earlier_values():
    base = TrainConfig(preset="nano", seq_len=64, batch_tokens=2048)
    assert base.fingerprint() == "ab90b5ee"  # as before micro_batch_tokens existed: earlier runs still resume
    assert TrainConfig().fingerprint() == "d6abe6c5"
    for split in ({"grad_accum": 1}, {"grad_accum": 4}, {"micro_batch_tokens": 512},
                  {"activation_checkpointing": True}, {"peak_flops": 1e12}):
        assert TrainConfig(**dict(preset="nano", seq_len=64, batch_tokens=2048) | split).fingerprint() == "ab90b5ee"


def test_micro_batches_and_recomputation_train_like_one_batch(runs_dir):
    """The same data per step whatever the split (so resuming with another split is allowed and exact up to
    summation order); recomputation changes nothing; MFU is reported when the peak FLOP/s is given."""
    # fp32: the claim is about summation order; in bf16 (device "auto" on a GPU) a split changes the rounding
    # of every matmul (seen on an H100: 1.6e-4 relative at step 2)
    base = dict(NANO, steps=4, ckpt_interval=2, eval_interval=100, dtype="fp32")
    Trainer(TrainConfig(**base, run_name="whole"), log=lambda _: None).run()
    split = Trainer(TrainConfig(**base, micro_batch_tokens=256, activation_checkpointing=True, peak_flops=1e12,
                                run_name="split"), log=lambda _: None)
    assert (split.micro_batch, split.grad_accum) == (4, 4)
    split.run(stop_at=2)
    lines = []
    resumed = Trainer(TrainConfig(**base | {"log_interval": 1}, grad_accum=2, run_name="split"), resume=True,
                      log=lines.append)
    summary = resumed.run()
    torch.testing.assert_close([loss for _, loss in train_losses(runs_dir / "split")],
                               [loss for _, loss in train_losses(runs_dir / "whole")], rtol=1e-5, atol=0)
    records = [r for r in read_metrics(runs_dir / "split" / "metrics.jsonl") if r["event"] == "train"]
    # the resumed session names no peak FLOP/s: MFU only where the device's is known (a GPU; seen on an H100)
    assert records[0]["mfu"] > 0 and ("mfu" in records[-1]) == bool(resumed.peak_flops)
    assert resumed.peak_flops != 1e12  # the first session's setting is not carried over
    assert summary["tokens_per_s"] > 0 and any("tok/s" in line and "ETA" in line for line in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a GPU setting")
@pytest.mark.parametrize(("dtype", "precision"), [("fp32", "highest"), ("auto", "high")])
def test_fp32_on_a_gpu_is_strict(runs_dir, dtype, precision):
    """dtype fp32 asks for fp32 arithmetic: no TF32 tensor-core matmuls (the ladder's rungs may run on a GPU)."""
    Trainer(TrainConfig(**NANO, steps=1, device="cuda", dtype=dtype, run_name=f"tf32-{dtype}"), log=lambda _: None)
    assert torch.get_float32_matmul_precision() == precision


def test_runs_record_the_cpu_and_its_bf16_support(runs_dir):
    """Muon's ns_dtype "auto" is bf16 on a CPU with native bf16 and fp32 on one without: the record says which."""
    from lmopt.optim.kernels import fast_matmul_dtype

    trainer = Trainer(TrainConfig(**NANO, steps=1, run_name="cpu-info"), log=lambda _: None)
    cpu = json.loads((trainer.run_dir / "config.json").read_text())["environment"]["cpu"]
    native = fast_matmul_dtype(torch.device("cpu")) == torch.bfloat16
    assert cpu.endswith("(native bf16)" if native else "(no native bf16)") and len(cpu) > len(" (native bf16)")
