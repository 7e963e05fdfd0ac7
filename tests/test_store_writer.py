"""The store writer on its own: rollover, invisibility until commit, contract checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from analysis import schema
from analysis.store import open_store
from extractor.store import StoreWriter
from extractor.store.writer import StoreContractError


def _tokens(utt: str, n: int) -> list[dict]:
    return [
        {
            "utterance_id": utt,
            "position": i,
            "token_id": i % 50,
            "modality": "text",
            "word_index": i // 3,
        }
        for i in range(n)
    ]


def test_files_roll_over_by_size_and_all_rows_land(tmp_path):
    writer = StoreWriter(str(tmp_path), target_file_bytes=4096)
    with writer.shard("r", 1) as shard:
        for u in range(20):
            shard.write("tokens", _tokens(f"u{u}", 200))
        marker = shard.commit()
    assert len(marker["files"]["tokens"]) > 5  # many files, none held whole in memory
    con = open_store(str(tmp_path))
    assert con.sql("SELECT count(*) FROM tokens").fetchone()[0] == 4000
    assert not list(tmp_path.rglob("_tmp-*")), "temporary names are gone after commit"


def test_nothing_is_visible_before_commit_and_abort_cleans_up(tmp_path):
    writer = StoreWriter(str(tmp_path), target_file_bytes=1024)
    shard = writer.shard("r", 1)
    shard.write("tokens", _tokens("u", 500))  # flushed to temporary files already
    assert list(tmp_path.rglob("_tmp-*"))
    assert open_store(str(tmp_path)).sql("SELECT count(*) FROM tokens").fetchone()[0] == 0
    with pytest.raises(RuntimeError), writer.shard("r", 2) as failing:
        failing.write("tokens", _tokens("v", 500))
        raise RuntimeError("worker failed mid-shard")
    shard.abort()
    assert not list(tmp_path.rglob("_tmp-*"))
    assert writer.committed_shards("r") == set()


def test_contract_violations_are_named(tmp_path):
    writer = StoreWriter(str(tmp_path))
    with writer.shard("r", 1) as shard:
        with pytest.raises(StoreContractError, match="unknown store table"):
            shard.write("logits", [])
        with pytest.raises(StoreContractError, match="tokens rows do not fit"):
            shard.write("tokens", [{"utterance_id": "u", "position": "first"}])
        with pytest.raises(StoreContractError, match="do not fit"):
            shard.write("tokens", pa.table({"utterance_id": ["u"]}))
        shard.commit()
        with pytest.raises(StoreContractError, match="already committed"):
            shard.write("tokens", _tokens("u", 1))
    with pytest.raises(StoreContractError, match="run id"):
        writer.shard("../escape", 1)


def test_writer_refuses_a_store_of_another_schema_version(tmp_path):
    StoreWriter(str(tmp_path))
    (tmp_path / schema.STORE_MARKER).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StoreContractError, match="schema version 99"):
        StoreWriter(str(tmp_path))


def test_an_unreachable_bucket_is_a_clear_error(monkeypatch):
    from analysis.storage import StorageError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    import analysis.storage as storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # keep the backoff instant
    monkeypatch.setattr(storage, "IO_ATTEMPTS", 3)
    monkeypatch.setenv("SLM_LENS_S3_RETRIES", "1")
    with pytest.raises(StorageError, match=r"opening store s3://nowhere/x: failed 3 times"):
        StoreWriter("s3://nowhere/x")
