"""The training loop: one process on CPU or GPU, or one rank of a DDP / FSDP2 job under torchrun.

A run lives in ``$LMOPT_RUNS/<run_name>/``: ``config.json`` (the resolved config and the environment that
ran it), ``metrics.jsonl`` (see :mod:`lmopt.train.metrics`), ``summary.json`` and ``checkpoints/``.

Mixed precision (``dtype`` bf16, the default on GPU) is the same in every mode: fp32 weights, gradients,
optimizer state and gradient reductions; ``torch.autocast`` runs the matmuls (and attention) in bf16, while the
embedding, the RMSNorms, the residual stream and the softmax of the loss stay fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import lmopt
from lmopt.data import eval_batches
from lmopt.data.paths import atomic_write_text, runs_home
from lmopt.model.parallelize import gradient_sync, init_distributed, parallelize, resolve_mode, world_from_env
from lmopt.optim.kernels import fast_matmul_dtype
from lmopt.train.build import load_data, make_loader, make_model, make_optimizer, make_scheduler
from lmopt.train.callbacks import Callback, ProgressBar, make_loggers, wants_bar
from lmopt.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmopt.train.config import ConfigError, TrainConfig
from lmopt.train.memory import auto_micro_batch, peak_flops
from lmopt.train.metrics import MetricsWriter, NullMetrics, read_metrics
from lmopt.train.rundir import RunFolder, plan_run_folder, run_path


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no GPU; use --device cpu or auto")
    return torch.device(name)


def git_commit() -> str:
    """The package's git commit (``-dirty`` with uncommitted tracked changes), or ``$LMOPT_COMMIT`` where it is
    set: a copy of the tree on another machine (a lent GPU) whose ``.git``, if any, is not the tree's."""
    if os.environ.get("LMOPT_COMMIT"):
        return os.environ["LMOPT_COMMIT"]
    try:
        root = Path(lmopt.__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def cpu_description() -> str:
    """The CPU's model and whether it multiplies bf16 natively (what ``ns_dtype="auto"`` and the like depend on:
    the same run resolves differently on an AVX2 CPU and on one with AVX-512 BF16 or AMX)."""
    name = ""
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    native = fast_matmul_dtype(torch.device("cpu")) == torch.bfloat16
    return f"{name or platform.processor() or platform.machine()} ({'native' if native else 'no native'} bf16)"


class Trainer:
    """One run: built from its config (lmopt.train.build), then the loop. ``callbacks`` (rank 0 only) see every
    metrics record and each step's end (lmopt.train.callbacks); the loggers ``cfg.loggers`` names and, on a
    terminal, the progress bar are added to them."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, overwrite: bool = False,
                 log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> None:
        self.rank, self.world_size, local_rank = world_from_env()
        self.cfg = cfg.validate(self.world_size)
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda _: None)
        self.callbacks: list[Callback] = list(callbacks) if self.is_main else []
        if cfg.spectrum_interval and not any(getattr(c, "measures_spectra", False) for c in callbacks):
            raise ConfigError("spectrum_interval needs lmopt.analysis.SpectrumRecorder among the trainer's callbacks "
                              "(`lmopt train` adds it)")
        if self.is_main:
            self.callbacks += make_loggers(cfg.logger_names())  # a missing package fails before anything is written
            if cfg.progress == "bar" or (log is print and wants_bar(cfg.progress)):
                bar = ProgressBar()
                self.callbacks.append(bar)
                self.log = bar.print if log is print else log
        self.live_progress = any(isinstance(c, ProgressBar) for c in self.callbacks)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.mode = resolve_mode(cfg.dist, self.world_size)
        if self.mode != "none":
            if "WORLD_SIZE" not in os.environ:
                raise ConfigError(f"dist {cfg.dist!r} needs several processes: launch with torchrun")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            init_distributed(self.device)
            if cfg.spectrum_interval:
                raise ConfigError("spectrum_interval is single-process only; use `lmopt spectrum` on a checkpoint")
        if self.device.type == "cuda":  # TF32 tensor cores for fp32 matmuls, unless the run asks for strict fp32
            torch.set_float32_matmul_precision("highest" if cfg.dtype == "fp32" else "high")
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.total_steps = cfg.num_steps()
        self.run_dir = run_path(runs_home(), cfg.run_name or cfg.default_run_name())
        # Decide how the run folder will be used and check it, writing nothing yet.
        checkpoint = plan_run_folder(self.run_dir, resume, overwrite, self.cfg.fingerprint(), self.log)

        # Build everything (and fail on bad names or options) before anything is written or deleted.
        self.data = self._load_data()
        self.model = make_model(cfg, self.data.vocab_size, self.device)  # identical on every rank
        self.micro_batch, self.grad_accum = self._micro_batching()
        self.wrapped = parallelize(self.model, self.mode, self.device)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = make_optimizer(cfg, self.model, self.total_steps)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total_steps)
        self.loader = make_loader(cfg, self.data, self.rank, self.world_size)
        self.peak_flops = cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(self.device))
                                             if self.device.type == "cuda" else None)
        self._session_steps, self._session_seconds = 0, 0.0
        self._session_step_times: list[float] = []  # without the compilation step
        self._session_optimizer_times: list[float] = []  # the same steps' optimizer.step + zero_grad + schedule
        self._optimizer_started = 0.0
        self.step, self.tokens = 0, 0
        self.val_history: list[tuple[int, int, float]] = []
        self.resumed_from: Path | None = None

        # Only now claim the folder: lock it, and clear it when starting afresh.
        self._folder: RunFolder | None = None
        if self.is_main:
            self._folder = RunFolder(self.run_dir, fresh=checkpoint is None, log=self.log)
        self._barrier()
        try:
            if checkpoint is not None:
                state = self._load(checkpoint)
                self.loader.load_state_dict(state["data"])
                self.step, self.tokens = state["step"], state["tokens"]
                self.val_history = [tuple(v) for v in state["val_history"]]
                self.resumed_from = checkpoint
            resume_step = self.step if self.resumed_from else None
            self.metrics = (MetricsWriter(self.run_dir / "metrics.jsonl", resume_step, log=self.log) if self.is_main
                            else NullMetrics())
            self._write_run_config()
            for callback in self.callbacks:
                callback.on_start(self)
        except BaseException:
            self._close_callbacks(failed=True)
            self._release_run_dir(failed=checkpoint is None)
            raise

    # --- set-up ---------------------------------------------------------------------------------------------

    def _load_data(self):
        """The prepared data; under torchrun rank 0 prepares (if needed) and checks the shards' SHA-256 first,
        then the other ranks open them unchecked (one preparation, one check per job)."""
        if self.mode == "none":
            return load_data(self.cfg)
        data = load_data(self.cfg) if self.is_main else None
        self._barrier()
        return data if self.is_main else load_data(self.cfg, auto_prepare=False, verify=False)

    def _micro_batching(self) -> tuple[int, int]:
        """(sequences per forward pass, micro-batches per step) on this rank; the micro-batch is chosen from
        the GPU's memory when neither grad_accum nor micro_batch_tokens is set (lmopt.train.memory)."""
        cfg, auto = self.cfg, None
        if cfg.auto_micro_batch() and self.device.type == "cuda":
            dtype = "bf16" if self.autocast_dtype is not None else "fp32"
            auto = auto_micro_batch(cfg.preset, cfg.seq_len, cfg.rank_sequences(self.world_size), cfg.optimizer,
                                    dtype, cfg.activation_checkpointing,
                                    torch.cuda.get_device_properties(self.device).total_memory,
                                    fsdp_ranks=self.world_size if self.mode == "fsdp" else 1)
        micro = cfg.micro_batch_size(self.world_size, auto)
        return micro, cfg.rank_sequences(self.world_size) // micro

    def _release_run_dir(self, failed: bool = False) -> None:
        if self._folder is not None:
            self._folder.release(failed)
            self._folder = None

    def _load(self, checkpoint: Path) -> dict:
        try:
            return load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot load checkpoint {checkpoint}: {first_line}") from err

    def _write_run_config(self) -> None:
        train_tokens = len(self.data.train)
        info = {
            "config": self.cfg.to_dict(),
            "resolved": {
                "tokenizer": self.cfg.resolved_tokenizer(),
                "steps": self.total_steps,
                "micro_batch_size": self.micro_batch,
                "grad_accum": self.grad_accum,
                "world_size": self.world_size,
                "dist": self.mode,
                "params": self.model.num_params(),
                "non_embedding_params": self.model.num_params(non_embedding=True),
                "train_tokens_available": train_tokens,
                "epochs": self.total_steps * self.cfg.batch_tokens / self.loader.tokens_per_epoch,
                "fingerprint": self.cfg.fingerprint(),
            },
            "environment": {
                "lmopt": lmopt.__version__,
                "commit": git_commit(),
                "torch": torch.__version__,
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor(),
                "peak_flops": self.peak_flops,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "cpu": cpu_description(),
            },
        }
        if self.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(info, indent=2))
        self.run_info = info

    # --- the loop -------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x sequences, sequences)
        for x, y in eval_batches(self.data.val, self.cfg.seq_len, self.micro_batch, self.cfg.eval_tokens, self.rank,
                                 self.world_size):
            with self._autocast():
                _, loss = self.forward(self._to_device(x), self._to_device(y))
            sums += torch.stack([loss.detach().double() * x.shape[0], torch.tensor(x.shape[0], device=self.device)])
        self.model.train()
        sums = self._all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.mode != "none":
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "mean":
                t /= self.world_size
        return t

    def _barrier(self) -> None:
        if self.mode != "none":
            import torch.distributed as dist

            dist.barrier()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)  # pinned: the copy overlaps with compute

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm) before the update.

        Gradients are reduced across ranks only in the last micro-batch's backward."""
        accum = self.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        inputs, targets = self.loader.next_batch()  # this rank's sequences of the step
        for i in range(accum):
            lo, hi = i * self.micro_batch, (i + 1) * self.micro_batch
            x, y = self._to_device(inputs[lo:hi]), self._to_device(targets[lo:hi])
            with gradient_sync(self.wrapped, self.mode, sync=i == accum - 1):
                with self._autocast():
                    _, loss = self.forward(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # every rank sees the same mean loss, so a NaN on any rank stops all of them at the same step
        loss_value = self._all_reduce((loss_sum / accum).detach().clone(), op="mean").item()
        norm_value = grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._diverged(loss_value, norm_value)
        self._optimizer_started = time.perf_counter()  # the .item() reads above waited for the GPU
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, norm_value

    def _diverged(self, loss: float, grad_norm: float) -> None:
        last = latest_checkpoint(self.run_dir)
        where = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
        message = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.step + 1} "
                   f"(loss {loss}, grad norm {grad_norm}); stopped before updating the weights; {where}. "
                   "Lower the learning rate or raise warm-up, then resume or restart.")
        self.record("diverged", step=self.step + 1, tokens=self.tokens, train_loss=loss, grad_norm=grad_norm)
        self._stop(message)

    def _stop(self, message: str) -> None:
        """End a diverged run (every rank reaches this at the same step: the checks are collective)."""
        self.metrics.close()
        self.close()
        raise TrainingDiverged(message)

    def record(self, event: str, **fields: Any) -> None:
        """Write a metrics record (metrics.jsonl) and show it to the callbacks."""
        self.metrics.write(event, **fields)
        for callback in self.callbacks:
            callback.on_record(self, event, fields)

    def _close_callbacks(self, failed: bool) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                callback.on_close(self, failed)

    def _record_eval(self) -> None:
        val = self.evaluate()
        self.val_history.append((self.step, self.tokens, val))
        self.record("eval", step=self.step, tokens=self.tokens, val_loss=val)
        self.log(f"step {self.step:>6}/{self.total_steps} | val loss {val:.4f}")

    def _state_is_finite(self) -> bool:
        """Whether every weight and every floating-point optimizer state tensor is finite, on every rank."""
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.is_floating_point()]
        bad = torch.zeros((), device=self.device)
        for t in tensors:
            local = t.to_local() if hasattr(t, "to_local") else t
            bad += (~torch.isfinite(local)).any().to(bad.device)
        return self._all_reduce(bad).item() == 0

    def _save(self) -> None:
        """Checkpoint, only from finite weights and optimizer state (else stop as diverged, saving nothing)."""
        if not self._state_is_finite():
            last = latest_checkpoint(self.run_dir)
            where = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
            self.record("diverged", step=self.step, tokens=self.tokens, reason="non-finite weights")
            self._stop(f"non-finite weights or optimizer state after the update of step {self.step}; not saved; "
                       f"{where}. Lower the learning rate or weight decay, then resume or restart.")
        state = {"tokens": self.tokens, "data": self.loader.state_dict(), "fingerprint": self.cfg.fingerprint(),
                 "val_history": self.val_history}
        if self.mode == "ddp":  # replicated state: rank 0 writes, the others wait
            if self.is_main:
                save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state,
                                keep=self.cfg.keep_checkpoints)
            self._barrier()
            return
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state,
                        keep=self.cfg.keep_checkpoints, distributed=self.mode == "fsdp")

    def _log_header(self) -> None:
        cfg, resolved = self.cfg, self.run_info["resolved"]
        self.log(f"run {self.run_dir}")
        lr = self.optimizer.param_groups[0].get("initial_lr", self.optimizer.param_groups[0]["lr"])
        self.log(f"model {cfg.preset}: {resolved['params']:,} params ({resolved['non_embedding_params']:,} "
                 f"non-embedding) | optimizer {cfg.optimizer} lr {lr:g} | device {self.device}")
        self.log(f"data {cfg.data}.{resolved['tokenizer']}: {resolved['train_tokens_available']:,} train tokens; "
                 f"{self.total_steps} steps x {cfg.batch_tokens:,} tokens = {resolved['epochs']:.2f} epochs "
                 f"({self.grad_accum} x {self.micro_batch} sequences per rank and step, {self.world_size} rank(s))")
        if self.resumed_from:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")

    def _throughput(self, seconds_per_step: float) -> dict:
        """tokens/s; MFU (model FLOPs, recomputation not counted) when the peak is known; peak GPU memory."""
        tokens_per_s = self.cfg.batch_tokens / seconds_per_step
        out = {"tokens_per_s": tokens_per_s}
        if self.peak_flops:
            out["mfu"] = self.model.estimate_mfu(tokens_per_s / self.world_size, self.cfg.seq_len, self.peak_flops)
        if self.device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def _timed_step(self, start: float) -> None:
        """One training step, its metrics record and (every log_interval) the progress line. With compile on,
        the session's first step compiles: it is recorded (``compile``: true) but left out of every rate."""
        cfg = self.cfg
        compiling = cfg.compile and self._session_steps == 0
        t0 = time.perf_counter()
        loss, grad_norm = self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        dt, optimizer_time = end - t0, end - self._optimizer_started
        self.step, self.tokens = self.step + 1, self.tokens + cfg.batch_tokens
        self._session_steps, self._session_seconds = self._session_steps + 1, self._session_seconds + dt
        if not compiling:
            self._session_step_times.append(dt)
            self._session_optimizer_times.append(optimizer_time)
        lr = self.scheduler.get_last_lr()[0]
        self.record("train", step=self.step, tokens=self.tokens, train_loss=loss, lr=lr, grad_norm=grad_norm,
                           step_time=dt, optimizer_time=optimizer_time, **self._throughput(dt),
                           elapsed=time.time() - start,
                           **({"compile": True} if compiling else {}))
        if (self.step % cfg.log_interval == 0 or self.step == self.total_steps) and not self.live_progress:
            line = f"step {self.step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f}"
            if self._session_step_times:
                mean = sum(self._session_step_times) / len(self._session_step_times)
                rates = self._throughput(mean)
                line += f" | {rates['tokens_per_s']:,.0f} tok/s | {1 / mean:.2f} steps/s"
                line += f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else ""
                line += f" | mem {rates['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in rates else ""
                line += f" | ETA {format_duration((self.total_steps - self.step) * mean)}"
            else:
                line += " | compiling (not timed)"
            self.log(line)

    def run(self, stop_at: int | None = None) -> dict:
        """Train to the end (or, with ``stop_at``, to that step, checkpointing there); returns the summary."""
        cfg = self.cfg
        last_step = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        self._log_header()
        if self.step == 0:
            self._record_eval()
        start = time.time()
        while self.step < last_step:
            self._timed_step(start)
            if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                self._record_eval()
            if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or self.step == last_step:
                self._save()
            for callback in self.callbacks:
                callback.on_step_end(self)
        summary = self.summary(self._session_seconds) | {"complete": self.step >= self.total_steps}
        if summary["complete"] and self.is_main:
            self.record("end", **summary)
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.metrics.close()
        self._close_callbacks(failed=False)
        self._release_run_dir()
        return summary

    def run_and_close(self) -> dict:
        """:meth:`run` to the end, then :meth:`close`; after a failure, close without waiting for other ranks."""
        try:
            summary = self.run()
        except TrainingDiverged:
            raise  # already closed collectively
        except BaseException:
            self.close(failed=True)
            raise
        self.close()
        return summary

    def close(self, failed: bool = False) -> None:
        """Release the run and leave the process group (the trainer that joined it).

        After a failure on this rank (``failed``) there is no barrier: the other ranks may be inside a collective
        that this one will never join, and waiting for them would hang the job. NCCL's communicators are aborted
        (so that nothing in this process waits for the other ranks either); the process then exits with the
        error, and torchrun stops the other ranks at once. gloo needs no abort: its peers see the connection
        close and fail too.
        """
        self._close_callbacks(failed)
        self._release_run_dir()
        if self.mode == "none":
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if failed:
            if dist.get_backend() == "nccl":
                with contextlib.suppress(Exception):  # experimental API; the process exits next in any case
                    dist.distributed_c10d._abort_process_group()
            return
        dist.barrier()  # every rank reaches the end (or the same diverged step) before teardown
        dist.destroy_process_group()

    def summary(self, seconds: float) -> dict:
        """The run's results; the median step time is over the whole run on rank 0 (from its metrics file,
        resumed sessions included) and over this session elsewhere, compilation steps left out."""
        first, final = self.val_history[0][2], self.val_history[-1][2]
        if self.is_main:
            records = read_metrics(self.run_dir / "metrics.jsonl")
            step_times = sorted(r["step_time"] for r in records if r["event"] == "train" and not r.get("compile"))
        else:
            step_times = sorted(self._session_step_times)
        median = step_times[len(step_times) // 2] if step_times else float("nan")
        return {
            "run": self.run_dir.name,
            "steps": self.step,
            "tokens": self.tokens,
            "initial_val_loss": first,
            "final_val_loss": final,
            "best_val_loss": min(v for _, _, v in self.val_history),
            "val_curve": [list(v) for v in self.val_history],
            "median_step_time": median,
            "tokens_per_s": self.cfg.batch_tokens / median if step_times else float("nan"),
            **({k: v for k, v in self._throughput(median).items() if k != "tokens_per_s"} if step_times else {}),
            "train_seconds_this_session": seconds,
        }


def train(cfg: TrainConfig, resume: bool | str = False, overwrite: bool = False,
          log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> dict:
    return Trainer(cfg, resume=resume, overwrite=overwrite, log=log, callbacks=callbacks).run_and_close()
