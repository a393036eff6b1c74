"""docs/extending.md, run: a user's optimizer in their own module is trained and benchmarked beside AdamW, and its
row lands in the leaderboard."""

import re
import sys
from pathlib import Path

from lmopt.bench.report import write_report
from lmopt.bench.runner import BenchRunner
from lmopt.bench.suites import Suite
from lmopt.cli import main
from lmopt.registry import SUITES, Entry

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def test_the_extending_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "signsgd.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[2] / 'src'}")
    monkeypatch.setenv("LMOPT_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(Path(__file__).resolve().parents[2] / "data")
    try:
        assert main(["train", "--optimizer", "signsgd:SignSGD", "--lr", "3e-3", "--steps", "3", "--preset", "nano",
                     "--seq-len", "32", "--batch-tokens", "512", "--eval-tokens", "2048"]) == 0

        suite = Suite(name="test-extending", description="docs/extending.md", preset="nano", data="brown",
                      seq_len=32, batch_tokens=512, steps=6, optimizers=("adamw",), tuning_budget=1, seeds=(0, 1),
                      budget_fractions=(), eval_points=3, eval_tokens=2048)
        SUITES.names()  # populate before adding a test suite
        monkeypatch.setitem(SUITES._entries, suite.name, Entry(suite.name, suite, ""))
        BenchRunner(suite, jobs=2, results_root=tmp_path / "results", extra=["signsgd:SignSGD"],
                    log=lambda _: None).run()
        text = write_report(suite.name, root=tmp_path / "results").read_text()
        row = next(line for line in text.splitlines() if "| `signsgd:SignSGD` |" in line)
        assert "lr 0.001, wd 0.1, warmup 0.05" in row  # its signature's lr default, the common starts
        assert re.search(r"\| [+-]\d\.\d{3} \[", row)  # a paired difference against AdamW
    finally:
        sys.modules.pop("signsgd", None)
