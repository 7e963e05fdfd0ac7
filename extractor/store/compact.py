"""Merge a run's committed shards into files of a target size, atomically for readers.

Each shard writes its own files: a corpus run in shards of 10 utterances wrote 10^4
``lens`` files, and DuckDB read recall by layer over them 2.28x slower than over the
same rows as one shard (shards of 64: 1,563 files, 1.08x; ``bench/small_files.py``).
:func:`compact_run` rewrites the committed shards that no compaction holds yet into
large files and publishes one compaction marker naming those files and the shards
they replace. Readers take a shard's rows from its own files before the marker
exists and from the compaction's files after: never both, never neither. The replaced files stay
until ``slm-lens gc`` removes them after its grace period, so a reader that
listed the store just before the marker can finish reading them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis import schema
from analysis.index import (
    Commit,
    Compaction,
    CorruptCompactionWarning,
    check_store,
    marker_fields,
    parse_compaction,
    read_compactions,
    read_index,
)
from analysis.storage import list_files, resolve, with_retries, write_bytes
from analysis.store import open_store

from .faults import crash_point

#: Rows per Parquet row group of a compacted file (the shard writer's too).
ROW_GROUP_ROWS = 256 * 1024
#: Run states whose writers may still be committing shards.
ACTIVE_STATES = ("running", "submitted")
#: Points a compaction passes, in order (see :mod:`.faults`; shard -1).
COMPACT_CRASH_POINTS = (
    "compact_mid_files",  # one table's files written under temporary names, more to come
    "compact_mid_publish",  # one file under its final name, the others not
    "compact_mid_marker",  # every file final, the marker torn (half written in place)
    "compact_after_marker",  # published
)


class CompactionError(RuntimeError):
    """A compaction that could not be made safely (nothing was published)."""


@dataclass
class CompactionReport:
    """What a compaction of one run did, or why it did nothing."""

    run_id: str
    generation: int | None = None
    shards: int = 0
    files_before: int = 0
    files_after: int = 0
    bytes_after: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None
    left: list[int] = field(default_factory=list)  # shards a damaged compaction names

    def describe(self) -> str:
        if self.skipped:
            return f"{self.run_id}: nothing done ({self.skipped})"
        left = (
            f"; shards {self.left} left out: a damaged compaction names them" if self.left else ""
        )
        return (
            f"{self.run_id}: compaction {self.generation} merged {self.shards} shard(s), "
            f"{self.files_before:,} file(s) into {self.files_after:,} "
            f"({self.bytes_after:,} bytes, {sum(self.rows.values()):,} rows); "
            "the replaced files go at the next `slm-lens gc --delete` after its grace period" + left
        )


def compact_store(
    uri: str, runs: Iterable[str] | None = None, *, target_file_bytes: int = 64 << 20
) -> list[CompactionReport]:
    """Compact the given runs of the store at ``uri`` (every run when ``runs`` is None).

    A run whose latest status is running or submitted is left alone: its writers
    may still commit shards (they would simply stay uncompacted, but a finished
    run is what compaction is for). An unknown run id raises ``UnknownRunError``.
    """
    fs, root = resolve(uri)
    check_store(fs, root, uri)
    runs = None if runs is None else list(runs)
    con = open_store(uri, runs)
    status = dict(con.sql("SELECT run_id, status FROM runs").fetchall())
    wanted = sorted(runs) if runs is not None else sorted(_runs_with_commits(fs, root) | {*status})
    reports = []
    for run_id in wanted:
        if status.get(run_id) in ACTIVE_STATES:
            reports.append(
                CompactionReport(
                    run_id, skipped=f"its status is {status[run_id]}: compact it once it finished"
                )
            )
            continue
        reports.append(compact_run(fs, root, run_id, target_file_bytes=target_file_bytes))
    return reports


def _runs_with_commits(fs: pafs.FileSystem, root: str) -> set[str]:
    folder = f"{root}/{schema.COMMITS_DIR}"
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return {i.base_name.removeprefix("run_id=") for i in infos if i.type == pafs.FileType.Directory}


def compact_run(
    fs: pafs.FileSystem, root: str, run_id: str, *, target_file_bytes: int = 64 << 20
) -> CompactionReport:
    """Merge ``run_id``'s committed shards that no compaction holds into one compaction."""
    index = read_index(fs, root, [run_id])
    held = index.held_by_untrusted(run_id)
    todo = [c for c in index.commits if c.compaction is None and c.shard not in held]
    if not todo:
        why = "every committed shard is already compacted" if index.commits else "no shards"
        if held:
            why = f"shards {sorted(held)} are named by a damaged compaction: restore its file, "
            why += "or redo them all and gc it"
        return CompactionReport(run_id, skipped=why)
    generation = 1 + _last_generation(fs, root, run_id)
    merge = _Merge(fs, root, run_id, generation, target_file_bytes)
    try:
        for table in schema.SHARD_TABLES:
            merge.table(table, [f for c in todo for f in c.files.get(table, [])])
            crash_point("compact_mid_files", -1)
        merge.check_rows(todo)
        merge.publish_files()
        taken = _taken_meanwhile(fs, root, run_id, todo)
        if taken:
            merge.abort()
            return CompactionReport(
                run_id, skipped=f"another compaction took shards {taken} meanwhile"
            )
        if not merge.publish_marker(todo):
            merge.abort()
            return CompactionReport(
                run_id, skipped=f"another compaction {generation} of this run was published first"
            )
    except BaseException:
        merge.abort()
        raise
    merge.forget_journal()
    crash_point("compact_after_marker", -1)
    return CompactionReport(
        run_id,
        generation=generation,
        shards=len(todo),
        files_before=sum(len(f) for c in todo for f in c.files.values()),
        files_after=sum(len(f) for f in merge.final.values()),
        bytes_after=merge.bytes,
        rows=dict(merge.rows),
        left=sorted(s for s in held if s in {c.shard for c in index.commits}),
    )


def _taken_meanwhile(fs, root: str, run_id: str, todo: list[Commit]) -> list[int]:
    """Shards of ``todo`` that a compaction published since this one read the index."""
    trusted = read_compactions(fs, root, [run_id]).trusted
    held = {s for c in trusted for s in c.shards}
    return sorted(c.shard for c in todo if c.shard in held)


def _last_generation(fs: pafs.FileSystem, root: str, run_id: str) -> int:
    """The highest generation of the run's compaction markers present, trusted or not:
    a torn marker's name is not reused while it is there (gc removes it)."""
    folder = f"{root}/{schema.COMPACTIONS_DIR}/run_id={run_id}"
    last = 0
    for info in with_retries(lambda: list_files(fs, folder), f"listing {folder}"):
        name = info.base_name.lstrip(".")
        digits = name.removeprefix("compaction-")[:5]
        if name.startswith("compaction-") and digits.isdigit():
            last = max(last, int(digits))
    return last


class _Merge:
    """One compaction's files: written under temporary names, then published."""

    def __init__(self, fs, root: str, run_id: str, generation: int, target_bytes: int) -> None:
        self.fs, self.root, self.run_id = fs, root, run_id
        self.generation = generation
        self.token = uuid.uuid4().hex[:8]
        self.target_bytes = target_bytes
        self.temporary: dict[str, list[str]] = {}
        self.final: dict[str, list[str]] = {}
        self.rows: dict[str, int] = {}
        self.bytes = 0

    def _names(self, table: str, seq: int) -> tuple[str, str]:
        folder = schema.partition_dir(table, self.run_id)
        base = schema.compacted_file_name(self.generation, self.token, seq)
        return f"{folder}/_tmp-{base}", f"{folder}/{base}"

    def table(self, table: str, sources: list[str]) -> None:
        """Stream ``sources`` (in shard order) into files of about the target size."""
        if not sources:
            return
        want = schema.TABLES[table]
        out: _RollingFile | None = None
        pending: list[pa.RecordBatch] = []
        pending_rows = 0

        def flush() -> None:
            nonlocal out, pending, pending_rows
            if not pending:
                return
            if out is None:
                tmp, final = self._names(table, len(self.temporary.get(table, [])))
                self.temporary.setdefault(table, []).append(tmp)
                self.final.setdefault(table, []).append(final)
                self.write_journal()  # names the file before it exists, and stays fresh
                out = _RollingFile(self.fs, f"{self.root}/{tmp}", want)
            out.write(pa.Table.from_batches(pending).select(want.names).cast(want))
            pending, pending_rows = [], 0
            if out.size >= self.target_bytes:
                self.bytes += out.close()
                out = None

        try:
            for rel in sources:
                with self.fs.open_input_file(f"{self.root}/{rel}") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=64 * 1024):
                        pending.append(batch)
                        pending_rows += batch.num_rows
                        if pending_rows >= ROW_GROUP_ROWS:
                            flush()
            flush()
        except BaseException:
            if out is not None:  # closed before abort() deletes it, so no upload lands later
                with contextlib.suppress(Exception):
                    out.close()
            raise
        if out is not None:
            self.bytes += out.close()

    def check_rows(self, todo: list[Commit]) -> None:
        """Rows in the written files (read from their footers) equal the shards' rows."""
        for table in schema.SHARD_TABLES:
            want = sum(c.rows.get(table, 0) for c in todo)
            got = 0
            for tmp in self.temporary.get(table, []):
                with self.fs.open_input_file(f"{self.root}/{tmp}") as f:
                    got += pq.ParquetFile(f).metadata.num_rows
            if got != want:
                raise CompactionError(
                    f"compacting {self.run_id}: {table} has {got} rows in the merged files but "
                    f"{want} in the shards' commit markers; nothing was published"
                )
            if got:
                self.rows[table] = got

    @property
    def journal(self) -> str:
        return schema.compaction_journal(self.run_id, self.generation, self.token)

    def write_journal(self) -> None:
        """Every file this compaction writes, refreshed as it goes: gc leaves the files of
        a fresh journal alone, however long the compaction takes."""
        names = sorted([*_flat(self.temporary), *_flat(self.final)])
        payload = json.dumps({"attempt": self.token, "files": names}).encode()
        path = f"{self.root}/{self.journal}"

        def put() -> None:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            write_bytes(self.fs, path, payload)

        with_retries(put, f"journaling compaction {self.generation} of {self.run_id}")

    def forget_journal(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.delete_file(f"{self.root}/{self.journal}")

    def publish_files(self) -> None:
        self.write_journal()
        for table, temps in self.temporary.items():
            for tmp, final in zip(temps, self.final[table], strict=True):
                src, dst = f"{self.root}/{tmp}", f"{self.root}/{final}"
                with_retries(lambda s=src, d=dst: self.fs.move(s, d), f"publishing {final}")
                crash_point("compact_mid_publish", -1)

    def publish_marker(self, todo: list[Commit]) -> bool:
        """Create the compaction marker unless this generation is taken; True if created."""
        payload = Compaction(
            run_id=self.run_id,
            generation=self.generation,
            token=self.token,
            shards={c.shard: marker_fields(c) for c in todo},
            files=self.final,
            rows=self.rows,
            bytes=self.bytes,
            compacted_at=str(dt.datetime.now(dt.UTC)),
        ).to_json()
        path = f"{self.root}/{schema.compaction_path(self.run_id, self.generation)}"
        crash_point("compact_mid_marker", -1, lambda: self._tear(path, payload))

        def put() -> bool:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # A PUT whose answer was lost is retried and finds the marker: ours, or not.
            return write_bytes(self.fs, path, payload, exclusive=True) or self._is_ours(path)

        return with_retries(put, f"publishing compaction {self.generation} of {self.run_id}")

    def _is_ours(self, path: str) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptCompactionWarning)
            found = parse_compaction(self.fs, path)
        return found is not None and found.token == self.token

    def _tear(self, path: str, payload: bytes) -> None:
        """Fault injection only: half the marker in place, as a killed write leaves."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(payload[: len(payload) // 2])

    def abort(self) -> None:
        """Best-effort removal of this compaction's files, temporary and published."""
        for rel in (*_flat(self.temporary), *_flat(self.final)):
            with contextlib.suppress(OSError):
                if self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File:
                    self.fs.delete_file(f"{self.root}/{rel}")
        self.forget_journal()


def _flat(files: dict[str, list[str]]) -> list[str]:
    return [f for names in files.values() for f in names]


class _RollingFile:
    """One Parquet file streamed to the store (zstd, row groups of ``ROW_GROUP_ROWS``)."""

    def __init__(self, fs: pafs.FileSystem, path: str, schema_: pa.Schema) -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.sink = fs.open_output_stream(path)
        self.writer = pq.ParquetWriter(self.sink, schema_, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    @property
    def size(self) -> int:
        return self.sink.tell()

    def close(self) -> int:
        self.writer.close()
        size = self.sink.tell()
        self.sink.close()
        return size
