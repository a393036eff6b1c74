"""Run under torchrun by test_distributed.py: FSDP2 training of the nano preset on 2 CPU processes (gloo)."""

import json
import os
import sys

import torch

from lmopt.registry import OPTIMIZERS
from lmopt.train import TrainConfig, Trainer, TrainingDiverged

BASE = dict(preset="nano", seq_len=32, batch_tokens=512, eval_interval=100, eval_tokens=2048, log_interval=100,
            ckpt_interval=0, dist="fsdp", threads=1)


# Muon's default bf16 Newton-Schulz adds rounding noise that has nothing to do with sharding; the comparison
# with one process runs it in fp32 so that a tolerance can be stated for the distribution logic itself.
OPTIONS = {"muon": {"ns_dtype": "float32"}}


def quiet(_):
    pass


def every_optimizer(steps: int) -> None:
    for name in OPTIMIZERS.names():
        cfg = TrainConfig(**BASE, optimizer=name, optim=OPTIONS.get(name, {}), steps=steps, run_name=f"fsdp-{name}")
        Trainer(cfg, log=quiet).run()


def resume(steps: int) -> None:
    cfg = dict(BASE, optimizer=os.environ.get("OPTIMIZER", "adamw"), steps=steps, ckpt_interval=steps // 2)
    Trainer(TrainConfig(**cfg, run_name="straight"), log=quiet).run()
    Trainer(TrainConfig(**cfg, run_name="resumed"), log=quiet).run(stop_at=steps // 2)
    Trainer(TrainConfig(**cfg, run_name="resumed"), resume=True, log=quiet).run()


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
    with open(os.path.join(os.environ["LMOPT_RUNS"], f"nan-rank{rank}.json"), "w") as f:
        json.dump({"outcome": outcome}, f)


if __name__ == "__main__":
    torch.manual_seed(0)
    {"every_optimizer": every_optimizer, "resume": resume, "nan": nan_on_one_rank}[sys.argv[1]](int(sys.argv[2]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Everything the tests check is written by now. Skip the interpreter's teardown: on rare runs a gloo
    # background thread is destroyed while joinable there ("terminate called without an active exception",
    # SIGABRT after the work has finished), which would fail the launch for a reason outside lmopt.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
