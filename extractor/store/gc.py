"""Remove what no commit marker lists: the leftovers of crashed writers.

A committed shard's writer already deletes its shard's other attempts (see
:mod:`.writer`); what remains after a crash (files of an attempt that never
committed, ``.partial`` temporaries, unreadable markers, stale journals) is
invisible to readers but costs storage and confuses anyone who globs the
files. :func:`collect_garbage` finds it; it deletes only when asked, and never
touches runs that are still running (their writers are mid-flight).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from analysis import schema
from analysis.index import StoreIndex, check_store, read_index
from analysis.storage import PARTIAL_SUFFIX, list_files, resolve, with_retries
from analysis.store import open_store

from .writer import journal_files

#: Run states whose writers may still be at work.
ACTIVE_STATES = ("running", "submitted")
#: Files younger than this are never collected: a run resumed after gc read the
#: statuses may be writing them (and committing) right now.
MIN_AGE_S = 3600.0
_SHARD = re.compile(r"shard-(\d+)")


@dataclass
class GarbageReport:
    """What is (or, in a dry run, would be) deleted, and which runs were left alone."""

    garbage: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped_active_runs: list[str] = field(default_factory=list)
    deleted: bool = False
    too_young: int = 0

    def describe(self) -> str:
        verb = "deleted" if self.deleted else "would delete (dry run; pass --delete)"
        lines = [f"{verb} {len(self.garbage)} file(s), {self.bytes:,} bytes"]
        lines += [f"  {path}" for path in self.garbage]
        if self.skipped_active_runs:
            lines.append(f"left alone, still running: {', '.join(self.skipped_active_runs)}")
        if self.too_young:
            lines.append(f"left alone, younger than the grace period: {self.too_young} file(s)")
        return "\n".join(lines)


def _run_of(rel: str) -> str | None:
    for part in rel.split("/")[1:3]:
        if part.startswith("run_id="):
            return part.removeprefix("run_id=")
    return None


def _shard_of(rel: str) -> int | None:
    """Shard number of a ``_commits``/``_attempts``/``_failed`` path (``.../shard-N...``)."""
    parts = rel.split("/")
    match = _SHARD.match(parts[2]) if len(parts) >= 3 else None
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Needed:
    """What gc keeps: everything a reader trusts, and the last copies an untrusted compaction
    holds (a restored file makes it whole again)."""

    data: set[str]  # data files
    compactions: set[str]  # compaction markers
    markers: set[tuple[str, int]]  # (run, shard) whose commit markers stay
    committed: set[tuple[str, int]]  # (run, shard) committed: their failure records go

    @classmethod
    def of(cls, index: StoreIndex) -> Needed:
        last_copies = index.untrusted_but_needed
        held = {(c.run_id, s) for c in last_copies for s in c.shards}
        return cls(
            data={f for t in schema.SHARD_TABLES for f in index.data_files(t)}
            | {f for c in last_copies for files in c.files.values() for f in files},
            compactions={
                schema.compaction_path(c.run_id, c.generation)
                for c in [*index.compactions, *last_copies]
            },
            markers=index.committed | held,
            committed=index.committed,
        )


def is_garbage(rel: str, needed: Needed) -> bool:
    """Whether the file at ``rel`` (store-relative) is referenced by nothing gc keeps."""
    top, name = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
    if name.endswith(PARTIAL_SUFFIX):
        return True
    run_id = _run_of(rel)
    if top in schema.SHARD_TABLES:
        return rel not in needed.data
    if top == schema.COMPACTIONS_DIR:
        return rel not in needed.compactions  # torn, repeating another, or no longer needed
    if top == schema.COMMITS_DIR:
        return (run_id, _shard_of(rel)) not in needed.markers  # an untrusted marker
    if top == schema.PROBE_DIR:
        return True  # a driver that died before removing its probe
    if top == schema.ATTEMPTS_DIR:
        return True  # journals of a run no writer works on: their files go too
    if top == schema.FAILED_DIR:
        return (run_id, _shard_of(rel)) in needed.committed  # else it says why one is missing
    return False  # runs records, the store marker, the watcher's log: never garbage


def collect_garbage(
    uri: str,
    *,
    delete: bool = False,
    include_active: bool = False,
    min_age_s: float = MIN_AGE_S,
) -> GarbageReport:
    """Find (and with ``delete``, remove) every file of ``uri`` that no trusted marker needs.

    Runs whose latest status is running or submitted are skipped unless
    ``include_active``: their writers may be between a data file and its marker.
    Files younger than ``min_age_s`` are never collected, whatever their run's
    status said when gc read it (a run may be resumed while gc lists the store).
    """
    fs, root = resolve(uri)
    check_store(fs, root, uri)
    cutoff_ns = time.time_ns() - int(min_age_s * 1e9)
    # Files, then journals, then markers: a file a writer publishes while gc runs is named
    # either by a journal gc read or by a marker gc read after its journal was gone.
    files = with_retries(lambda: list_files(fs, root), f"listing {uri}")
    journaled = _journaled_files(fs, root, files, cutoff_ns)
    index = read_index(fs, root)
    needed = Needed.of(index)
    # A file a compaction replaced is as young as that compaction (readers that listed
    # the store just before it may still read it); a file a journal names is as young as
    # the journal (a long compaction refreshes its journal as it goes).
    young_since = _replaced_files(index) | journaled
    status = dict(open_store(uri).sql("SELECT run_id, status FROM runs").fetchall())
    active = set() if include_active else {r for r, s in status.items() if s in ACTIVE_STATES}
    report = GarbageReport(deleted=delete)
    skipped: set[str] = set()
    for info in files:
        rel = info.path.removeprefix(root + "/")
        if "/" not in rel or not is_garbage(rel, needed):
            continue
        run_id = _run_of(rel)
        if run_id in active:
            skipped.add(run_id)
            continue
        age_ns = max(info.mtime_ns or cutoff_ns + 1, young_since.get(rel, 0))
        if min_age_s > 0 and age_ns > cutoff_ns:
            report.too_young += 1
            continue
        report.garbage.append(rel)
        report.bytes += info.size or 0
    report.skipped_active_runs = sorted(skipped)
    if delete:
        for rel in report.garbage:
            with_retries(lambda r=rel: _delete(fs, f"{root}/{r}"), f"deleting {rel}")
    return report


def _replaced_files(index: StoreIndex) -> dict[str, int]:
    """Each data file a trusted compaction replaced -> that compaction's time (epoch ns)."""
    when = {(c.run_id, c.generation): _epoch_ns(c.compacted_at) for c in index.compactions}
    return {
        f: when[(c.run_id, c.compaction)]
        for c in index.commits
        if c.compaction is not None
        for files in c.files.values()
        for f in files
    }


def _journaled_files(fs, root: str, files, cutoff_ns: int) -> dict[str, int]:
    """Each file named by a journal younger than the cutoff -> the journal's time."""
    young = {}
    for info in files:
        rel = info.path.removeprefix(root + "/")
        recent = info.mtime_ns is None or info.mtime_ns > cutoff_ns
        if rel.startswith(f"{schema.ATTEMPTS_DIR}/") and rel.endswith(".json") and recent:
            with contextlib.suppress(OSError):  # gone meanwhile: its writer finished
                for name in journal_files(fs, info.path):
                    young[name] = max(young.get(name, 0), info.mtime_ns or time.time_ns())
    return young


def _epoch_ns(stamp: str) -> int:
    """An ISO time as epoch ns; a time that does not parse counts as now (the safe side)."""
    try:
        return int(dt.datetime.fromisoformat(stamp).timestamp() * 1e9)
    except ValueError:
        return time.time_ns()


def _delete(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
