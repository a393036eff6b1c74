"""Benchmarks: suites and their tuning protocol, the runner, the report and the step benchmark."""

from lmopt.bench.suites import Suite
from lmopt.bench.tuning import Knob

__all__ = ["Knob", "Suite"]
