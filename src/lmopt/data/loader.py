"""Batches of (input, target) token windows in an order fixed by the seed, resumable from a saved position.

A shard of N tokens holds W = (N - 1) // T windows of T + 1 tokens, window i starting at token i*T (inputs are
the first T tokens, targets the last T). Each epoch visits every window once in the order of
``randperm(W, seed, epoch)``; a step consumes ``batch_size * world_size`` consecutive entries of that order
and rank r takes its own ``batch_size`` of them, so the data a step sees does not depend on the number of
ranks. Windows left over at the end of an epoch (fewer than one global batch) are skipped.
The position is ``(epoch, cursor)``: saving it with a checkpoint resumes the exact same stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    block = torch.from_numpy(block)
    return block[:, :-1], block[:, 1:]


class BatchLoader:
    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise ValueError(
                f"{len(tokens):,} tokens make {self.n_windows} windows of {seq_len + 1}: "
                f"fewer than one batch of {self.global_batch}; use a smaller batch or sequence length"
            )
        self.epoch, self.cursor = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def tokens_per_epoch(self) -> int:
        return (self.n_windows // self.global_batch) * self.global_batch * self.seq_len

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n_windows, generator=gen)
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, for this rank."""
        if self.cursor + self.global_batch > self.n_windows:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        lo = self.cursor + self.rank * self.batch_size
        windows = self._epoch_order()[lo : lo + self.batch_size].numpy()
        self.cursor += self.global_batch
        return _windows(self.tokens, windows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_tokens`` of the validation shard in order, as this rank's share of full batches."""
    n_windows = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    starts = np.arange(n_windows) * seq_len
    per_step = batch_size * world_size
    for lo in range(0, n_windows - per_step + 1, per_step):
        mine = starts[lo + rank * batch_size : lo + (rank + 1) * batch_size]
        yield _windows(tokens, mine, seq_len)
    if n_windows < per_step:  # a tiny validation set: one short batch (single-process use)
        yield _windows(tokens, starts, seq_len)
