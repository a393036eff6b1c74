"""Every registered optimizer class documents its arguments: its own docstring, with an ``Args:`` section that has
an entry (``name:`` at the start of a line) for every parameter of ``__init__`` (``*args`` / ``**kwargs`` aside),
so that ``help(lmopt.optim.Spectra)`` is useful."""

from __future__ import annotations

import inspect
import re

import pytest

import lmopt.optim  # noqa: F401  (fills the registry)
from lmopt.registry import OPTIMIZERS

CATCH_ALLS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def documented_parameters(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in CATCH_ALLS]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer_class_documents_every_argument(name):
    cls = OPTIMIZERS.get(name).cls
    assert cls is not None, f"{name}: the registry entry has no class"
    # the class's own docstring: inspect.getdoc falls back to a parent's (ASM subclasses AdamW)
    assert cls.__dict__.get("__doc__"), f"{cls.__qualname__} has no docstring of its own"
    doc = inspect.getdoc(cls)
    assert "Args:" in doc, f"{cls.__qualname__}'s docstring has no Args: section"
    args = doc.split("Args:", 1)[1]
    missing = [p for p in documented_parameters(cls) if not re.search(rf"^\s+{re.escape(p)}:", args, re.MULTILINE)]
    assert not missing, f"{cls.__qualname__}'s docstring does not document {', '.join(missing)}"
