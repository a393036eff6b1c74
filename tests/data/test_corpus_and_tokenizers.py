import json

import numpy as np
import pytest

from lmopt.data import load_prepared, prepare, read_shard
from lmopt.data.corpus import brown_documents, is_validation, strip_brown_tags
from lmopt.data.paths import data_home
from lmopt.data.tokenizer import EOT, load_qwen3, train_byte_bpe


def test_brown_tags_are_stripped():
    line = "``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ,/, ``/`` was/bedz won/vbn by/in Jr./np ./."
    assert strip_brown_tags(line) == '"Only a handful", the jury said, "was won by Jr.'


def test_brown_corpus_is_real_and_complete():
    docs = list(brown_documents())
    assert len(docs) == 500
    words = sum(len(text.split()) for _, text in docs)
    assert 0.95e6 < words < 1.2e6
    assert "/nn" not in docs[0][1] and docs[0][1].startswith("The Fulton County Grand Jury said Friday")
    n_val = sum(is_validation(doc_id) for doc_id, _ in docs)
    assert 10 <= n_val <= 45  # ~5% of documents


def test_bpe_training_is_deterministic():
    texts = [text for doc_id, text in brown_documents() if doc_id.startswith("ca")][:20]
    a, b = train_byte_bpe(texts, 1024), train_byte_bpe(texts, 1024)
    assert a.to_str() == b.to_str()
    assert a.token_to_id(EOT) == 0
    sample = "The jury said it did find that many of Georgia's laws are outmoded."
    assert a.decode(a.encode(sample).ids) == sample


def test_qwen3_tokenizer_is_the_real_vocabulary():
    tok = load_qwen3()
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.token_to_id(EOT) == 151643
    assert tok.get_vocab_size() == 151669


def test_prepared_brown_matches_its_metadata():
    data = load_prepared("brown", "bpe-8192")
    assert data.meta["tokens"]["train"] == len(data.train) and data.meta["tokens"]["val"] == len(data.val)
    assert data.train.dtype == np.uint16
    assert data.train.max() < 8192
    assert (data.train == data.meta["eot_id"]).sum() == data.meta["documents"]["train"]


FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")


def write_fineweb_parquet(path, texts):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = len(texts)
    table = pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-21T00:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.95] * n,
        "token_count": [len(t.split()) if t else 0 for t in texts],
    })
    assert tuple(table.column_names) == FINEWEB_COLUMNS
    pq.write_table(table, path)


def test_fineweb_parquet_preparation(tmp_path, monkeypatch):
    texts = [text for _, text in brown_documents()][:120]  # real prose standing in for web pages
    source = tmp_path / "fineweb"
    source.mkdir()
    write_fineweb_parquet(source / "000_00000.parquet", texts[:60])
    write_fineweb_parquet(source / "000_00001.parquet", texts[60:])
    packages = data_home() / "packages"
    monkeypatch.setenv("LMOPT_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "packages").symlink_to(packages)
    out = prepare("fineweb", "qwen3", source=str(source), name="fw-sample", log=lambda _: None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"]["train"] + meta["documents"]["val"] == 120
    assert meta["documents"]["val"] > 0
    train = read_shard(out / "train.bin")
    assert train.dtype == np.uint32 and (train == 151643).sum() == meta["documents"]["train"]
    data = load_prepared("fw-sample", "qwen3")
    assert len(data.train) == meta["tokens"]["train"]
    limited = prepare("fineweb", "qwen3", source=str(source), name="fw-10", max_docs=10, log=lambda _: None)
    assert sum(json.loads((limited / "meta.json").read_text())["documents"].values()) == 10


def test_unprepared_data_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("LMOPT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lmopt data prepare --corpus fineweb --tokenizer qwen3"):
        load_prepared("fineweb", "qwen3")


def test_damaged_inputs_get_clear_errors_and_leave_nothing_behind(tmp_path, monkeypatch, capsys):
    from lmopt.cli import main
    from lmopt.data.shards import ShardError

    packages = data_home() / "packages"
    monkeypatch.setenv("LMOPT_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "packages").symlink_to(packages)
    # a local path that does not exist is not mistaken for a Hugging Face dataset name
    assert main(["data", "prepare", "--corpus", "fineweb", "--tokenizer", "qwen3", "--source", str(tmp_path / "no"),
                 "--name", "x"]) == 2
    out = capsys.readouterr().out
    assert "no such file or directory" in out and "Traceback" not in out
    # a parquet row with null text: the file and row are named, no temporary shard is left
    source = tmp_path / "fw"
    source.mkdir()
    texts = [text for _, text in brown_documents()][:40]
    write_fineweb_parquet(source / "a.parquet", [*texts[:20], None, *texts[20:]])
    with pytest.raises(ValueError, match=r"a.parquet, row 20: 'text' is None"):
        prepare("fineweb", "qwen3", source=str(source), name="nulls", log=lambda _: None)
    assert not list((tmp_path / "data" / "prepared").rglob(".*.tmp-*"))
    # a meta.json that lost a key
    write_fineweb_parquet(source / "a.parquet", texts)
    out_dir = prepare("fineweb", "qwen3", source=str(source), name="ok", log=lambda _: None)
    meta = json.loads((out_dir / "meta.json").read_text())
    del meta["vocab_size"]
    (out_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="lacks vocab_size; delete .* and prepare the data again"):
        load_prepared("ok", "qwen3")
    # --debug shows the traceback that is otherwise one line
    with pytest.raises(ShardError):
        main(["--debug", "train", "--data", "ok", "--tokenizer", "qwen3", "--preset", "qwen3-44m", "--steps", "1"])
