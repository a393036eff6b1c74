"""Benchmarks: suites (registered), the resumable runner, the report with the papers' claims."""

from lmopt.bench import suites  # noqa: F401  (registers the suites)
from lmopt.bench.suites import Suite, log_grid

__all__ = ["Suite", "log_grid"]
