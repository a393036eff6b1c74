import numpy as np
import pytest
import torch

from lmopt.data import BatchLoader, eval_batches

TOKENS = np.arange(10_000, dtype=np.uint16)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_shifted_targets():
    x, y = BatchLoader(TOKENS, seq_len=16, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(x[:, 0] % 16 == 0)  # windows start on multiples of seq_len


def test_same_seed_same_order_other_seed_other_order():
    a = take(BatchLoader(TOKENS, 16, 4, seed=1), 5)
    b = take(BatchLoader(TOKENS, 16, 4, seed=1), 5)
    c = take(BatchLoader(TOKENS, 16, 4, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_resume_from_state_dict_continues_the_stream_across_epochs():
    loader = BatchLoader(TOKENS, 16, 8, seed=3)
    n_per_epoch = loader.n_windows // 8
    take(loader, n_per_epoch - 2)
    state = loader.state_dict()
    expected = take(loader, 5)  # crosses into epoch 1
    assert loader.epoch == 1
    restored = BatchLoader(TOKENS, 16, 8, seed=3)
    restored.load_state_dict(state)
    got = take(restored, 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(expected, got, strict=True))
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(TOKENS, 32, 8, seed=3).load_state_dict(state)


def test_an_epoch_visits_every_window_once():
    loader = BatchLoader(TOKENS, 16, 8, seed=0)
    starts = torch.cat([x[:, 0] for x, _ in take(loader, loader.n_windows // 8)])
    assert len(set(starts.tolist())) == len(starts) == (loader.n_windows // 8) * 8


def test_ranks_split_the_global_batch():
    whole = BatchLoader(TOKENS, 16, 8, seed=5).next_batch()[0]
    parts = [BatchLoader(TOKENS, 16, 4, seed=5, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_eval_batches_are_fixed_and_in_order():
    batches = list(eval_batches(TOKENS, 16, 4, max_tokens=16 * 8))
    assert len(batches) == 2
    assert batches[0][0][:, 0].tolist() == [0, 16, 32, 48]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchLoader(np.arange(100, dtype=np.uint16), 16, 8, seed=0)
