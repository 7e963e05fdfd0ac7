"""Write the activation store: shards of Parquet, each made visible by one commit marker.

A :class:`ShardWriter` buffers rows per table, writes files of about
``target_file_bytes`` under temporary ``_tmp-`` names (so nothing in the
dataset folders looks final), and on :meth:`ShardWriter.commit` moves them to
their final names and writes the shard's commit marker, last. Readers only read
files that a marker lists, so a crash at any point leaves nothing half-visible,
and a re-run skips shards whose marker exists: no row is ever written twice.

Every attempt first names the files it is about to write in its journal
(``_attempts/``). The attempt that commits deletes the other attempts' files
(crashed runs, a retried shard whose first worker lived on), so a finished run
leaves no orphans; ``slm-lens gc`` sweeps whatever a crash left beyond that.
Every object-store call is retried with backoff, so a store that blinks for a
few seconds costs time, not data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import schema
from analysis.index import (
    Commit,
    Compaction,
    load_commit,
    marker_fields,
    read_compactions,
    read_index,
)
from analysis.storage import (
    PARTIAL_SUFFIX,
    exists,
    list_files,
    read_text,
    resolve,
    with_retries,
    write_bytes,
)

from .faults import crash_point

log = logging.getLogger("slm_lens.store")


class StoreContractError(ValueError):
    """Rows that do not fit the store contract."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StoreWriter:
    """Entry point of the writing side of a store at ``uri`` (local folder or s3://)."""

    def __init__(self, uri: str, *, target_file_bytes: int = 64 << 20) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)
        self.target_file_bytes = target_file_bytes
        self._ensure_store()

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _ensure_store(self) -> None:
        marker = self._path(schema.STORE_MARKER)

        def check_or_create() -> None:
            info = self.fs.get_file_info(marker)
            if info.type == pafs.FileType.NotFound:
                self.fs.create_dir(self.root, recursive=True)
                payload = json.dumps(
                    {"schema_version": schema.SCHEMA_VERSION, "created_at": str(_now())}
                )
                write_bytes(self.fs, marker, payload.encode())
                return
            version = json.loads(read_text(self.fs, marker)).get("schema_version")
            if version != schema.SCHEMA_VERSION:
                raise StoreContractError(
                    f"{self.uri} holds store schema version {version}; this slm-lens writes "
                    f"version {schema.SCHEMA_VERSION}: use a new store or a matching slm-lens"
                )

        with_retries(check_or_create, f"opening store {self.uri}")

    # Runs -------------------------------------------------------------------------------
    def write_run(self, run_id: str, **fields: Any) -> None:
        """Record a status change of a run (one small file; the latest one wins)."""
        _check_run_id(run_id)
        row = {name: fields.get(name) for name in schema.TABLES["runs"].names}
        row["updated_at"] = row.get("updated_at") or _now()
        if isinstance(row.get("config"), Mapping):
            row["config"] = json.dumps(row["config"], sort_keys=True)
        table = pa.Table.from_pylist([row], schema=schema.TABLES["runs"])
        stamp = row["updated_at"].strftime("%Y%m%dT%H%M%S%f")
        name = f"{schema.partition_dir('runs', run_id)}/{stamp}-{uuid.uuid4().hex[:6]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        crash_point(f"runs_record_{row['status']}", -1)
        with_retries(lambda: self._put(name, data), f"writing run record of {run_id}")

    def _put(self, rel: str, data: bytes, *, exclusive: bool = False) -> bool:
        path = self._path(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return write_bytes(self.fs, path, data, exclusive=exclusive)

    def _delete(self, rel: str) -> None:
        """Delete if present (a retried delete may find the file already gone)."""
        path = self._path(rel)

        def go() -> None:
            if exists(self.fs, path):
                self.fs.delete_file(path)

        with_retries(go, f"deleting {rel}")

    # Shard failures ---------------------------------------------------------------------
    def record_shard_failure(
        self, run_id: str, shard: int, utterance_ids: Iterable[str], error: str, message: str
    ) -> None:
        """Say why a shard did not commit; readers list its utterances in ``failures``.

        The shard stays uncommitted, so a re-run tries it again; once it commits,
        the record is deleted (readers ignore it for a committed shard anyway).
        """
        record = {
            "run_id": run_id,
            "shard": shard,
            "utterance_ids": list(utterance_ids),
            "error": error,
            "message": message[:4000],
            "at": str(_now()),
        }
        payload = json.dumps(record, sort_keys=True).encode()
        rel = schema.failed_path(run_id, shard)
        what = f"recording failure of {run_id} shard {shard}"
        with_retries(lambda: self._put(rel, payload), what)

    # Shards -----------------------------------------------------------------------------
    def committed_shards(self, run_id: str) -> set[int]:
        """Shards of ``run_id`` whose markers can be trusted (see ``load_commit``), and
        those a trusted compaction holds."""
        return {shard for _, shard in read_index(self.fs, self.root, [run_id]).committed}

    def is_committed(self, run_id: str, shard: int) -> bool:
        """True only for a marker that parses and whose files all exist, or a shard that a
        trusted compaction holds (its rows live in the compaction's files)."""
        if self.compaction_of(run_id, shard) is not None:
            return True
        path = self._path(schema.commit_path(run_id, shard))
        present = with_retries(
            lambda: self.fs.get_file_info(path).type == pafs.FileType.File,
            f"checking commit of {run_id} shard {shard}",
        )
        return present and load_commit(self.fs, path) is not None

    def compaction_of(self, run_id: str, shard: int) -> Compaction | None:
        """The trusted compaction holding ``shard``'s rows, if any."""
        trusted = read_compactions(self.fs, self.root, [run_id]).trusted
        return next((c for c in trusted if shard in c.shards), None)

    def shard(self, run_id: str, shard: int) -> ShardWriter:
        _check_run_id(run_id)
        return ShardWriter(self, run_id, shard)


class ShardWriter:
    """Rows of one shard of one run; invisible until :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes the
    shard's temporary files; leaving it normally does *not* commit (commit is an
    explicit decision of the caller).
    """

    def __init__(self, store: StoreWriter, run_id: str, shard: int) -> None:
        self.store = store
        self.run_id = run_id
        self.shard = shard
        self.attempt = uuid.uuid4().hex[:8]
        self._buffers: dict[str, list[pa.RecordBatch]] = {t: [] for t in schema.SHARD_TABLES}
        self._buffered_bytes: dict[str, int] = dict.fromkeys(schema.SHARD_TABLES, 0)
        self._files: dict[str, list[tuple[str, str]]] = {t: [] for t in schema.SHARD_TABLES}
        self.rows: dict[str, int] = dict.fromkeys(schema.SHARD_TABLES, 0)
        self.bytes_written = 0
        self.started = time.perf_counter()
        self.started_at = str(_now())
        self.committed = False
        self.journal = f"{schema.attempts_dir(run_id, shard)}/{self.attempt}.json"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.committed:
            self.abort()

    def write(self, table: str, rows: pa.Table | pa.RecordBatch | Iterable[Mapping]) -> None:
        """Buffer rows of ``table`` (Arrow data or dicts); files roll over by size."""
        if table not in self._buffers:
            raise StoreContractError(f"unknown store table {table!r}")
        if self.committed:
            raise StoreContractError(f"shard {self.shard} of {self.run_id} is already committed")
        want = schema.TABLES[table]
        if isinstance(rows, pa.Table | pa.RecordBatch):
            data = pa.table(rows) if isinstance(rows, pa.RecordBatch) else rows
            try:
                data = data.select(want.names).cast(want)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise StoreContractError(f"{table} rows do not fit the contract: {exc}") from exc
        else:
            try:
                data = pa.Table.from_pylist(list(rows), schema=want)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise StoreContractError(f"{table} rows do not fit the contract: {exc}") from exc
        if data.num_rows == 0:
            return
        self._buffers[table].extend(data.to_batches())
        self._buffered_bytes[table] += data.nbytes
        self.rows[table] += data.num_rows
        if self._buffered_bytes[table] >= self.store.target_file_bytes:
            self._flush(table)

    def _flush(self, table: str) -> None:
        batches = self._buffers[table]
        if not batches:
            return
        data = pa.Table.from_batches(batches, schema=schema.TABLES[table])
        seq = len(self._files[table])
        folder = schema.partition_dir(table, self.run_id)
        base = schema.data_file_name(self.shard, self.attempt, seq)
        tmp, final = f"{folder}/_tmp-{base}", f"{folder}/{base}"
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, compression="zstd", row_group_size=256 * 1024)
        payload = sink.getvalue().to_pybytes()
        self._files[table].append((tmp, final))
        self._write_journal()  # names the file before it exists: a crash leaves no stranger
        crash_point("mid_data_file", self.shard, lambda: self._tear(tmp, payload))
        with_retries(
            lambda: self.store._put(tmp, payload),
            f"writing {table} file of {self.run_id} shard {self.shard}",
        )
        self.bytes_written += len(payload)
        self._buffers[table] = []
        self._buffered_bytes[table] = 0

    def _write_journal(self) -> None:
        record = {
            "attempt": self.attempt,
            "started_at": self.started_at,
            "files": sorted(n for files in self._files.values() for pair in files for n in pair),
        }
        payload = json.dumps(record, sort_keys=True).encode()
        with_retries(
            lambda: self.store._put(self.journal, payload),
            f"journaling {self.run_id} shard {self.shard}",
        )

    def _tear(self, rel: str, payload: bytes) -> None:
        """Fault injection only: half of ``payload`` written in place, as a killed write leaves."""
        path = self.store._path(rel)
        self.store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.store.fs.open_output_stream(path) as f:
            f.write(payload[: len(payload) // 2])

    def _winner(self) -> Commit | None:
        """The trusted commit of this shard by another attempt, if one exists (a shard a
        compaction holds is committed even where its own marker or files are gone)."""
        covering = self.store.compaction_of(self.run_id, self.shard)
        if covering is not None:
            return covering.commit_of(self.shard)
        path = self.store._path(schema.commit_path(self.run_id, self.shard))
        if not with_retries(lambda: exists(self.store.fs, path), f"checking {path}"):
            return None
        commit = load_commit(self.store.fs, path)
        return commit if commit is not None and commit.attempt != self.attempt else None

    def commit(self, stats: Mapping[str, Any] | None = None) -> dict:
        """Flush, move files to their final names, then write the marker (last).

        If another attempt committed this shard first, this attempt's files are
        removed and that commit stands (returned with ``superseded: True``).
        After committing, the shard's other attempts' files are deleted.
        """
        for table in self._buffers:
            self._flush(table)
        crash_point("after_data_files", self.shard)
        winner = self._winner()
        if winner is not None:
            return self._yield_to(winner)
        fs = self.store.fs
        try:
            for table, files in self._files.items():
                for tmp, final in files:
                    src, dst = self.store._path(tmp), self.store._path(final)
                    with_retries(
                        lambda s=src, d=dst: _move(fs, s, d),
                        f"publishing {table} file of {self.run_id} shard {self.shard}",
                    )
                    crash_point("mid_publish", self.shard)
        except OSError:
            # Our files vanished: the attempt that committed meanwhile cleaned them up.
            winner = self._winner()
            if winner is not None:
                return self._yield_to(winner)
            raise
        marker = marker_fields(
            Commit(
                run_id=self.run_id,
                shard=self.shard,
                attempt=self.attempt,
                files={t: [final for _, final in f] for t, f in self._files.items() if f},
                rows={t: n for t, n in self.rows.items() if n},
                bytes=self.bytes_written,
                seconds=time.perf_counter() - self.started,
                committed_at=str(_now()),
                stats=dict(stats or {}),
            )
        )
        payload = json.dumps(marker, sort_keys=True).encode()
        winner = self._publish_marker(payload)
        if winner is not None:
            return self._yield_to(winner)
        self.committed = True
        crash_point("after_marker", self.shard)
        self._clean_up_after_commit()
        return marker

    def _publish_marker(self, payload: bytes) -> Commit | None:
        """Create the marker if none is there (None); else the other attempt's trusted
        commit that holds the place, as found then: looked up once, since a second look
        could find it set aside meanwhile and let this attempt believe it committed.

        A marker that cannot be trusted (truncated, lists lost files) is moved aside,
        never overwritten, and the exclusive create is tried again: two attempts
        that both find it untrusted cannot both commit.
        """
        rel = schema.commit_path(self.run_id, self.shard)
        what = f"committing {self.run_id} shard {self.shard}"
        crash_point("mid_marker", self.shard, lambda: self._tear(rel, payload))
        for _ in range(3):
            if with_retries(lambda: self.store._put(rel, payload, exclusive=True), what):
                return None
            winner = self._winner()
            if winner is not None:
                return winner
            self._set_aside(rel)
        raise StoreContractError(f"{what}: the marker kept changing under this writer")

    def _set_aside(self, rel: str) -> None:
        """Rename an untrusted marker to a hidden ``.partial`` name (gc removes it)."""
        folder, name = self.store._path(rel).rsplit("/", 1)
        aside = f"{folder}/.{name}.untrusted-{self.attempt}{PARTIAL_SUFFIX}"
        with contextlib.suppress(FileNotFoundError):  # another attempt moved it first
            self.store.fs.move(f"{folder}/{name}", aside)

    def _yield_to(self, winner: Commit) -> dict:
        self.abort()
        return {**winner.__dict__, "superseded": True}

    def _clean_up_after_commit(self) -> None:
        """Delete the other attempts' files and journals, this journal, any failure record.

        Best effort: whatever a failure here leaves, ``slm-lens gc`` removes.
        """
        folder = self.store._path(schema.attempts_dir(self.run_id, self.shard))
        try:
            journals = with_retries(
                lambda: list_files(self.store.fs, folder), f"listing attempts of {self.shard}"
            )
            for info in journals:
                rel = info.path.removeprefix(self.store.root + "/")
                if rel != self.journal and info.base_name.endswith(".json"):
                    for name in journal_files(self.store.fs, info.path):
                        self.store._delete(name)
                self.store._delete(rel)
            self.store._delete(schema.failed_path(self.run_id, self.shard))
        except OSError as exc:
            log.warning(
                "shard %d of %s committed; cleaning up other attempts failed (%s): "
                "run `slm-lens gc` to remove what is left",
                self.shard,
                self.run_id,
                exc,
            )

    def abort(self) -> None:
        """Best-effort removal of this attempt's files (temporary and published) and journal."""
        for files in self._files.values():
            for name in (n for pair in files for n in pair):
                with contextlib.suppress(OSError):
                    self.store._delete(name)
        with contextlib.suppress(OSError):
            self.store._delete(self.journal)
        self._files = {t: [] for t in schema.SHARD_TABLES}


def journal_files(fs, path: str) -> list[str]:
    """Files an attempt's journal names ([] if it is garbage).

    A journal the store cannot serve right now raises (after retries): the
    clean-up then stops and leaves it, and its files, for gc.
    """
    text = with_retries(lambda: read_text(fs, path), f"reading journal {path}")
    try:
        names = json.loads(text).get("files", [])
    except (ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and _is_shard_file(n)]


def _is_shard_file(rel: str) -> bool:
    """A data file path inside one of the shard tables (never a marker or a run record)."""
    table = rel.split("/", 1)[0]
    return table in schema.SHARD_TABLES and rel.endswith(".parquet") and ".." not in rel


def _move(fs, src: str, dst: str) -> None:
    # A retried move may find the source already gone and the target in place.
    gone = fs.get_file_info(src).type == pafs.FileType.NotFound
    if gone and fs.get_file_info(dst).type == pafs.FileType.File:
        return
    fs.move(src, dst)


def _check_run_id(run_id: str) -> None:
    if not schema.valid_run_id(run_id):
        raise StoreContractError(
            f"run id {run_id!r} must be letters, digits, '-', '_' or '.' (it becomes a path)"
        )
