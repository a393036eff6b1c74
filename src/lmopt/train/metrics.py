"""Machine-readable metrics: one JSON object per line in ``<run>/metrics.jsonl``.

Records carry an ``event`` key: ``train`` (step, tokens, train_loss, lr, grad_norm, step_time, tokens_per_s,
elapsed), ``eval`` (step, tokens, val_loss), ``spectrum`` (step, tokens, mean spike fraction; the full
measurement is in ``<run>/spectrum/``), ``diverged`` and ``end`` (the run's summary).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what was logged after the checkpoint we resume from
            kept = [r for r in read_metrics(self.path) if r.get("event") != "end" and r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
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
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NullMetrics:
    """What ranks other than 0 write: nothing."""

    def write(self, event: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass
