"""Token shards: a 64-byte header and the raw tokens, memory-mapped when read.

Header (little-endian):

    offset  size  field
    0       8     magic  b"LMOPTTOK"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, vocabularies up to 65,536) or 4 (uint32)
    16      8     number of tokens
    24      32    SHA-256 of the token bytes
    56      8     reserved (zero)

A file whose size disagrees with the header is reported as truncated, and one whose tokens do not hash to the
header's checksum as corrupt; both errors name the file.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"LMOPTTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQ32s8x")
assert HEADER.size == 64


class ShardError(ValueError):
    """A token shard that cannot be trusted (bad magic, truncated, corrupt)."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays, then :meth:`close` writes the header and renames the file into place."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.count = 0
        self._digest = hashlib.sha256()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER.size)

    def append(self, tokens: np.ndarray | list[int]) -> None:
        array = np.asarray(tokens)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for {self.path.name}")
        data = array.astype(self.dtype, copy=False).tobytes()
        self._digest.update(data)
        self._file.write(data)
        self.count += array.size

    def close(self) -> Path:
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self._digest.digest()))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Discard what was written (the temporary file), leaving no trace."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> Path:
    with ShardWriter(path, vocab_size) as writer:
        writer.append(tokens)
    return writer.path


def read_shard(path: Path, verify: bool = True) -> np.ndarray:
    """The tokens of a shard as a read-only memory map; checks the header, the size and (if ``verify``) the hash."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER.size:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER.size}-byte header (truncated file)")
    with open(path, "rb") as f:
        magic, version, itemsize, count, checksum = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise ShardError(f"{path}: not an lmopt token shard (magic {magic!r})")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this lmopt reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: invalid token size {itemsize} bytes (corrupt header)")
    expected = HEADER.size + count * itemsize
    if size != expected:
        raise ShardError(
            f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
            "(truncated or corrupt)"
        )
    dtype = np.uint16 if itemsize == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))
    if verify:
        digest = hashlib.sha256()
        step = 1 << 24
        for start in range(0, count, step):
            digest.update(tokens[start : start + step].tobytes())
        if digest.digest() != checksum:
            raise ShardError(f"{path}: token checksum mismatch (the file is corrupt); prepare the data again")
    return tokens
