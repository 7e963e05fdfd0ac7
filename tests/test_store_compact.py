"""`slm-lens compact`: readers see every shard's rows once, before, during and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import duckdb
import pytest

from analysis import schema
from analysis.store import CorruptCompactionWarning, open_store
from extractor.cli import main
from extractor.store import StoreWriter
from extractor.store.compact import COMPACT_CRASH_POINTS, CompactionError, compact_store
from extractor.store.faults import CRASH_ENV, CRASH_EXIT_CODE
from extractor.store.gc import collect_garbage
from tests.store_factory import build_store

VIEWS = ("vocab", "utterances", "words", "tokens", "lens", "word_lens", "failures")


def _rows(uri: str) -> dict[str, list[tuple]]:
    con = open_store(uri)
    return {v: con.sql(f"SELECT * FROM {v} ORDER BY ALL").fetchall() for v in VIEWS}


def _parquet_files(root, table: str) -> list:
    return sorted((root / table).rglob("*.parquet"))


def _glob_equals_views(root) -> None:
    """After gc, a plain hive glob of the partitions gives exactly the views' rows."""
    con = open_store(str(root))
    for table in ("tokens", "lens", "word_lens", "words"):
        pattern = f"{root}/{table}/*/*.parquet"
        by_glob = duckdb.sql(
            f"SELECT * EXCLUDE (run_id) FROM read_parquet('{pattern}', hive_partitioning = true) "
            "ORDER BY ALL"
        ).fetchall()
        by_view = con.sql(f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL").fetchall()
        assert by_glob == by_view, table


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    build_store(str(root), n_runs=2, n_utts=9, shards=3)
    return root


def test_compaction_keeps_every_row_and_readers_switch_to_the_merged_files(store, capsys):
    before = _rows(str(store))
    small = len(_parquet_files(store, "lens"))
    replaced = sum(len(_parquet_files(store, t)) for t in schema.SHARD_TABLES)

    assert main(["compact", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.count("compaction 1 merged 3 shard(s)") == 2
    assert _rows(str(store)) == before
    shards = open_store(str(store)).sql("SELECT run_id, shard, compaction FROM shards").fetchall()
    assert len(shards) == 6 and {c for _, _, c in shards} == {1}
    # The replaced files stay for readers that listed the store just before the marker.
    assert len(_parquet_files(store, "lens")) == small + 2
    young = collect_garbage(str(store))
    assert young.garbage == [] and young.too_young == replaced

    # Compacting again finds nothing new; the writer counts compacted shards as committed.
    assert main(["compact", "--store", str(store)]) == 0
    assert "already compacted" in capsys.readouterr().out
    writer = StoreWriter(str(store))
    assert writer.committed_shards("run-0") == {0, 1, 2}

    report = collect_garbage(str(store), delete=True, min_age_s=0)
    assert len([g for g in report.garbage if g.startswith("lens/")]) == small
    assert len(_parquet_files(store, "lens")) == 2  # one merged file per run
    assert _rows(str(store)) == before
    assert all(writer.is_committed("run-1", s) for s in range(3)), "marker files gone, still held"
    _glob_equals_views(store)


def test_shards_committed_after_a_compaction_get_the_next_generation(store):
    compact_store(str(store), ["run-0"])
    writer = StoreWriter(str(store))
    with writer.shard("run-0", 7) as sw:
        sw.write(
            "tokens",
            [
                {"utterance_id": "late", "position": i, "token_id": i, "modality": "text"}
                for i in range(4)
            ],
        )
        sw.commit()
    before = _rows(str(store))
    assert sum(r[0] == "late" for r in before["tokens"]) == 4

    (report,) = compact_store(str(store), ["run-0"])
    assert report.generation == 2 and report.shards == 1
    assert _rows(str(store)) == before
    collect_garbage(str(store), delete=True, min_age_s=0)
    assert _rows(str(store)) == before
    gens = open_store(str(store), ["run-0"]).sql("SELECT shard, compaction FROM shards").fetchall()
    assert dict(gens) == {0: 1, 1: 1, 2: 1, 7: 2}


@pytest.mark.parametrize("point", COMPACT_CRASH_POINTS)
def test_a_compaction_killed_at_any_point_leaves_old_or_new_rows(store, tmp_path, point):
    before = _rows(str(store))
    flag = tmp_path / "crashed"
    crashed = subprocess.run(
        [sys.executable, "-m", "extractor.cli", "compact", "--store", str(store), "--run", "run-1"],
        env={**os.environ, CRASH_ENV: f"{point}:-1:{flag}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _rows(str(store)) == before, f"readers after a crash at {point}"
    torn = point == "compact_mid_marker"
    assert any(issubclass(w.category, CorruptCompactionWarning) for w in seen) == torn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptCompactionWarning)
        (report,) = compact_store(str(store), ["run-1"])  # the re-run completes the job
        assert (report.skipped is None) == (point != "compact_after_marker")
        assert report.generation in (None, 2 if torn else 1)
        collect_garbage(str(store), delete=True, min_age_s=0)
    assert _rows(str(store)) == before  # no warnings now: gc removed the torn marker
    assert not list(store.rglob("_tmp-*")) and not list(store.rglob("*.partial"))
    _glob_equals_views(store)


def test_a_compaction_that_lost_a_file_is_ignored_and_the_shards_files_serve(store):
    before = _rows(str(store))
    compact_store(str(store), ["run-0"])
    merged = next(p for p in _parquet_files(store, "lens") if p.name.startswith("compact-"))
    merged.unlink()
    with pytest.warns(CorruptCompactionWarning, match="missing"):
        assert _rows(str(store)) == before
    with pytest.warns(CorruptCompactionWarning):
        report = collect_garbage(str(store), delete=True, min_age_s=0)
    # The broken compaction and its other files go; the shards' own files stay.
    assert schema.compaction_path("run-0", 1) in report.garbage
    assert all(g.split("/")[-1].startswith("compact-") for g in report.garbage if ".parquet" in g)
    assert _rows(str(store)) == before
    (again,) = compact_store(str(store), ["run-0"])  # gc removed the broken marker's name
    assert again.generation == 1 and again.shards == 3 and _rows(str(store)) == before


def test_rows_that_do_not_add_up_publish_nothing(store):
    marker = store / schema.commit_path("run-0", 1)
    data = json.loads(marker.read_text())
    data["rows"]["lens"] += 1
    marker.write_text(json.dumps(data))
    with pytest.raises(CompactionError, match=r"lens has \d+ rows in the merged files but"):
        compact_store(str(store), ["run-0"])
    assert not (store / schema.COMPACTIONS_DIR).exists()
    assert not [p for p in store.rglob("*.parquet") if "compact-" in p.name]


def test_running_runs_are_left_alone_and_unknown_runs_named(store, capsys):
    StoreWriter(str(store)).write_run("run-1", status="running")
    reports = compact_store(str(store))
    assert [r.skipped is None for r in reports] == [True, False]
    assert "status is running" in reports[1].describe()
    assert main(["compact", "--store", str(store), "--run", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_compaction_on_s3(s3_env):
    uri = f"s3://{s3_env}/stores/c"
    build_store(uri, n_runs=1, n_utts=6, shards=3)
    before = _rows(uri)
    (report,) = compact_store(uri)
    assert report.shards == 3 and _rows(uri) == before
    collect_garbage(uri, delete=True, min_age_s=0)
    assert _rows(uri) == before
    con = open_store(uri)
    assert con.sql("SELECT count(DISTINCT compaction) FROM shards").fetchone()[0] == 1


def test_a_lost_compacted_file_after_gc_loses_nothing_gc_can_keep(store, tmp_path):
    """The shards' own files are gone (gc), then a merged file is lost: readers no longer
    see those shards (a re-run would redo them), and gc keeps every surviving copy, so
    restoring the file brings every row back."""
    before = _rows(str(store))
    compact_store(str(store), ["run-0"], target_file_bytes=1)  # a file per row group
    collect_garbage(str(store), delete=True, min_age_s=0)
    lost = next(p for p in _parquet_files(store, "lens") if p.name.startswith("compact-"))
    saved = tmp_path / "saved.parquet"
    saved.write_bytes(lost.read_bytes())
    lost.unlink()
    with pytest.warns(CorruptCompactionWarning, match="restore"):
        damaged = _rows(str(store))
    assert len(damaged["lens"]) < len(before["lens"])
    assert StoreWriter(str(store)).committed_shards("run-0") == set()  # a re-run redoes them
    with pytest.warns(CorruptCompactionWarning):
        report = collect_garbage(str(store), delete=True, min_age_s=0)
    kept = [g for g in report.garbage if "run-0" in g and not g.startswith("_attempts")]
    assert kept == [], "gc deleted the only copies of run-0's rows"
    saved.rename(lost)
    assert _rows(str(store)) == before


def test_a_late_writer_of_a_compacted_shard_yields(store):
    compact_store(str(store), ["run-0"])
    collect_garbage(str(store), delete=True, min_age_s=0)  # the shard's own files are gone
    before = _rows(str(store))
    shards = open_store(str(store)).sql("SELECT * FROM shards ORDER BY ALL").fetchall()
    with StoreWriter(str(store)).shard("run-0", 1) as late:
        late.write("utterances", [{"shard": 1, "utterance_id": "late", "n_tokens": 1}])
        outcome = late.commit()
    assert outcome["superseded"] and outcome["compaction"] == 1
    assert _rows(str(store)) == before
    assert open_store(str(store)).sql("SELECT * FROM shards ORDER BY ALL").fetchall() == shards


def test_a_marker_put_whose_answer_was_lost_still_counts(store, monkeypatch):
    from extractor.store import compact

    real, calls = compact.write_bytes, []

    def lost_answer(fs, path, data, *, exclusive=False):
        written = real(fs, path, data, exclusive=exclusive)
        if "_compactions" in path and not calls:
            calls.append(path)
            raise ConnectionResetError("connection reset after the PUT landed")
        return written

    monkeypatch.setattr(compact, "write_bytes", lost_answer)
    before = _rows(str(store))
    (report,) = compact_store(str(store), ["run-0"])
    assert calls and report.generation == 1 and report.skipped is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damaged compaction
        assert _rows(str(store)) == before


def test_a_long_compaction_keeps_its_files_from_gc(store, monkeypatch):
    """gc during a compaction whose files are older than the grace period: the compaction's
    fresh journal keeps them (a local rename keeps the write time)."""
    from extractor.store import compact

    real = compact._taken_meanwhile

    def gc_midway(fs, root, run_id, todo):
        old = time.time() - 7200
        for path in store.rglob("*compact-*.parquet"):
            os.utime(path, (old, old))
        collect_garbage(str(store), delete=True)  # the default grace period
        return real(fs, root, run_id, todo)

    monkeypatch.setattr(compact, "_taken_meanwhile", gc_midway)
    before = _rows(str(store))
    (report,) = compact_store(str(store), iter(["run-1"]))  # any iterable of run ids
    assert report.generation == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(str(store)) == before
    assert not list(store.rglob("compaction-00001/*.json")), "the journal goes with success"


def test_a_compactor_that_lost_the_race_reports_it(store, monkeypatch):
    from extractor.store import compact

    real, raced = compact._Merge.check_rows, []

    def other_compactor_first(self, todo):
        if not raced:
            raced.append(True)
            compact_store(str(store), [self.run_id])  # publishes generation 1 meanwhile
        return real(self, todo)

    monkeypatch.setattr(compact._Merge, "check_rows", other_compactor_first)
    before = _rows(str(store))
    (report,) = compact_store(str(store), ["run-0"])
    assert "another compaction took shards [0, 1, 2]" in report.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(str(store)) == before
    assert len(list((store / schema.COMPACTIONS_DIR).rglob("*.json"))) == 1


def test_readers_of_a_compacted_run_use_the_compaction_s_copy_of_each_marker(store):
    compact_store(str(store), ["run-0"])
    con = open_store(str(store), ["run-0"])
    shards = con.sql("SELECT * EXCLUDE (compaction) FROM shards ORDER BY shard").fetchall()
    for marker in (store / schema.COMMITS_DIR / "run_id=run-0").glob("*.json"):
        marker.write_text("not read any more")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        con = open_store(str(store), ["run-0"])
        again = con.sql("SELECT * EXCLUDE (compaction) FROM shards ORDER BY shard").fetchall()
    assert again == shards and len(shards) == 3


def test_extract_compact_compacts_the_run_it_finished(tmp_path, capsys):
    import yaml

    from tests.service_helpers import small_config

    store = tmp_path / "store"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(str(store), tmp_path / "data")))
    argv = ["extract", str(config), "--in-process", "--no-progress", "--compact"]
    assert main(argv) == 0
    assert "compaction 1 merged" in capsys.readouterr().out
    shards = open_store(str(store)).sql("SELECT shard, compaction FROM shards").fetchall()
    assert len(shards) > 2 and {c for _, c in shards} == {1}


def _late_shard(store, shard: int, utt: str) -> None:
    with StoreWriter(str(store)).shard("run-0", shard) as sw:
        sw.write(
            "tokens",
            [
                {"utterance_id": utt, "position": i, "token_id": i, "modality": "text"}
                for i in range(3)
            ],
        )
        sw.commit()


def test_a_compaction_never_takes_shards_a_damaged_one_names(tmp_path):
    """Restoring a damaged compaction's file must not hide shards a later compaction holds."""
    store = tmp_path / "store"
    build_store(str(store), n_runs=1, n_utts=6, shards=2)
    compact_store(str(store))  # generation 1: shards 0 and 1
    _late_shard(store, 2, "late")  # committed after it
    collect_garbage(str(store), delete=True, min_age_s=0)
    before = _rows(str(store))
    lost = next(p for p in _parquet_files(store, "lens") if p.name.startswith("compact-"))
    saved = tmp_path / "saved.parquet"
    saved.write_bytes(lost.read_bytes())
    lost.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _late_shard(store, 1, "redone")  # a partial re-run redoes shard 1
        (report,) = compact_store(str(store))
        assert report.generation == 2 and report.shards == 1 and report.left == [1]
        assert "shards [1] left out" in report.describe()
        collect_garbage(str(store), delete=True, min_age_s=0)
    saved.rename(lost)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(str(store)) == before
    collect_garbage(str(store), delete=True, min_age_s=0)
    assert _rows(str(store)) == before


def test_gc_keeps_the_files_of_a_compaction_published_while_it_runs(store, monkeypatch):
    """The compaction publishes after gc listed the files and before it read the journals:
    its journal is gone, but gc reads the markers last, so it sees the compaction."""
    from extractor.store import compact, gc

    before = _rows(str(store))
    stash = {}
    real_publish_files, real_journaled = compact._Merge.publish_files, gc._journaled_files

    def publish_files(self):
        real_publish_files(self)
        stash["merge"] = self

    def gc_midway(fs, root, run_id, todo):
        merge = stash["merge"]
        old = time.time() - 7200  # a long compaction: its first files are old
        for path in store.rglob("*compact-*.parquet"):
            os.utime(path, (old, old))

        def publish_first(*args):
            merge.publish_marker(todo)  # the compactor wins the race here
            merge.forget_journal()
            return real_journaled(*args)

        monkeypatch.setattr(gc, "_journaled_files", publish_first)
        collect_garbage(str(store), delete=True)  # the default grace period
        monkeypatch.setattr(gc, "_journaled_files", real_journaled)
        return []

    monkeypatch.setattr(compact._Merge, "publish_files", publish_files)
    monkeypatch.setattr(compact, "_taken_meanwhile", gc_midway)
    (report,) = compact_store(str(store), ["run-0"])
    assert report.generation == 1 and report.skipped is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compaction is whole
        assert _rows(str(store)) == before
