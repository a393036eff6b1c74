"""The layers import one way only: cli -> bench/analysis -> train -> model/data/optim -> registry.

Checked two ways: statically (every import statement in every module, function-level ones included, must point
at the same layer or one below) and at run time (importing a layer and using the registries it needs does not
load any layer above it)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "lmopt"
LAYERS = {"registry": 0, "model": 1, "data": 1, "optim": 1, "train": 2, "bench": 3, "analysis": 3, "cli": 4}


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    name = parts[0].removesuffix(".py")
    return name if name in LAYERS else None


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = layer_of(path)
        if layer is None:
            continue
        for module, line in imports(path):
            target = module.split(".")[1] if module.startswith("lmopt.") else None
            if target in LAYERS and target != layer and LAYERS[target] >= LAYERS[layer]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "imports running up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize(("layer", "use", "above"), [
    ("optim", "from lmopt.registry import OPTIMIZERS; OPTIMIZERS.names()", ("train", "bench", "analysis", "cli")),
    ("model", "from lmopt.registry import PRESETS; PRESETS.names()", ("optim", "train", "bench", "analysis", "cli")),
    ("train", "from lmopt.registry import OPTIMIZERS, PRESETS; OPTIMIZERS.names(); PRESETS.names()",
     ("bench", "analysis", "cli")),
])
def test_importing_a_layer_does_not_load_the_layers_above(layer, use, above):
    code = (f"import sys, lmopt.{layer}; {use}; "
            f"print(sorted({{m.split('.')[1] for m in sys.modules if m.startswith('lmopt.')}}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [name for name in above if f"'{name}'" in loaded], loaded
