"""Where lmopt keeps downloaded packages, tokenizers, prepared token shards and runs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def data_home() -> Path:
    """``$LMOPT_DATA`` if set, else ``./data`` (relative to the working directory)."""
    return Path(os.environ.get("LMOPT_DATA", "data")).resolve()


def runs_home() -> Path:
    """``$LMOPT_RUNS`` if set, else ``./runs``."""
    return Path(os.environ.get("LMOPT_RUNS", "runs")).resolve()


@contextlib.contextmanager
def temporary_runs_home() -> Iterator[Path]:
    """A fresh temporary directory as ``$LMOPT_RUNS`` for the block (a benchmark's throwaway runs), removed after
    it; the previous value (or its absence) is restored."""
    previous = os.environ.get("LMOPT_RUNS")
    with tempfile.TemporaryDirectory() as runs:
        os.environ["LMOPT_RUNS"] = runs
        try:
            yield Path(runs)
        finally:
            if previous is None:
                del os.environ["LMOPT_RUNS"]
            else:
                os.environ["LMOPT_RUNS"] = previous


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
