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


def _commit(writer: StoreWriter, run: str, shard: int, n: int = 5) -> dict:
    with writer.shard(run, shard) as sw:
        sw.write("tokens", _tokens(f"u{shard}", n))
        return sw.commit()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing-file"])
def test_an_untrustworthy_marker_means_not_committed(tmp_path, damage):
    """Readers skip the shard with a warning; writers redo it; nothing raises."""
    from analysis.store import CorruptCommitWarning

    writer = StoreWriter(str(tmp_path))
    _commit(writer, "r", 1)
    marker = _commit(writer, "r", 2)
    path = tmp_path / schema.commit_path("r", 2)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_text('["not", "a", "marker"]')
    else:
        (tmp_path / marker["files"]["tokens"][0]).unlink()
    with pytest.warns(CorruptCommitWarning, match="shard-00002"):
        con = open_store(str(tmp_path))
    assert con.sql("SELECT count(*) FROM tokens").fetchone()[0] == 5  # shard 1 only
    with pytest.warns(CorruptCommitWarning):
        assert not writer.is_committed("r", 2)
    with pytest.warns(CorruptCommitWarning):
        assert writer.committed_shards("r") == {1}
    _commit(writer, "r", 2)  # the re-run redoes it
    assert writer.is_committed("r", 2)
    assert open_store(str(tmp_path)).sql("SELECT count(*) FROM tokens").fetchone()[0] == 10


def test_a_winner_set_aside_after_beating_this_attempt_is_still_yielded_to(tmp_path):
    """An attempt whose marker loses the exclusive create yields to the commit it found
    there, even if a third attempt sets that marker aside before this one looks again:
    it once looked twice and, finding nothing the second time, reported a commit that
    no marker held (a review)."""
    writer = StoreWriter(str(tmp_path))
    first = _commit(writer, "r", 1)
    with writer.shard("r", 1) as late:
        late.write("tokens", _tokens("u1", 5))
        looks = []
        real_winner = late._winner

        def winner_then_gone():
            looks.append(1)
            # Before publishing, no winner yet; at the failed create, the first commit;
            # any later look finds it set aside by a third attempt.
            if len(looks) == 1:
                return None
            return real_winner() if len(looks) == 2 else None

        late._winner = winner_then_gone
        outcome = late.commit()
    assert outcome.get("superseded") and outcome["attempt"] == first["attempt"]
    assert not late.committed


def test_a_marker_write_cut_short_by_a_size_limit_leaves_the_shard_uncommitted(tmp_path):
    """The issue's reproduction: the process may write only 40 bytes per file at commit."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import resource, signal
        from extractor.store import StoreWriter
        writer = StoreWriter({str(tmp_path)!r})
        with writer.shard("r", 3) as sw:
            sw.write("tokens", [dict(utterance_id="u", position=i, token_id=i,
                                     modality="text", word_index=0) for i in range(5)])
            sw._flush("tokens")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))
            sw.commit()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    writer = StoreWriter(str(tmp_path))
    assert not writer.is_committed("r", 3)
    assert not list((tmp_path / schema.COMMITS_DIR).rglob("*.json"))
    assert open_store(str(tmp_path)).sql("SELECT count(*) FROM tokens").fetchone()[0] == 0
    _commit(writer, "r", 3)
    assert writer.is_committed("r", 3)


def test_write_bytes_publishes_all_or_nothing(tmp_path):
    import pyarrow.fs as pafs

    from analysis.storage import write_bytes

    target = tmp_path / "marker.json"
    target.mkdir()  # the rename onto it will fail after the bytes are written
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_bytes(pafs.LocalFileSystem(), str(target), b'{"a": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]  # no .partial left
    write_bytes(pafs.LocalFileSystem(), str(tmp_path / "ok.json"), b'{"a": 1}')
    assert (tmp_path / "ok.json").read_bytes() == b'{"a": 1}'


def test_the_write_path_needs_no_duckdb():
    """A GPU worker's image carries torch and pyarrow; DuckDB is for readers only. The
    CLI's handler of named errors must not need it either (it would hide the real error)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['duckdb'] = None\n"
        "import extractor.service.worker, extractor.models, extractor.lens, analysis\n"
        "from analysis import storage, schema, index\n"
        "from extractor import cli\n"
        "def fail(args): raise index.StoreError('no store at s3://gone')\n"
        "cli._cmd_extract = fail\n"
        "sys.exit(cli.main(['extract', 'run.yaml']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "slm-lens extract: no store at s3://gone" in done.stderr
