"""Per-matrix work spread over a CPU's threads, one matrix per thread (Muon's Newton–Schulz).

A matrix optimizer's step on a CPU is a list of independent per-matrix computations, each a chain of products of
a few hundred rows. torch parallelises each product over its intra-op threads, and at these sizes that buys
little: on this project's 2-core AVX-512-BF16/AMX CPU one qwen3-134m layer's seven bf16 Newton–Schulz runs took
the same time with one intra-op thread as with two (oneDNN's bf16 products of 512 x 512 x 512 do not scale past
one core), while lmopt's Muon step on them, two matrices at a time and each product on one thread, took 0.72x
as long as one matrix after another (``scripts/muon_cpu_probe.py``, results/step/muon-cpu-probe.md). In fp32
(MKL) two intra-op threads do scale, and spreading the matrices neither gained nor lost.

:func:`map_over_threads` runs ``fn`` on each item in a pool of Python threads (torch releases the GIL inside
its operations), as many as torch's intra-op threads (``torch.get_num_threads()``) or items, whichever is fewer,
each running torch's operations with its share of those threads (one, where there are at least as many items as
threads): the cores are shared out by matrix, not by product. The largest items start first. The results are
each item's own computation with that many intra-op threads, so a one-thread loop gives the same bits, which
is what the tests compare. Grad mode is the caller's (it is thread-local in torch), and the caller's thread
count is restored afterwards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(width: int) -> ThreadPoolExecutor:
    """A pool of ``width`` threads for this process (a forked child gets its own: the parent's threads are not
    there)."""
    key = (os.getpid(), width)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(width, thread_name_prefix="lmopt-matrix")
        return _pools[key]


def map_over_threads(fn: Callable[[T], R], items: Sequence[T], cost: Callable[[T], float] | None = None,
                     threads: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items spread over ``threads`` (default: torch's intra-op thread
    count): min(threads, items) at a time, each with threads // that many intra-op threads (one, where there are
    at least as many items as threads); a plain loop in the calling thread where there is one thread or one item.
    ``cost`` orders the work, largest first (results keep ``items``' order). An exception in ``fn`` is raised
    here, once every item has run."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    width = min(threads, len(items))
    each = threads // width
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else range(len(items))
    grad_enabled = torch.is_grad_enabled()

    def run(i: int) -> R:
        if torch.get_num_threads() != each:
            torch.set_num_threads(each)  # this thread's own setting (OpenMP's is per thread)
        with torch.set_grad_enabled(grad_enabled):
            return fn(items[i])

    previous = torch.get_num_threads()
    try:
        pool = _pool(width)
        futures = [pool.submit(run, i) for i in order]
        wait(futures)
    finally:
        torch.set_num_threads(previous)  # set_num_threads also sets the count new threads start with
    results: list = [None] * len(items)
    for i, future in zip(order, futures, strict=True):
        results[i] = future.result()
    return results
