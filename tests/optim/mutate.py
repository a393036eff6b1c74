"""A pytest plugin that applies one deliberate one-line change ("mutation") to an lmopt function for one test run,
without touching the file: the evidence in docs/testing.md that the optimizer tests fail when the code is wrong.

    MUTATION='lmopt.optim.msam|alpha_for_role|alpha = 0.05 * gamma|alpha = 0.5 * gamma' \\
        .venv/bin/python -m pytest -q -p tests.optim.mutate tests/optim/test_references.py

``MUTATION`` is ``module|function or Class.method|old text|new text``; the old text must occur exactly once in
that function's source. The function is recompiled with the change and put in place of the original (in its
module or class, and in the registry when it is a registered builder) before the tests import anything. Without
``MUTATION`` the plugin does nothing.
"""

import dataclasses
import importlib
import inspect
import os
import textwrap


def _apply(spec: str) -> None:
    module_name, qualname, old, new = spec.split("|")
    module = importlib.import_module(module_name)
    owner, attr = module, qualname
    if "." in qualname:
        class_name, attr = qualname.split(".")
        owner = getattr(module, class_name)
    raw = owner.__dict__[attr]
    static = isinstance(raw, staticmethod)
    function = raw.__func__ if static else raw
    source = textwrap.dedent(inspect.getsource(function))
    if source.count(old) != 1:
        raise ValueError(f"MUTATION: {old!r} occurs {source.count(old)} times in {qualname}, not once")
    lines = [line for line in source.replace(old, new).splitlines() if line.strip() != "@staticmethod"]
    namespace = dict(module.__dict__)
    if owner is not module:  # a method's zero-argument super() needs the class cell its class body gave it
        namespace["__mutated_class__"] = owner
        lines = [line.replace("super()", "super(__mutated_class__, self)") for line in lines]
    exec(compile("\n".join(lines), f"<mutant of {module_name}.{qualname}>", "exec"), namespace)
    mutant = namespace[function.__name__]
    setattr(owner, attr, staticmethod(mutant) if static else mutant)
    import sys

    for name, other in list(sys.modules.items()):  # modules that imported the function by name use the mutant
        if name.startswith("lmopt.") and other is not module:
            for key, value in list(vars(other).items()):
                if value is function:
                    setattr(other, key, mutant)
    from lmopt.registry import OPTIMIZERS

    for entry in list(OPTIMIZERS.entries()):  # the registry holds builder functions themselves
        if entry.value.builder is function:
            OPTIMIZERS._entries[entry.name] = dataclasses.replace(
                entry, value=dataclasses.replace(entry.value, builder=mutant))
    print(f"MUTANT {module_name}.{qualname}: {old!r} -> {new!r}")


if os.environ.get("MUTATION"):
    _apply(os.environ["MUTATION"])
