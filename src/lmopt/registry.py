"""One registry for every named thing in lmopt: model presets, corpora, tokenizers, optimizers, suites.

The CLI, the trainer, the benchmark and the tests look names up here and never keep lists of their own.
Each layer registers its entries when it is imported (``lmopt.model`` registers presets, ``lmopt.data``
corpora and tokenizers, ``lmopt.optim`` optimizers); :func:`Registry.get` imports them on first use, so
``from lmopt.registry import PRESETS; PRESETS.names()`` always sees every entry.

This module imports nothing else from lmopt at import time, so any layer may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
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
    """An ordered name -> value map with helpful errors."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, value: T, summary: str = "") -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, summary)
        return value

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        _populate()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}"
            ) from None

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
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a layer not written yet (bench) registers nothing
            if err.name != module:
                raise


PRESETS: Registry[Any] = Registry("preset")
CORPORA: Registry[Any] = Registry("corpus", "corpora")
TOKENIZERS: Registry[Any] = Registry("tokenizer")
OPTIMIZERS: Registry[Any] = Registry("optimizer")
SUITES: Registry[Any] = Registry("suite")
