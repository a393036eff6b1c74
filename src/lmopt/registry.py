"""One registry for every named thing in lmopt: model presets, corpora, tokenizers, optimizers, suites.

The CLI, the trainer, the benchmark and the tests look names up here and never keep lists of their own.
Each layer registers its entries when it is imported (``lmopt.model`` registers presets, ``lmopt.data``
corpora and tokenizers, ``lmopt.optim`` optimizers, ``lmopt.bench`` suites); a registry imports its own layer,
and only that one, on first use, so ``from lmopt.registry import PRESETS; PRESETS.names()`` always sees every
entry and looking up an optimizer never imports the benchmark layer.

This module imports nothing else from lmopt at import time, so any layer may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")



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

    def __init__(self, kind: str, module: str, plural: str | None = None) -> None:
        self.kind = kind
        self.module = module  # the layer whose import registers this registry's entries (imported on first use)
        self.plural = plural or kind + "s"
        self._entries: dict[str, Entry[T]] = {}
        self.resolver: Callable[[str, str], T] | None = None  # (reference, name) -> value
        self._references: dict[str, Entry[T]] = {}  # resolved package.module:Name references (not in names())
        self._populated = False

    def register(self, name: str, value: T, summary: str = "") -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, summary)
        return value

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        self._populate()
        if name not in self._entries and ":" in name and self.resolver is not None:
            if name not in self._references:  # resolved once, kept apart from the registered names
                self._references[name] = Entry(name, self.resolver(name, name), f"user {self.kind} {name}")
            return self._references[name]
        try:
            return self._entries[name]
        except KeyError:
            hint = " (or a reference to your own, package.module:Name)" if self.resolver is not None else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}{hint}"
            ) from None

    def _populate(self) -> None:
        """Import the layer that registers this registry's entries (only that one), then entry points."""
        if self._populated:
            return
        self._populated = True
        importlib.import_module(self.module)
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        if self.resolver is None:
            return
        for point in entry_points(group=f"lmopt.{self.plural}"):
            if point.name not in self._entries:
                self._entries[point.name] = Entry(point.name, self.resolver(point.value, point.name),
                                                  f"{self.kind} from package entry point {point.value}")

    def names(self) -> list[str]:
        self._populate()
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        self._populate()
        return iter(list(self._entries.values()))

    def __contains__(self, name: object) -> bool:
        self._populate()
        return name in self._entries


PRESETS: Registry[Any] = Registry("preset", "lmopt.model")
CORPORA: Registry[Any] = Registry("corpus", "lmopt.data", "corpora")
TOKENIZERS: Registry[Any] = Registry("tokenizer", "lmopt.data")
OPTIMIZERS: Registry[Any] = Registry("optimizer", "lmopt.optim")
SUITES: Registry[Any] = Registry("suite", "lmopt.bench")
