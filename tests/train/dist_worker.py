"""Run under torchrun by test_distributed.py: FSDP2 or DDP training of the nano preset on 2 CPU processes (gloo).

``python dist_worker.py MODE STEPS``; the environment chooses among variants (OPTIMIZER, DIST, GRAD_ACCUM).
"""

import json
import os
import sys
import time

import torch

from lmopt.registry import OPTIMIZERS
from lmopt.train import TrainConfig, Trainer, TrainingDiverged

BASE = dict(preset="nano", seq_len=32, batch_tokens=512, eval_interval=100, eval_tokens=2048, log_interval=100,
            ckpt_interval=0, dist="fsdp", threads=1)
RANKS = 2

# Muon's default bf16 Newton-Schulz adds rounding noise that has nothing to do with sharding; the comparison
# with one process runs it in fp32 so that a tolerance can be stated for the distribution logic itself. The same
# for OrthoAdam's rotations, bf16 by default on a CPU with native bf16 products (there, sharded bf16 rotations
# gave losses within 1.2e-5 relative of one process's, above the 1e-5 stated for the sharding alone).
OPTIONS = {"muon": {"ns_dtype": "float32"}, "ortho-adam": {"rotation_dtype": "param"}}
BF16 = ("adamw", "spectra")


def quiet(_):
    pass


def runs_dir() -> str:
    return os.environ["LMOPT_RUNS"]


def every_optimizer(steps: int) -> None:
    for name in OPTIMIZERS.names():
        cfg = TrainConfig(**BASE, optimizer=name, optim=OPTIONS.get(name, {}), steps=steps, run_name=f"fsdp-{name}")
        Trainer(cfg, log=quiet).run()


def record_dtypes(model: torch.nn.Module) -> dict:
    """{module name: [input dtype, output dtype, its own parameters' dtypes]} of each module's first forward."""
    seen: dict = {}

    def hook(name):
        def record(module, inputs, output):
            if name not in seen:
                seen[name] = [str(inputs[0].dtype) if inputs and torch.is_tensor(inputs[0]) else None,
                              str(output.dtype) if torch.is_tensor(output) else None,
                              sorted({str(p.dtype) for p in module.parameters(recurse=False)})]
        return record

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    return seen


def mixed_precision(steps: int) -> None:
    """bf16 autocast under FSDP2, 2 micro-batches per rank and step (gradients reduced in the second's backward
    only); rank 0 records the dtypes every module sees."""
    for name in BF16:
        cfg = TrainConfig(**dict(BASE, dtype="bf16", grad_accum=2), optimizer=name, optim=OPTIONS.get(name, {}),
                          steps=steps, run_name=f"fsdp-bf16-{name}")
        trainer = Trainer(cfg, log=quiet)
        dtypes = record_dtypes(trainer.model)
        trainer.run()
        if trainer.is_main:
            with open(os.path.join(runs_dir(), f"dtypes-fsdp-{name}.json"), "w") as f:
                json.dump(dtypes, f)


def resume(steps: int) -> None:
    """A straight run, and the same run stopped at half-way and resumed (env: OPTIMIZER, DIST, GRAD_ACCUM)."""
    cfg = dict(BASE, optimizer=os.environ.get("OPTIMIZER", "adamw"), steps=steps, ckpt_interval=steps // 2,
               dist=os.environ.get("DIST", "fsdp"), grad_accum=int(os.environ.get("GRAD_ACCUM", 0)))
    Trainer(TrainConfig(**cfg, run_name="straight"), log=quiet).run()
    Trainer(TrainConfig(**cfg, run_name="resumed"), log=quiet).run(stop_at=steps // 2)
    Trainer(TrainConfig(**cfg, run_name="resumed"), resume=True, log=quiet).run()


def rehearsal_config(steps: int) -> dict:
    """A GPU suite's own run settings (Suite.train_config: bf16, torch.compile, its gradient accumulation),
    scaled down for 2 gloo ranks on CPU: only the preset, the data, the device and the sizes change. On a GPU
    machine (scripts/gpu-checks.sh) ``DEVICE=cuda`` runs the same under NCCL, one GPU per rank."""
    from lmopt.bench.suites import SUITES

    suite = SUITES.get(os.environ.get("SUITE", "gpu-134m"))
    settings = suite.train_config("spectra", {}, seed=0, steps=steps, run_name="rehearsal", curve=False)
    seq_len, ranks = 32, int(os.environ.get("WORLD_SIZE", RANKS))
    return settings | {
        "preset": os.environ.get("PRESET", "nano"), "data": "brown", "device": os.environ.get("DEVICE", "cpu"),
        "dist": "fsdp", "threads": 1, "seq_len": seq_len, "batch_tokens": seq_len * ranks * settings["grad_accum"],
        "eval_tokens": 1024,
        "eval_interval": steps, "ckpt_interval": steps // 2, "log_interval": 100,
    }


def rehearsal(steps: int) -> None:
    """The GPU configuration end to end on CPU: straight, and stopped at half-way then resumed."""
    cfg = rehearsal_config(steps)
    Trainer(TrainConfig(**cfg | {"run_name": "rehearsal-straight"}), log=quiet).run()
    Trainer(TrainConfig(**cfg | {"run_name": "rehearsal-resumed"}), log=quiet).run(stop_at=steps // 2)
    Trainer(TrainConfig(**cfg | {"run_name": "rehearsal-resumed"}), resume=True, log=quiet).run()


ODD_MODEL = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class OddLM(nn.Module):
    \"\"\"Matrices with odd first dimensions (133 x 67, 67 x 133): FSDP2 shards them unevenly over 2 ranks.\"\"\"

    def __init__(self, vocab_size, d=67, hidden=133, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make(vocab_size):
    return OddLM(vocab_size)
"""
UNEVEN = ("muon", "spectra")


def uneven_config(name: str, steps: int, **settings) -> TrainConfig:
    """A user's model (``odd_model:make``, written by the test) whose matrices shard unevenly, in bf16."""
    return TrainConfig(**dict(BASE, model="odd_model:make", dtype="bf16", grad_accum=2, optimizer=name,
                              optim=OPTIONS.get(name, {}), steps=steps, run_name=f"uneven-{name}") | settings)


def uneven(steps: int) -> None:
    for name in UNEVEN:
        Trainer(uneven_config(name, steps), log=quiet).run()


def nan_on_one_rank(steps: int) -> None:
    trainer = Trainer(TrainConfig(**dict(BASE, steps=steps, ckpt_interval=2, run_name="nan")), log=quiet)
    rank = int(os.environ["RANK"])

    def poison(module, inputs, output):
        return output * float("nan") if rank == 1 and trainer.step >= 3 else output

    trainer.model.norm.register_forward_hook(poison)
    try:
        trainer.run()
        outcome = "finished"
    except TrainingDiverged as err:
        outcome = str(err)
    with open(os.path.join(runs_dir(), f"nan-rank{rank}.json"), "w") as f:
        json.dump({"outcome": outcome}, f)


def raise_on_one_rank(steps: int) -> None:
    """Rank 1 raises in the forward of step 2, in the way ``lmopt train`` runs (:meth:`Trainer.run_and_close`);
    the exception leaves this script, as it leaves the CLI."""
    rank = int(os.environ["RANK"])
    cfg = TrainConfig(**dict(BASE, dist=os.environ.get("DIST", "fsdp"), steps=steps, run_name="fail"))
    trainer = Trainer(cfg, log=quiet)

    def boom(module, inputs, output):
        if rank == 1 and trainer.step >= 1:
            with open(os.path.join(runs_dir(), "failed-at"), "w") as f:
                f.write(str(time.time()))
            raise RuntimeError("injected failure on rank 1 at step 2")
        return output

    trainer.model.norm.register_forward_hook(boom)
    trainer.run_and_close()


if __name__ == "__main__":
    torch.manual_seed(0)
    {"every_optimizer": every_optimizer, "resume": resume, "nan": nan_on_one_rank, "raise": raise_on_one_rank,
     "bf16": mixed_precision, "rehearsal": rehearsal,
     "uneven": uneven}[sys.argv[1]](int(sys.argv[2]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Everything the tests check is written by now. Skip the interpreter's teardown: on rare runs a gloo
    # background thread is destroyed while joinable there ("terminate called without an active exception",
    # SIGABRT after the work has finished), which would fail the launch for a reason outside lmopt.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
