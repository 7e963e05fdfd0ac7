"""Manifests as datasets: parts, globs, Hub layouts, ids-only planning, rows read per shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.speech.dataset import (
    ManifestError,
    control_pool,
    index_manifest,
    read_manifest,
    read_rows,
)
from extractor.speech.records import ManifestRowError, Utterance

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "birds", "sang", "over", "quiet", "hills"]


def _rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "id": f"u{i:05d}",
            "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4)),
            "audio": {"bytes": bytes([i % 256]) * 64, "path": None},
            "duration_s": 1.0 + i % 3,
        }
        for i in range(start, start + n)
    ]


def _parquet(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # bytes are not JSON: a JSONL manifest names its audio instead
    lines = [json.dumps({k: v for k, v in r.items() if k != "audio"}) for r in rows]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a row
    return path


def _hub_layout(root: Path, split: str = "test") -> Path:
    """A Hub dataset repository: README plus data/<split>-0000k-of-00003.parquet."""
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nconfigs: []\n---\n")
    for k in range(3):
        _parquet(root / "data" / f"{split}-{k:05d}-of-00003.parquet", _rows(10, 10 * k))
    return root


def _ids(items) -> list[str]:
    return [u.id for u in items if isinstance(u, Utterance)]


def test_a_hub_folder_reads_like_one_file(tmp_path):
    folder = _hub_layout(tmp_path / "hub")
    one = _parquet(tmp_path / "one.parquet", _rows(30))
    index = index_manifest(str(folder))
    assert [p.uri.rsplit("/", 1)[-1] for p in index.source.parts] == [
        f"test-{k:05d}-of-00003.parquet" for k in range(3)
    ]
    assert index.rows.ids == [f"u{i:05d}" for i in range(30)]
    whole = read_manifest(str(one))
    parts = read_manifest(str(folder))
    assert parts.utterances == whole.utterances and not parts.errors
    # A shard spanning two parts reads exactly its rows.
    shard = index.rows[8:13]
    assert _ids(read_rows(index.source, shard)) == [f"u{i:05d}" for i in range(8, 13)]


def test_globs_pick_parts_within_and_across_folders(tmp_path):
    _hub_layout(tmp_path / "hub")
    _jsonl(tmp_path / "hub" / "extra" / "more.jsonl", _rows(5, 100))
    only = index_manifest(str(tmp_path / "hub" / "data" / "*-00001-of-*.parquet"))
    assert only.rows.ids == [f"u{i:05d}" for i in range(10, 20)]
    deep = index_manifest(str(tmp_path / "hub" / "**" / "*.jsonl"))
    assert deep.rows.ids == [f"u{i:05d}" for i in range(100, 105)]
    mixed = read_manifest(str(tmp_path / "hub"))  # a folder: Parquet and JSONL parts
    assert len(mixed.utterances) == 35 and not mixed.errors
    with pytest.raises(ManifestError, match=r"no manifest file .* matches"):
        index_manifest(str(tmp_path / "hub" / "*.csv"))
    # A glob takes manifest parts only, never a hidden or underscore folder; [!x] negates.
    _jsonl(tmp_path / "hub" / "_tmp" / "stale.jsonl", _rows(2, 900))
    _jsonl(tmp_path / "hub" / ".cache" / "stale.jsonl", _rows(2, 950))
    assert index_manifest(str(tmp_path / "hub" / "**" / "*.jsonl")).rows.ids == deep.rows.ids
    with pytest.raises(ManifestError):
        index_manifest(str(tmp_path / "hub" / "R*"))  # README.md is not a part
    negated = index_manifest(str(tmp_path / "hub" / "data" / "test-0000[!0]-of-*.parquet"))
    assert negated.rows.ids == [f"u{i:05d}" for i in range(10, 30)]
    # A path with glob characters that exists is that file, not a pattern.
    literal = _jsonl(tmp_path / "run[1]" / "m.jsonl", _rows(2))
    assert len(index_manifest(str(literal)).rows) == 2


def test_a_folder_of_several_splits_or_arrow_files_is_refused_with_the_way_out(tmp_path):
    folder = _hub_layout(tmp_path / "hub")
    _parquet(folder / "data" / "train-00000-of-00001.parquet", _rows(3, 500))
    with pytest.raises(
        ManifestError, match=r"\(data/test, data/train\).*hub/data/test-\*\.parquet"
    ):
        index_manifest(str(folder))
    # The names the Hub gives parts (with a hash) and the Parquet converter's layout.
    hashed = _hub_layout(tmp_path / "hashed")
    _parquet(hashed / "data" / "train-00000-of-00001-2a1df75c6bce91ab.parquet", _rows(2, 600))
    with pytest.raises(ManifestError, match="data/test, data/train"):
        index_manifest(str(hashed))
    converted = tmp_path / "converted"
    _parquet(converted / "default" / "train" / "0000.parquet", _rows(2))
    _parquet(converted / "default" / "test" / "0000.parquet", _rows(2, 10))
    _parquet(converted / "fr" / "test" / "0000.parquet", _rows(2, 20))
    with pytest.raises(
        ManifestError, match=r"default/test, default/train, fr/test.*default/test/\*"
    ):
        index_manifest(str(converted))
    assert len(index_manifest(str(converted / "default" / "test" / "*.parquet")).rows) == 2
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    with pytest.raises(ManifestError, match="save_to_disk"):
        index_manifest(str(saved))
    with pytest.raises(ManifestError, match="no such file or folder"):
        index_manifest(str(tmp_path / "absent"))


def test_fingerprint_follows_content_not_place(tmp_path):
    a = _hub_layout(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert index_manifest(str(a)).fingerprint == index_manifest(str(b)).fingerprint
    changed = _rows(10, 10)
    changed[3]["text"] = "a different sentence"
    _parquet(b / "data" / "test-00001-of-00003.parquet", changed)
    assert index_manifest(str(a)).fingerprint != index_manifest(str(b)).fingerprint
    # One JSONL file keeps the digest of its bytes, as run ids always had it.
    import hashlib

    path = _jsonl(tmp_path / "m.jsonl", _rows(4))
    assert (
        index_manifest(str(path)).fingerprint
        == (hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    )


def _corrupt_column_chunk(path: Path, row_group: int, column: str) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(
        meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column
    )
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def test_planning_reads_ids_only_and_a_bad_row_group_fails_only_its_rows(tmp_path):
    path = _parquet(tmp_path / "m.parquet", _rows(12), row_group_size=4)
    _corrupt_column_chunk(path, 1, "audio.bytes")  # rows 4..7: their audio is garbage
    index = index_manifest(str(path))  # never touches the audio column
    assert len(index.rows) == 12 and not index.errors
    items = read_rows(index.source, index.rows)
    assert _ids(items) == [f"u{i:05d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    bad = [e for e in items if isinstance(e, ManifestRowError)]
    assert [e.utterance_id for e in bad] == [f"u{i:05d}" for i in range(4, 8)]
    assert all("manifest row" in str(e) and "cannot be read" in str(e) for e in bad)


def test_a_manifest_changed_after_planning_fails_its_rows_not_silently(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", _rows(6))
    index = index_manifest(str(path))
    rows = _rows(6)
    rows[0], rows[1] = rows[1], rows[0]  # same lengths, other ids at the planned offsets
    _jsonl(path, rows)
    items = read_rows(index.source, index.rows)
    assert _ids(items) == [f"u{i:05d}" for i in range(2, 6)]
    assert all("manifest changed" in str(e) for e in items[:2])


def test_jsonl_errors_name_their_line_and_duplicates_are_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    good = [json.dumps({"id": "a", "text": "one"}), json.dumps({"id": "b", "text": "two"})]
    path.write_text("\n".join([good[0], "", "{not json", "[1, 2]", good[1], good[0]]) + "\n")
    manifest = read_manifest(str(path))
    assert [u.id for u in manifest.utterances] == ["a", "b"]
    messages = [str(e) for e in manifest.errors]
    assert any("manifest line 3" in m for m in messages)
    assert any("is a list, not an object" in m for m in messages)
    assert any("duplicate utterance id" in m for m in messages)


def test_parts_on_s3_are_read_by_offset(s3_env, tmp_path):
    from analysis.storage import s3_filesystem

    fs = s3_filesystem()
    for k in range(2):
        local = _jsonl(tmp_path / f"p{k}.jsonl", _rows(5, 5 * k))
        with fs.open_output_stream(f"{s3_env}/corpus/part-{k}.jsonl") as f:
            f.write(local.read_bytes())
    index = index_manifest(f"s3://{s3_env}/corpus")
    assert [p.uri for p in index.source.parts] == [
        f"s3://{s3_env}/corpus/part-{k}.jsonl" for k in range(2)
    ]
    assert _ids(read_rows(index.source, index.rows[3:7])) == [f"u{i:05d}" for i in range(3, 7)]


def test_the_control_pool_is_a_spread_sample_whatever_the_parts(tmp_path):
    rows = _rows(30)
    one = index_manifest(str(_parquet(tmp_path / "one.parquet", rows)))
    three = index_manifest(str(_hub_layout(tmp_path / "hub")))
    # Small manifests: every utterance, in manifest order (as the whole manifest gave).
    assert [u for u, _ in one.source.control_pool] == one.rows.ids
    assert one.source.control_pool == three.source.control_pool
    small_one = control_pool(one.source, one.rows, 7)
    small_three = control_pool(three.source, three.rows, 7)
    assert small_one == small_three and len(small_one) == 7
    picked = [u for u, _ in small_one]
    assert picked == sorted(picked) and picked != one.rows.ids[:7]  # spread, in order


def test_knowledge_pair_fields_are_validated_per_row(tmp_path):
    rows = [
        {"id": "ok", "text": "a", "pair_id": 7, "pair_role": "correct"},
        {"id": "role", "text": "a", "pair_id": "p", "pair_role": "wrong"},
        {"id": "alone", "text": "a", "pair_role": "counterfactual"},
    ]
    manifest = read_manifest(str(_jsonl(tmp_path / "m.jsonl", rows)))
    assert [(u.id, u.pair_id) for u in manifest.utterances] == [("ok", "7")]
    errors = {e.utterance_id: str(e) for e in manifest.errors}
    assert "pair_role must be one of" in errors["role"] and "manifest row 2" in errors["role"]
    assert "given together" in errors["alone"]


def test_a_same_size_parquet_edit_changes_the_fingerprint(tmp_path):
    """An edit that keeps the size and the footer (here: one letter of a text, in place,
    uncompressed) is still a new dataset: the modification time is in the digest."""
    import os

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(50)), path, compression="NONE")
    before = index_manifest(str(path)).fingerprint
    data = bytearray(path.read_bytes())
    footer = bytes(data[-8 - int.from_bytes(data[-8:-4], "little") :])
    at = data.index(b"birds sang over")
    data[at : at + 5] = b"words"
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # written later
    assert path.stat().st_size == stat.st_size and path.read_bytes().endswith(footer)
    assert index_manifest(str(path)).fingerprint != before
    assert any("words sang over" in u.text for u in read_manifest(str(path)).utterances)


def test_bad_lines_of_different_parts_keep_distinct_ids(tmp_path):
    for k in range(2):
        part = tmp_path / "m" / f"p{k}.jsonl"
        part.parent.mkdir(exist_ok=True)
        part.write_text(json.dumps({"id": f"ok{k}", "text": "a"}) + "\n{broken\n")
    manifest = read_manifest(str(tmp_path / "m"))
    ids = [e.utterance_id for e in manifest.errors]
    assert len(set(ids)) == 2 and all(i.endswith(":line2") for i in ids)
    assert all("manifest line 2 of" in str(e) for e in manifest.errors)
    glob = read_manifest(f"file://{tmp_path}/m/p?.jsonl")  # '?' is a wildcard, not a query
    assert [u.id for u in glob.utterances] == ["ok0", "ok1"]
