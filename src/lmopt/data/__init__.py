"""Corpora, tokenizers, token shards and the batch loader."""

from lmopt.data import corpus, tokenizer  # noqa: F401  (registers corpora and tokenizers)
from lmopt.data.loader import BatchLoader, eval_batches
from lmopt.data.prepare import PreparedData, load_prepared, prepare
from lmopt.data.shards import ShardError, read_shard, write_shard

__all__ = ["BatchLoader", "PreparedData", "ShardError", "eval_batches", "load_prepared", "prepare", "read_shard",
           "write_shard"]
