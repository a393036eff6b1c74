"""A run's own folder: where it is, who owns it, and what may be deleted.

The rules that keep a user's files safe:

* A run name is a relative path of safe components (``[A-Za-z0-9_][A-Za-z0-9._+=:-]*`` each, at most 8 of them,
  no ``.``/``..``, no absolute paths), so a run folder always lies strictly inside ``$LMOPT_RUNS``.
* A folder is only ever deleted (``--overwrite``) when it is an lmopt run (it holds the ``.lmopt-run``
  marker, or the ``config.json`` + ``metrics.jsonl`` of an older lmopt) or is empty; a folder of anything
  else is refused, whatever the flags.
* One process per run: an exclusive ``flock`` on ``<run>/.lock`` (which records the owner's pid), released by
  the kernel when the owner dies, so a stale lock cannot block anyone.
* Leftovers of a crash (``.tmp-step_*`` checkpoints, ``.*.tmp-<pid>`` files) are removed when the run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from lmopt.train.checkpoint import read_trainer_state, usable_checkpoints, verify_checkpoint
from lmopt.train.errors import ConfigError

MARKER = ".lmopt-run"
LOCK = ".lock"
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=:-]{0,127}")
MAX_COMPONENTS = 8


class RunDirError(ConfigError):
    """A run name or run folder that lmopt refuses to use."""


class RunBusyError(RunDirError):
    """Another process owns the run."""


def check_run_name(name: str) -> str:
    """``name`` if it is a safe relative run name; :class:`RunDirError` saying what is wrong otherwise."""
    parts = name.split("/")
    bad = [p for p in parts if not _COMPONENT.fullmatch(p)]
    if not name or name.startswith("/") or bad or len(parts) > MAX_COMPONENTS:
        raise RunDirError(
            f"invalid run name {name!r}: use up to {MAX_COMPONENTS} '/'-separated names of letters, digits and "
            "'._+=:-' (not starting with '.' or '-'), e.g. 'adamw-lr3e-3'; a run always lives inside $LMOPT_RUNS"
        )
    return name


def run_path(runs_root: Path, name: str) -> Path:
    """The folder of run ``name`` under ``runs_root``, guaranteed to lie strictly inside it."""
    root = Path(runs_root).resolve()
    path = (root / check_run_name(name)).resolve()
    if root not in path.parents:  # a symlinked component pointing elsewhere
        raise RunDirError(f"run name {name!r} resolves to {path}, outside the runs folder {root}")
    return path


def is_lmopt_run(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    try:  # runs written before the marker existed
        info = json.loads((path / "config.json").read_text())
        return (path / "metrics.jsonl").is_file() and {"config", "resolved"} <= set(info)
    except (OSError, ValueError, TypeError):
        return False


def is_empty(path: Path) -> bool:
    return not any(p.name != LOCK for p in path.iterdir())


def check_can_start(path: Path, overwrite: bool) -> None:
    """Refuse to start a new run in ``path`` unless it is absent, empty, or an lmopt run with ``overwrite``."""
    if not path.exists() or (path.is_dir() and is_empty(path)):
        return
    if not path.is_dir() or not is_lmopt_run(path):
        raise RunDirError(f"{path} exists and is not an lmopt run folder; lmopt never deletes it. Choose another "
                          "--run-name (or $LMOPT_RUNS)")
    if not overwrite:
        raise RunDirError(f"run directory {path} already exists; pass --resume to continue it, --overwrite to "
                          "start again, or choose another --run-name")


class RunLock:
    """An exclusive lock on a folder (``<folder>/.lock`` holding the owner's pid), created with the folder."""

    def __init__(self, folder: Path, what: str = "run") -> None:
        self.folder, self.what = Path(folder), what
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = None
        path = self.folder / LOCK
        while True:
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise RunBusyError(f"{what} {self.folder} is in use by process {owner}; wait for it to finish or "
                                   "stop it first") from None
            # the file we locked must still be the one at the path (an owner removes it when it releases)
            if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self, remove_folder_if_empty: bool = False) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / LOCK).unlink()
        self._file.close()
        self._file = None
        if remove_folder_if_empty and self.created and self.folder.exists() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def clear_run(path: Path) -> None:
    """Delete the contents of the lmopt run (or empty folder) ``path``, keeping the lock the caller holds."""
    if not (is_empty(path) or is_lmopt_run(path)):
        raise RunDirError(f"{path} is not an lmopt run folder; lmopt never deletes it")
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark_run(path: Path) -> None:
    (path / MARKER).write_text("an lmopt run folder: `lmopt train --overwrite` may delete it\n")


def remove_leftovers(path: Path) -> list[str]:
    """Remove what a crash leaves behind: half-written checkpoints and ``.<name>.tmp-<pid>`` files."""
    removed = []
    for pattern in ("checkpoints/.tmp-step_*", "**/.*.tmp-*"):
        for leftover in path.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(str(leftover.relative_to(path)))
    return removed


def choose_checkpoint(run_dir: Path, fingerprint: str, log=print) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies and was made with the config of ``fingerprint``;
    says why others were skipped. A checkpoint of another config is an error (resume with the same settings)."""
    for candidate in usable_checkpoints(run_dir):
        problem = verify_checkpoint(candidate)
        if problem is None:
            try:
                state = read_trainer_state(candidate)
            except (OSError, ValueError) as err:
                problem = f"{candidate / 'trainer.json'} is unreadable ({err})"
        if problem is not None:
            log(f"warning: skipping checkpoint {candidate.name}: {problem}")
            continue
        if state["fingerprint"] != fingerprint:
            raise ConfigError(f"{candidate} was made with a different config ({state['fingerprint']} vs "
                              f"{fingerprint}); resume with the same settings or use a new run name")
        return candidate
    return None


def plan_run_folder(run_dir: Path, resume: bool | str, overwrite: bool, fingerprint: str,
                    log=print) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after checking the folder allows it; writes nothing.

    ``resume``: False (start; the folder must be absent or empty, or an lmopt run with ``overwrite``), True
    (continue; a usable checkpoint must exist) or ``"auto"`` (continue if there is a usable checkpoint, else
    start afresh, replacing an lmopt run of that name: what ``lmopt bench run`` does).
    """
    mode = {False: "no", True: "yes"}.get(resume, resume)
    if mode not in ("no", "yes", "auto"):
        raise ConfigError(f"resume must be False, True or 'auto', got {resume!r}")
    if mode != "no" and run_dir.is_dir() and is_lmopt_run(run_dir):
        checkpoint = choose_checkpoint(run_dir, fingerprint, log)
        if checkpoint is not None:
            return checkpoint
        if mode == "yes":
            raise ConfigError(f"--resume: {run_dir} has no usable checkpoint; start it again with "
                              "--overwrite (or without --resume under another --run-name)")
    elif mode == "yes" and run_dir.exists():
        raise ConfigError(f"--resume: {run_dir} is not an lmopt run folder")
    elif mode == "yes":
        raise ConfigError(f"--resume: there is no run {run_dir.name!r} in {run_dir.parent}; drop --resume to start it")
    check_can_start(run_dir, overwrite or mode == "auto")
    return None


class RunFolder:
    """The claim on a run folder: its lock, and (for a fresh start) the folder cleared and marked; ``release``
    gives it up, leaving no empty folder behind after a failed fresh start."""

    def __init__(self, run_dir: Path, fresh: bool, log=print) -> None:
        self.lock: RunLock | None = RunLock(run_dir)
        self.run_dir = run_dir
        try:
            if fresh:
                clear_run(run_dir)
                mark_run(run_dir)
            else:
                for leftover in remove_leftovers(run_dir):
                    log(f"removed {leftover}, left by an interrupted run")
        except BaseException:
            self.release(failed=fresh)
            raise

    def release(self, failed: bool = False) -> None:
        if self.lock is None:
            return
        if failed and self.lock.created:
            clear_run(self.run_dir)
        self.lock.release(remove_folder_if_empty=failed)
        self.lock = None
