"""One registry for every named thing in lmopt: model presets, corpora, tokenizers, optimizers, suites.

The CLI, the trainer, the benchmark and the tests look names up here and never keep lists of their own.
Each layer registers its entries when it is imported (``lmopt.model`` registers presets, ``lmopt.data``
corpora and tokenizers, ``lmopt.optim`` optimizers); :func:`Registry.get` imports them on first use, so
``from lmopt.registry import PRESETS; PRESETS.names()`` always sees every entry.

This module imports nothing else from lmopt at import time, so any layer may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# The modules whose import registers entries. Imported lazily on first lookup.
_REGISTERING_MODULES = ("lmopt.model", "lmopt.data", "lmopt.optim", "lmopt.bench")


class UnknownNameError(ValueError):
    """A name that is not in a registry. The message lists the valid names."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    summary: str


class Registry(Generic[T]):
    """An ordered name -> value map with helpful errors.

    A registry with a ``resolver`` also accepts references to a user's own code, ``package.module:Name``: the
    first lookup imports it and turns it into an entry (the optimizer layer sets the resolver of OPTIMIZERS).
    Packages can also register entries under a short name through the entry-point group ``lmopt.<plural>``
    (e.g. ``[project.entry-points."lmopt.optimizers"] myopt = "mypkg.optim:MyOpt"``).
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self._entries: dict[str, Entry[T]] = {}
        self.resolver: Callable[[str, str], T] | None = None  # (reference, name) -> value

    def register(self, name: str, value: T, summary: str = "") -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, summary)
        return value

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        _populate()
        if name not in self._entries and ":" in name and self.resolver is not None:
            value = self.resolver(name, name)
            self._entries.setdefault(name, Entry(name, value, f"user {self.kind} {name}"))
        try:
            return self._entries[name]
        except KeyError:
            hint = " (or a reference to your own, package.module:Name)" if self.resolver is not None else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}{hint}"
            ) from None

    def _load_entry_points(self) -> None:
        if self.resolver is None:
            return
        for point in entry_points(group=f"lmopt.{self.plural}"):
            if point.name not in self._entries:
                self._entries[point.name] = Entry(point.name, self.resolver(point.value, point.name),
                                                  f"{self.kind} from package entry point {point.value}")

    def names(self) -> list[str]:
        _populate()
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        _populate()
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        _populate()
        return name in self._entries


_populated = False


def _populate() -> None:
    global _populated
    if _populated:
        return
    _populated = True
    for module in _REGISTERING_MODULES:
        importlib.import_module(module)
    for registry in (PRESETS, CORPORA, TOKENIZERS, OPTIMIZERS, SUITES):
        registry._load_entry_points()


PRESETS: Registry[Any] = Registry("preset")
CORPORA: Registry[Any] = Registry("corpus", "corpora")
TOKENIZERS: Registry[Any] = Registry("tokenizer")
OPTIMIZERS: Registry[Any] = Registry("optimizer")
SUITES: Registry[Any] = Registry("suite")
