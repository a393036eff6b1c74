"""Machine-readable metrics: one JSON object per line in ``<run>/metrics.jsonl``.

Records carry an ``event`` key: ``train`` (step, tokens, train_loss, lr, grad_norm, step_time, optimizer_time
(the part of step_time from ``optimizer.step()`` to the step's end, the GPU waited for), tokens_per_s,
elapsed), ``eval`` (step, tokens, val_loss), ``spectrum`` (step, tokens, mean spike fraction; the full
measurement is in ``<run>/spectrum/``), ``diverged`` and ``end`` (the run's summary).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from lmopt.data.paths import atomic_write_text


class MetricsWriter:
    """Appends records; on resume, first rewrites the file (atomically) with the records up to the checkpoint.

    A line torn by a crash mid-write (only ever the last one) is dropped on resume, with a message.
    """

    def __init__(self, path: Path, resume_step: int | None = None, log: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:  # drop what was logged after the checkpoint we resume from
            records, torn = read_metrics_tolerant(self.path)
            if torn:
                log(f"warning: {self.path}: dropped a torn last line left by an interrupted write ({torn[:60]!r})")
            kept = [r for r in records if r.get("event") != "end" and r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")

    def write(self, event: str, **fields) -> None:
        record = {"event": event} | {k: _clean(v) for k, v in fields.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics file; a damaged line other than a torn last one is an error naming the file."""
    return read_metrics_tolerant(path)[0]


def read_metrics_tolerant(path: Path) -> tuple[list[dict], str]:
    """(records, the torn last line or ""): a crash can leave the last line half-written, never an earlier one."""
    path = Path(path)
    if not path.exists():
        return [], ""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                return records, line
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({err}); the file is damaged") from None
    return records, ""


class NullMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, event: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass
