"""Learning-rate schedules as a multiplier of the peak lr, a pure function of the step."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float, decay_frac: float = 0.2) -> float:
    """Linear warm-up over ``warmup`` steps (step 0 gets 1/warmup), then:

    - ``cosine``: half a cosine from 1 to ``min_ratio`` at the last step;
    - ``linear``: a straight line from 1 to ``min_ratio``;
    - ``wsd``: 1 until the last ``decay_frac`` of the steps, then linear to ``min_ratio``;
    - ``constant``: 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(decay_frac * total))
        start = max(warmup, total - decay_steps)
        progress = min(1.0, max(0.0, (step - start) / max(1, total - 1 - start)))
        return 1.0 - (1.0 - min_ratio) * progress
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}")
