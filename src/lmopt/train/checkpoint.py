"""Checkpoints: written atomically, read without unpickling arbitrary objects.

Layout of ``<run>/checkpoints/step_00000100/``:

    model.safetensors   the model's parameters (safetensors)                      single process and DDP
    optimizer.pt        optimizer and lr-scheduler state_dicts (tensors and plain values: weights_only load)
    dcp/                model and optimizer state, sharded, by torch.distributed.checkpoint   FSDP2 runs
                        (optimizer.pt then holds only the scheduler)
    rng.pt              torch CPU RNG state (and the writing process's CUDA device's: a resume on fewer GPUs
                        restores it to its own device)
    trainer.json        step, tokens seen, data-loader position, config fingerprint
    manifest.json       size and SHA-256 of every file above, written last

The directory is written as ``.tmp-step_...`` and renamed into place, then ``<run>/checkpoints/latest`` (a
file naming it) is replaced atomically, so a crash at any moment leaves the previous checkpoint whole. On
resume, :func:`usable_checkpoints` lists the checkpoints newest first (the one ``latest`` names, then the other
``step_*`` folders, so a lost or dangling pointer does not restart a run from zero) and :func:`verify_checkpoint`
checks each against its manifest; the trainer takes the newest that verifies and says why it skipped others.

A ``dcp/`` checkpoint stores state by parameter name, unsharded on disk, so it loads on any number of ranks,
a single process included (``torch.distributed.checkpoint`` reshards on load).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmopt.data.paths import atomic_write_text


def save_model_tensors(model: torch.nn.Module, path: Path) -> None:
    """The model's state_dict as safetensors; a tensor reachable under several names (tied weights, e.g. a head
    that is the embedding) is stored once, its other names kept in the file's metadata (``aliases``)."""
    tensors, aliases, first_name = {}, {}, {}
    for name, value in model.state_dict().items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = value.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)} if aliases else None)


def load_model_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state_dict :func:`save_model_tensors` wrote, aliases restored."""
    state = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    keep: int = 2,
    distributed: bool = False,
) -> Path:
    """Write a checkpoint (every rank calls this when ``distributed``; rank 0 writes the small files)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    main = not distributed or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        import torch.distributed.checkpoint as dcp  # 1.5 s to import: only FSDP2 runs need it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        dist.barrier()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp / "dcp"))
        dist.barrier()
        if not main:
            dist.barrier()  # wait for rank 0 to move the checkpoint into place
            return final
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    else:
        save_model_tensors(model, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only, so a resume on fewer GPUs restores it too
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state | {"step": step}, indent=2))
    (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    _prune(root, keep)
    if distributed:
        dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of checkpoint ``path`` matches its manifest; otherwise what is wrong, naming the file."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing" if (path / "trainer.json").exists() else f"{path} is incomplete"
    except (OSError, ValueError) as err:
        return f"{path / MANIFEST} is unreadable ({err})"
    for name, expected in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != expected["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated or damaged)"
        if _sha256(f) != expected["sha256"]:
            return f"{f} does not match its SHA-256 in the manifest (damaged)"
    return None


def usable_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, newest first: the one ``latest`` names, then the other ``step_*``."""
    root = checkpoint_root(run_dir)
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    try:
        named = root / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    candidates = usable_checkpoints(run_dir)
    return candidates[0] if candidates else None


def read_trainer_state(path: Path) -> dict:
    """``trainer.json`` of a checkpoint (small; read before any weights are loaded)."""
    state = json.loads((Path(path) / "trainer.json").read_text())
    missing = {"step", "tokens", "data", "fingerprint", "val_history"} - set(state)
    if missing:
        raise ValueError(f"{Path(path) / 'trainer.json'} lacks {', '.join(sorted(missing))}")
    return state


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the trainer state."""
    path = Path(path)
    device = next(model.parameters()).device
    if (path / "dcp").exists():  # saved by an FSDP2 run: reshard onto however many ranks load it
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        if any(hasattr(p, "full_tensor") for p in model.parameters()):
            raise ValueError(f"{path} is a single-process (or DDP) checkpoint; resume it in one process or with "
                             "--dist ddp, not under FSDP2")
        model.load_state_dict(load_model_tensors(path / "model.safetensors", device))
    states = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    if "optimizer" in states:
        optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        cuda_state = rng["cuda"]
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints: one state per visible device
            cuda_state = cuda_state[min(torch.cuda.current_device(), len(cuda_state) - 1)]
        torch.cuda.set_rng_state(cuda_state)
    return json.loads((path / "trainer.json").read_text())
