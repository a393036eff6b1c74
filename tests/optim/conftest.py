import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, then back: these tests use tensors of a few hundred elements, where a
    second thread only adds synchronisation (on a loaded 2-core machine a toy model's backward took 100x longer
    with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
