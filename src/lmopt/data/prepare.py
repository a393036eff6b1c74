"""Corpus + tokenizer -> ``$LMOPT_DATA/prepared/<name>.<tokenizer>/{train,val}.bin, meta.json``."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmopt.data.corpus import CorpusSpec, is_validation
from lmopt.data.paths import atomic_write_text, data_home
from lmopt.data.shards import ShardError, ShardWriter, read_shard
from lmopt.data.tokenizer import TokenizerSpec, eot_id, tokenizer_fingerprint
from lmopt.registry import CORPORA, TOKENIZERS

ENCODE_BATCH_DOCS = 256


@dataclass
class PreparedData:
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def dataset_dir(name: str, tokenizer: str) -> Path:
    return data_home() / "prepared" / f"{name}.{tokenizer}"


def prepare(
    corpus: str,
    tokenizer: str,
    source: str | None = None,
    name: str | None = None,
    max_docs: int | None = None,
    log=print,
) -> Path:
    """Tokenize a corpus into train/validation shards (split by document; documents end with end-of-text)."""
    spec: CorpusSpec = CORPORA.get(corpus)
    tok_spec: TokenizerSpec = TOKENIZERS.get(tokenizer)
    if spec.needs_source and not source:
        raise ValueError(f"corpus {corpus!r} needs --source (a local directory of parquet files or an HF name)")
    name = name or corpus

    def documents():
        docs = spec.documents(source=source)
        return docs if max_docs is None else itertools.islice(docs, max_docs)

    def train_texts():
        return (text for doc_id, text in documents() if not is_validation(doc_id))

    start = time.time()
    tok = tok_spec.load(corpus=name, train_texts=train_texts)
    eot = eot_id(tok)
    out = dataset_dir(name, tokenizer)
    remove_stale_temporaries(out)
    writers = {"train": ShardWriter(out / "train.bin", tok_spec.vocab_size),
               "val": ShardWriter(out / "val.bin", tok_spec.vocab_size)}
    n_docs = {"train": 0, "val": 0}
    n_chars = 0
    try:
        docs = iter(documents())
        while batch := list(itertools.islice(docs, ENCODE_BATCH_DOCS)):
            for (doc_id, text), encoding in zip(batch, tok.encode_batch([t for _, t in batch]), strict=True):
                split = "val" if is_validation(doc_id) else "train"
                writers[split].append(np.asarray([*encoding.ids, eot], dtype=np.int64))
                n_docs[split] += 1
                n_chars += len(text)
        if n_docs["train"] == 0 or n_docs["val"] == 0:
            raise ValueError(f"corpus {name!r} gave {n_docs} documents: both splits need at least one")
    except BaseException:
        for writer in writers.values():
            writer.abort()  # no half-written temporary file is left behind
        raise
    meta = {
        "name": name,
        "corpus": corpus,
        "source": source,
        "tokenizer": tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": tok_spec.vocab_size,
        "eot_id": eot,
        "documents": n_docs,
        "characters": n_chars,
        "tokens": {split: w.count for split, w in writers.items()},
    }
    for writer in writers.values():
        writer.close()
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    log(f"prepared {out}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens "
        f"from {n_docs['train']} + {n_docs['val']} documents in {time.time() - start:.1f}s")
    return out


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files left by a prepare that crashed (its process is gone)."""
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


META_KEYS = ("name", "tokenizer", "vocab_size", "eot_id", "tokens")


def read_meta(path: Path) -> dict:
    """A prepared dataset's ``meta.json``, checked; a damaged one is an error that says how to recover."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} is unreadable ({err}); delete {path.parent} and prepare the data again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}; delete {path.parent} and prepare the data again")
    return meta


def load_prepared(name: str, tokenizer: str, auto_prepare: bool = True, verify: bool = True) -> PreparedData:
    """Open prepared shards; an embedded corpus (no ``--source`` needed) is prepared on first use."""
    path = dataset_dir(name, tokenizer)
    if not (path / "meta.json").exists():
        spec = CORPORA.get(name) if name in CORPORA else None
        if not auto_prepare or spec is None or spec.needs_source:
            raise FileNotFoundError(
                f"no prepared data at {path}; run `lmopt data prepare --corpus {name} --tokenizer {tokenizer}`"
                + (" --source ..." if spec is None or spec.needs_source else "")
            )
        prepare(name, tokenizer)
    meta = read_meta(path / "meta.json")
    return PreparedData(path, meta, read_shard(path / "train.bin", verify), read_shard(path / "val.bin", verify))
