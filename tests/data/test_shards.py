import numpy as np
import pytest

from lmopt.data.shards import HEADER, ShardError, read_shard, write_shard


@pytest.mark.parametrize(("vocab", "dtype"), [(8192, np.uint16), (151669, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab, size=1000)
    path = write_shard(tmp_path / "a.bin", tokens, vocab)
    got = read_shard(path)
    assert got.dtype == dtype and np.array_equal(got, tokens)
    assert path.stat().st_size == HEADER.size + 1000 * np.dtype(dtype).itemsize


def test_truncated_shard_names_the_file(tmp_path):
    path = write_shard(tmp_path / "train.bin", np.arange(100), 8192)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"train\.bin.*truncated"):
        read_shard(path)
    path.write_bytes(b"LMOPT")
    with pytest.raises(ShardError, match=r"train\.bin.*shorter than"):
        read_shard(path)


def test_corrupt_tokens_fail_the_checksum(tmp_path):
    path = write_shard(tmp_path / "val.bin", np.arange(100), 8192)
    data = bytearray(path.read_bytes())
    data[HEADER.size + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"val\.bin.*checksum mismatch"):
        read_shard(path)
    read_shard(path, verify=False)  # the caller may skip the hash, never the header checks


def test_not_a_shard(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(ShardError, match=r"x\.bin.*not an lmopt token shard"):
        read_shard(path)


def test_out_of_range_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must lie in"):
        write_shard(tmp_path / "x.bin", np.array([1, 70000]), 8192)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind
