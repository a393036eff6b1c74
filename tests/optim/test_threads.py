"""map_over_threads: the loop's results, in order, on several threads; and Muon's step on them."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from lmopt.optim import Muon
from lmopt.optim.threads import map_over_threads


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_results_keep_the_items_order_and_the_largest_start_first(two_threads):
    started, lock = [], threading.Lock()

    def work(n: int) -> tuple[int, str]:
        with lock:
            started.append(n)
        return n * n, threading.current_thread().name

    items = [3, 9, 1, 7, 5]
    results = map_over_threads(work, items, cost=float)
    assert [r[0] for r in results] == [9, 81, 1, 49, 25]
    assert set(started[:2]) == {9, 7}
    assert all(name.startswith("lmopt-matrix") for _, name in results)
    assert torch.get_num_threads() == 2


def test_each_item_runs_with_its_share_of_the_threads_and_the_callers_grad_mode(two_threads):
    def observe(_: int) -> tuple[int, bool]:
        return torch.get_num_threads(), torch.is_grad_enabled()

    with torch.no_grad():
        assert map_over_threads(observe, range(4)) == [(1, False)] * 4
    assert map_over_threads(observe, range(4)) == [(1, True)] * 4
    assert map_over_threads(observe, range(2), threads=4) == [(2, True)] * 2  # 2 items: 2 threads each
    assert map_over_threads(observe, range(3), threads=4) == [(1, True)] * 3
    assert torch.get_num_threads() == 2


def test_one_thread_or_one_item_is_a_loop_in_the_calling_thread(two_threads):
    here = threading.current_thread().name
    assert map_over_threads(lambda _: threading.current_thread().name, [0]) == [here]
    assert map_over_threads(lambda _: threading.current_thread().name, [0, 1], threads=1) == [here, here]


def test_an_error_is_raised_once_every_item_has_run(two_threads):
    done = []

    def work(n: int) -> int:
        if n == 0:
            raise ValueError("item 0 failed")
        done.append(n)
        return n

    with pytest.raises(ValueError, match="item 0 failed"):
        map_over_threads(work, range(6))
    assert sorted(done) == [1, 2, 3, 4, 5]
    assert torch.get_num_threads() == 2


def _square_in_child(queue) -> None:
    queue.put(map_over_threads(lambda n: n * n, [1, 2, 3], threads=2))


def test_a_forked_child_gets_its_own_pool(two_threads):
    map_over_threads(lambda n: n, [1, 2], threads=2)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_square_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == [1, 4, 9]
    child.join(timeout=60)
    assert child.exitcode == 0


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_muon_on_two_threads_gives_the_bits_of_its_one_thread_loop(ns_dtype, impl):
    """Each matrix is the same computation with one intra-op thread either way, so the same bits."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 256), (256, 64), (96, 96), (128, 256), (32, 128)]
    weights = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(3)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            opt = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype, impl=impl)
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                opt.step()
            results.append([(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in params])
    finally:
        torch.set_num_threads(previous)
    for (p1, b1), (p2, b2) in zip(*results, strict=True):
        assert torch.equal(p1, p2) and torch.equal(b1, b2)
    assert all(not torch.equal(p, w) for (p, _), w in zip(results[0], weights, strict=True))
