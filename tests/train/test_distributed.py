"""Real torch.distributed (gloo, 2 CPU processes under torchrun) against single-process training.

Tolerances: FSDP2 reduce-scatters the gradient in a different summation order than one process's backward,
so gradients agree to ~1e-7 relative (fp32), and normalising optimizers keep that at ~1e-7 in the weights per
step: atol 1e-5 on the weights and rtol 1e-5 on the losses after 3 steps. Muon runs its Newton-Schulz in
fp32 here (dist_worker.OPTIONS): in bf16 a one-ulp flip (2^-8 relative) of an update element is noise of the
precision, not of the sharding, and it is amplified by the AdamW-driven embedding's sign-like first steps.

The same amplification can hit a handful of embedding entries under any Adam-type update: an entry whose
gradient is a near-cancelling sum (the tied embedding gets both input and output gradients) keeps only a few
correct bits once the summation order changes, and Adam's normalisation turns that into an O(lr) difference.
Which entries, if any, depends on the CPU's GEMM kernels. So the weights must agree to 1e-5 everywhere except
at most 1 in 2,000 entries of a tensor, and those within the size of the steps taken (3 steps of at most 2 lr);
a sharding error (a wrong shard, a missing reduction) moves whole rows or shards, far beyond both limits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmopt.model import build_model, get_preset
from lmopt.optim import build
from lmopt.registry import OPTIMIZERS
from lmopt.train import TrainConfig, Trainer
from lmopt.train.checkpoint import latest_checkpoint, load_checkpoint
from lmopt.train.metrics import read_metrics
from tests.train.dist_worker import BASE, OPTIONS

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def torchrun(runs: Path, *args: str, env: dict | None = None, nproc: int = 2) -> None:
    environment = os.environ | {"LMOPT_RUNS": str(runs), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | (env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), *args]
    result = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


def single_process(runs: Path, name: str, steps: int) -> Trainer:
    cfg = dict(BASE, dist="none", optimizer=name, optim=OPTIONS.get(name, {}), steps=steps,
               run_name=f"single-{name}")
    trainer = Trainer(TrainConfig(**cfg), log=lambda _: None)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    torchrun(runs, "every_optimizer", "3")
    return runs


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_fsdp2_matches_single_process(fsdp_runs, monkeypatch, name):
    monkeypatch.setenv("LMOPT_RUNS", str(fsdp_runs))
    reference = single_process(fsdp_runs, name, 3)
    torch.testing.assert_close(losses(fsdp_runs / f"fsdp-{name}"), losses(fsdp_runs / f"single-{name}"),
                               rtol=1e-5, atol=0)
    # the FSDP2 run's sharded (DCP) checkpoint, loaded into one process: same weights as the reference
    model = build_model(get_preset("nano").config, seed=0)
    optimizer = build(name, model, total_steps=3, **OPTIONS.get(name, {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoint = latest_checkpoint(fsdp_runs / f"fsdp-{name}")
    assert (checkpoint / "dcp").is_dir()
    load_checkpoint(checkpoint, model, optimizer, scheduler)
    lr = max(group.get("initial_lr", group["lr"]) for group in reference.optimizer.param_groups)
    for (key, p), q in zip(model.named_parameters(), reference.model.parameters(), strict=True):
        assert_weights_agree(key, p.detach(), q.detach(), max_step=3 * 2 * lr)


def assert_weights_agree(key: str, p: torch.Tensor, q: torch.Tensor, max_step: float) -> None:
    diff = (p - q).abs()
    off = int((diff > 1e-5).sum())
    assert off <= p.numel() / 2000, f"{key}: {off} of {p.numel()} entries differ by more than 1e-5"
    assert diff.max() <= max_step, f"{key}: largest difference {diff.max():.3g} exceeds 3 steps ({max_step:.3g})"


@pytest.mark.parametrize("name", ["adamw", "spectra"])
def test_fsdp2_resume_is_exact_and_loads_on_one_rank(tmp_path, monkeypatch, name):
    torchrun(tmp_path, "resume", "6", env={"OPTIMIZER": name})
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 6 and straight == resumed  # 2 ranks -> checkpoint -> 2 ranks: bit-exact
    # the 2-rank checkpoint of step 3 continued by a single process
    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path))
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step_00000003")
    cfg = dict(BASE, dist="none", optimizer=name, steps=6, ckpt_interval=3, run_name="resumed")
    trainer = Trainer(TrainConfig(**cfg), resume=True, log=lambda _: None)
    assert trainer.step == 3
    trainer.run()
    torch.testing.assert_close(losses(tmp_path / "resumed"), straight, rtol=1e-5, atol=0)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    torchrun(tmp_path, "nan", "6")
    outcomes = [json.loads((tmp_path / f"nan-rank{r}.json").read_text())["outcome"] for r in range(2)]
    for outcome in outcomes:
        assert "non-finite loss at step 4" in outcome and "step_00000002" in outcome
    assert latest_checkpoint(tmp_path / "nan").name == "step_00000002"
