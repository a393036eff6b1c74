"""A user's own model (``--model package.module:factory``) through lmopt's trainer: trained, checkpointed,
resumed, with lmopt's optimizers split by structure; bad references fail before the run folder is made."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lmopt.train import ConfigError, TrainConfig, Trainer
from lmopt.train.metrics import read_metrics

MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyLM(nn.Module):
        """A small pre-norm transformer LM of the user's own: ids (B, T) -> logits (B, T, V)."""

        def __init__(self, vocab_size, d=64, layers=2):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, d)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab_size, bias=False)
            self.head.weight = self.wte.weight  # tied

        def forward(self, idx):
            T = idx.shape[1]
            mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
            x = self.wte(idx)
            for block in self.blocks:
                x = block(x, src_mask=mask, is_causal=True)
            return self.head(self.ln(x))


    def make(vocab_size):
        return TinyLM(vocab_size)


    def not_a_model():
        return 42
''')

BASE = dict(preset="nano", seq_len=64, batch_tokens=1024, steps=6, eval_interval=3, eval_tokens=2048,
            log_interval=100, ckpt_interval=3)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_users_model_trains_and_resumes_exactly(runs_dir, user_module, optimizer):
    cfg = TrainConfig(**BASE, model="my_models:make", optimizer=optimizer, run_name=f"own-{optimizer}")
    whole = Trainer(cfg, overwrite=True, log=lambda _: None).run()
    assert whole["final_val_loss"] < whole["initial_val_loss"]
    info = json.loads((runs_dir / f"own-{optimizer}" / "config.json").read_text())
    assert info["resolved"]["params"] == 8192 * 64 + info["resolved"]["non_embedding_params"]  # tied: counted once

    first = Trainer(TrainConfig(**{**cfg.to_dict(), "run_name": f"split-{optimizer}"}), log=lambda _: None)
    first.run(stop_at=3)
    resumed = Trainer(TrainConfig(**{**cfg.to_dict(), "run_name": f"split-{optimizer}"}), resume=True,
                      log=lambda _: None).run()
    assert resumed["final_val_loss"] == whole["final_val_loss"]

    def losses(name):
        return [r["train_loss"] for r in read_metrics(runs_dir / name / "metrics.jsonl") if r["event"] == "train"]

    assert losses(f"split-{optimizer}") == losses(f"own-{optimizer}")


def test_the_cli_trains_a_users_model_by_reference(runs_dir, user_module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")]))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in BASE.items()]
    out = subprocess.run([sys.executable, "-m", "lmopt.cli", "train", *args, "--model", "my_models:make",
                          "--optimizer", "spectra", "--run-name", "cli-own"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads((runs_dir / "cli-own" / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]


@pytest.mark.parametrize(("reference", "message"), [
    ("my_models:missing", "cannot load model 'my_models:missing'"),
    ("my_models:not_a_model", "returned int, not a torch.nn.Module"),
    ("my_models", "must be package.module:factory"),
])
def test_a_bad_model_reference_fails_before_the_run_folder_is_made(runs_dir, user_module, reference, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(TrainConfig(**BASE, model=reference, run_name="bad"), log=lambda _: None)
    assert not (runs_dir / "bad").exists()
