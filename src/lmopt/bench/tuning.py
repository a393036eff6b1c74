"""Hyperparameter tuning with the same budget for every optimizer: a coordinate (pattern) search on grids.

Each optimizer has a few knobs, each a grid of values and a start value: the learning rate, the weight decay,
the warm-up fraction and its own most important hyperparameters (β2 for the Adam family, the momentum of Muon
and Spectra, the new hyperparameter of each paper's optimizer). The search, in the manner of Wen et al. 2025
("Fantastic Pretraining Optimizers and Where to Find Them", arXiv 2509.02046), moves one knob at a time:

1. run the start point;
2. sweep the knobs round-robin: on the current knob, the untried neighbours of the incumbent (the best point
   so far), one grid step down then up; when both are tried, the next knob, and after the last knob the first
   again; when every knob's one-step neighbours are tried, two grid steps, and so on;
3. a probe becomes the incumbent only if it beats it by more than ``tol`` (the seed noise of a final loss), so
   the search does not wander on noise;
4. it stops after exactly ``budget`` runs (AlgoPerf's principle: the tuning budget is part of the result, and
   every optimizer gets the same one), or earlier if every point within reach has been tried.

Moving along a knob continues naturally: once lr x2 is the incumbent, its untried neighbour lr x4 is the next
probe on the same knob. Round-robin means every knob is swept before any is revisited: with 4 knobs and 12
runs, each gets about 2-3 probes. (Protocol v1, before this was written, went back to the first knob after
every improvement; on cpu-full its 12 runs for AdamW and Muon never reached the warm-up, the knob the AdamW
seed study found to matter most; those records were withdrawn.) A diverged run counts as an infinite loss. The
search is a pure function of the results so far, so the runner can stop and resume anywhere, and the report
can replay it from the records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmopt.optim.spec import COEFFICIENT

Point = tuple[int, ...]  # one grid index per knob


@dataclass(frozen=True)
class Knob:
    """One tuned hyperparameter: ``key`` is ``lr``, ``weight_decay``, ``warmup_frac`` (train config keys), or
    ``optim.NAME`` / ``optim.NAME.INDEX`` (an optimizer option, or one entry of a tuple option such as
    ``optim.betas.1`` for β2); ``values`` is its grid, ``start`` the value the search starts from."""

    key: str
    values: tuple
    start: float | str

    def __post_init__(self) -> None:
        if self.start not in self.values:
            raise ValueError(f"knob {self.key}: start {self.start!r} is not in its grid {self.values}")

    @property
    def start_index(self) -> int:
        return self.values.index(self.start)

    @property
    def label(self) -> str:
        names = {"optim.betas.1": "β2", "optim.betas.2": "β_v", "optim.momentum": "momentum",
                 "weight_decay": "wd", "warmup_frac": "warmup"}
        return names.get(self.key, self.key.removeprefix("optim."))

    def beyond_end(self, value: float | str) -> float | None:
        """The next value past the grid's end at ``value``, in the grid's own spacing (None where ``value`` is
        not an end, or is 0: no weight decay or warm-up is a natural bound). Averaging coefficients (β, momentum)
        step in 1 - x: β2 0.9 after 0.95 goes on to 0.8; other knobs step geometrically (lr 0.01 after 0.005
        goes on to 0.02), or linearly where the grid changes sign."""
        if len(self.values) < 2 or value == 0 or value not in (self.values[0], self.values[-1]):
            return None
        end, inner = (self.values[0], self.values[1]) if value == self.values[0] else self.values[-1:-3:-1]
        if COEFFICIENT.fullmatch(self.key.split(".")[1] if self.key.startswith("optim.") else self.key):
            beyond = 1 - (1 - end) ** 2 / (1 - inner)
        elif end * inner > 0:
            beyond = end * end / inner
        else:
            beyond = 2 * end - inner
        return float(f"{beyond:.4g}")


def log_values(center: float, below: int, above: int, factor: float = 2.0) -> tuple[float, ...]:
    """``center`` x factor^k for k in [-below, above], rounded to 3 significant digits."""
    return tuple(float(f"{center * factor ** k:.3g}") for k in range(-below, above + 1))


def start_point(knobs: Sequence[Knob]) -> Point:
    return tuple(k.start_index for k in knobs)


def values_at(knobs: Sequence[Knob], point: Point) -> dict[str, float | str]:
    return {k.key: k.values[i] for k, i in zip(knobs, point, strict=True)}


def point_of(knobs: Sequence[Knob], values: Mapping[str, float | str]) -> Point | None:
    """The grid point whose values these are (None if any value is off its knob's grid)."""
    try:
        return tuple(k.values.index(values[k.key]) for k in knobs)
    except (KeyError, ValueError):
        return None


def _loss(value: float) -> float:
    return value if isinstance(value, float | int) and math.isfinite(value) else math.inf


def incumbent(history: Mapping[Point, float], order: Sequence[Point], tol: float) -> Point:
    """Replay the search in the order the points were run: a point replaces the incumbent only when it is better
    by more than ``tol``."""
    best = order[0]
    for point in order[1:]:
        if _loss(history[point]) < _loss(history[best]) - tol:
            best = point
    return best


def next_probe(knobs: Sequence[Knob], history: Mapping[Point, float], order: Sequence[Point], budget: int,
               tol: float) -> Point | None:
    """The next point to run, or None when the budget is spent or nothing within reach is untried."""
    if not order:
        return start_point(knobs)
    if len(order) >= budget:
        return None
    best = incumbent(history, order, tol)
    current = _last_axis(order, history, tol)
    reach = max(len(k.values) for k in knobs)
    for distance in range(1, reach):
        for shift in range(len(knobs)):
            axis = (current + shift) % len(knobs)
            for sign in (-1, 1):
                index = best[axis] + sign * distance
                if 0 <= index < len(knobs[axis].values):
                    candidate = (*best[:axis], index, *best[axis + 1:])
                    if candidate not in history:
                        return candidate
    return None


def _last_axis(order: Sequence[Point], history: Mapping[Point, float], tol: float) -> int:
    """The knob the latest probe moved (where it differs from the incumbent of its time); 0 at the start."""
    if len(order) < 2:
        return 0
    before = incumbent(history, order[:-1], tol)
    moved = [axis for axis, (a, b) in enumerate(zip(before, order[-1], strict=True)) if a != b]
    return moved[0] if moved else 0


def apply_values(config: dict, values: Mapping[str, float | str], optim_defaults: Mapping[str, object]) -> dict:
    """``config`` (an ``lmopt train`` settings dict) with the knob values set; tuple options (betas) are filled
    from the optimizer's defaults before one entry is replaced."""
    config = dict(config)
    optim = dict(config.get("optim", {}))
    for key, value in values.items():
        parts = key.split(".")
        if parts[0] != "optim":
            config[key] = value
        elif len(parts) == 2:
            optim[parts[1]] = value
        else:
            name, index = parts[1], int(parts[2])
            current = list(optim.get(name, optim_defaults[name]))
            current[index] = value
            optim[name] = current
    config["optim"] = optim
    return config


def sensitivity(knobs: Sequence[Knob], history: Mapping[Point, float], best: Point) -> dict[str, dict]:
    """For each knob, the final losses of the runs that differ from ``best`` in that knob only."""
    out = {}
    for axis, knob in enumerate(knobs):
        row = {}
        for point, loss in history.items():
            if all(p == b for i, (p, b) in enumerate(zip(point, best, strict=True)) if i != axis):
                row[knob.values[point[axis]]] = loss
        out[knob.key] = dict(sorted(row.items(), key=lambda kv: knob.values.index(kv[0])))
    return out
