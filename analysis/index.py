"""The store's index: which shards are committed and where their rows live.

Commit and compaction markers are the store contract's source of truth (files are
never found by globbing). Reading them needs only ``pyarrow.fs``: writers, gc and
compaction use this module without DuckDB, which only readers' views need
(:mod:`analysis.store`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from . import schema
from .storage import list_files, read_text, with_retries


class StoreError(Exception):
    """The store cannot be read as asked."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No slm-lens store at the URI."""


class StoreVersionError(StoreError):
    """The store was written by a newer slm-lens."""


class UnknownRunError(StoreError, KeyError):
    """A requested run id is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Commit:
    """A shard's commit marker. ``files`` are the files it committed; once a compaction
    covers the shard (``compaction`` is its generation) the rows are read from the
    compaction's files instead, and these may be gone (gc removes them)."""

    run_id: str
    shard: int
    files: dict[str, list[str]]
    rows: dict[str, int]
    bytes: int
    seconds: float
    committed_at: str
    stats: dict
    attempt: str = ""
    compaction: int | None = None


#: What a commit marker holds: :class:`Commit`'s fields but ``compaction`` (a reader's view).
MARKER_FIELDS = (
    "run_id",
    "shard",
    "attempt",
    "files",
    "rows",
    "bytes",
    "seconds",
    "committed_at",
    "stats",
)


def marker_fields(commit: Commit) -> dict:
    """The JSON object of ``commit``'s marker: written by the writer, parsed by
    :func:`load_commit`, copied into compactions."""
    return {name: getattr(commit, name) for name in MARKER_FIELDS}


@dataclass(frozen=True)
class Compaction:
    """A compaction marker: committed shards of one run, merged into larger files.

    Trusted, like a commit marker, when it parses and every file it lists exists;
    a trusted compaction is where its shards' rows are read from.
    """

    run_id: str
    generation: int
    shards: dict[int, dict]  # shard -> a copy of the commit marker it replaced
    files: dict[str, list[str]]
    rows: dict[str, int]
    bytes: int
    compacted_at: str
    token: str = ""

    def to_json(self) -> bytes:
        """The marker's bytes, as :func:`parse_compaction` reads them back."""
        body = {
            "run_id": self.run_id,
            "generation": self.generation,
            "token": self.token,
            "shards": {str(s): held for s, held in self.shards.items()},
            "files": self.files,
            "rows": self.rows,
            "bytes": self.bytes,
            "compacted_at": self.compacted_at,
        }
        return json.dumps(body, sort_keys=True).encode()

    def commit_of(self, shard: int) -> Commit:
        """The commit marker of ``shard`` as this compaction copied it."""
        held = self.shards[shard]
        return Commit(
            run_id=self.run_id,
            shard=shard,
            files=dict(held.get("files", {})),
            rows=dict(held.get("rows", {})),
            bytes=int(held.get("bytes", 0)),
            seconds=float(held.get("seconds", 0.0)),
            committed_at=str(held.get("committed_at", "")),
            stats=dict(held.get("stats", {})),
            attempt=str(held.get("attempt", "")),
            compaction=self.generation,
        )


class CorruptCommitWarning(UserWarning):
    """A commit marker that does not parse or lists a missing file: its shard is skipped."""


class CorruptCompactionWarning(CorruptCommitWarning):
    """A compaction marker that does not parse or lists a missing file: it is ignored."""


def _missing_file(fs: pafs.FileSystem, root: str, files: dict[str, list[str]]) -> str | None:
    """The first listed file that does not exist, if any."""
    for rel in (f for names in files.values() for f in names):
        info = with_retries(lambda r=rel: fs.get_file_info(f"{root}/{r}"), f"checking {rel}")
        if info.type != pafs.FileType.File:
            return rel
    return None


def load_commit(fs: pafs.FileSystem, path: str) -> Commit | None:
    """The commit marker at ``path``, or None (with a warning) if it cannot be trusted.

    A marker is trusted when it parses, names its run and shard, and every data
    file it lists exists. Anything else (a truncated write, a file deleted by
    hand) makes the shard uncommitted: readers skip it, writers redo it. (A shard a
    trusted compaction holds is read from the compaction's copy of its marker.)
    """
    commit = _read_marker(
        fs,
        path,
        lambda data: Commit(
            run_id=data["run_id"],
            shard=int(data["shard"]),
            files=data.get("files", {}),
            rows=data.get("rows", {}),
            bytes=int(data.get("bytes", 0)),
            seconds=float(data.get("seconds", 0.0)),
            committed_at=data.get("committed_at", ""),
            stats=data.get("stats", {}),
            attempt=str(data.get("attempt", "")),
        ),
        "commit marker",
        "its shard counts as not committed",
        CorruptCommitWarning,
    )
    if commit is None:
        return None
    root = path.rsplit(f"/{schema.COMMITS_DIR}/", 1)[0]
    missing = _missing_file(fs, root, commit.files)
    if missing is not None:
        warnings.warn(
            f"commit marker {path} lists {missing}, which is missing; "
            "its shard counts as not committed",
            CorruptCommitWarning,
            stacklevel=2,
        )
        return None
    return commit


def parse_compaction(fs: pafs.FileSystem, path: str) -> Compaction | None:
    """The compaction marker at ``path`` as written, or None (with a warning) if it does
    not parse (a torn write). Whether its files all exist is not checked here."""
    return _read_marker(
        fs,
        path,
        lambda data: Compaction(
            run_id=data["run_id"],
            generation=int(data["generation"]),
            shards={int(k): dict(v) for k, v in data["shards"].items()},
            files={str(t): [str(f) for f in fs_] for t, fs_ in data["files"].items()},
            rows={str(t): int(n) for t, n in data.get("rows", {}).items()},
            bytes=int(data.get("bytes", 0)),
            compacted_at=str(data.get("compacted_at", "")),
            token=str(data.get("token", "")),
        ),
        "compaction marker",
        "its shards are read from their own files",
        CorruptCompactionWarning,
    )


def _read_marker(fs, path: str, build, kind: str, consequence: str, category):
    """``build(json)`` of the marker at ``path``; None if it is gone (removed since it was
    listed) or, with a warning saying ``consequence``, if it does not parse."""
    try:
        text = with_retries(lambda: read_text(fs, path), f"reading {path}")
    except FileNotFoundError:
        return None
    try:
        return build(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(
            f"{kind} {path} is unreadable ({type(exc).__name__}: {exc}); {consequence}",
            category,
            stacklevel=3,
        )
        return None


def _markers(fs, root: str, folder: str, wanted: set[str] | None):
    """(run id, path) of every published marker under ``root/folder`` of the wanted runs
    (only those runs' folders are listed)."""
    places = [f"{root}/{folder}"]
    if wanted is not None:
        places = [f"{root}/{folder}/run_id={run_id}" for run_id in sorted(wanted)]
    for place in places:
        for info in with_retries(lambda p=place: list_files(fs, p), f"listing {place}"):
            if not info.base_name.endswith(".json") or info.base_name.startswith("."):
                continue
            run_id = info.path.rsplit("/", 2)[-2].removeprefix("run_id=")
            if wanted is None or run_id in wanted:
                yield run_id, info.path


@dataclass(frozen=True)
class Compactions:
    """A store's compaction markers that parse: the ``trusted`` ones readers read, and the
    ``untrusted`` ones readers ignore (a listed file is missing, or it repeats shards of
    an earlier trusted compaction)."""

    trusted: list[Compaction]
    untrusted: list[Compaction]


def read_compactions(
    fs: pafs.FileSystem, root: str, runs: Iterable[str] | None = None
) -> Compactions:
    """The store's compactions, by run and generation.

    Compactions of a run cover disjoint shards by construction (a compaction
    takes only shards no earlier one covers, and generations are published
    exclusively). Should two ever overlap, the earlier stands and the later is
    ignored with a warning, so no row is read twice. A compaction that lost a file
    is damaged: its shards are read from their own files where those still exist. Both
    kinds are returned as ``untrusted`` (gc keeps those that hold last copies).
    """
    wanted = set(runs) if runs is not None else None
    parsed = [
        (c, path)
        for _, path in _markers(fs, root, schema.COMPACTIONS_DIR, wanted)
        if (c := parse_compaction(fs, path)) is not None
    ]
    trusted: list[Compaction] = []
    untrusted: list[Compaction] = []
    covered: set[tuple[str, int]] = set()
    for c, path in sorted(parsed, key=lambda item: (item[0].run_id, item[0].generation)):
        missing = _missing_file(fs, path.rsplit(f"/{schema.COMPACTIONS_DIR}/", 1)[0], c.files)
        if missing is not None:
            warnings.warn(
                f"compaction marker {path} lists {missing}, which is missing; its shards "
                f"{sorted(c.shards)} are read from their own files, and a shard whose own "
                f"files are gone too counts as not committed (restore {missing}, or re-run "
                "the run to redo those shards)",
                CorruptCompactionWarning,
                stacklevel=2,
            )
            untrusted.append(c)
            continue
        overlap = {(c.run_id, s) for s in c.shards} & covered
        if overlap:
            warnings.warn(
                f"compaction {c.generation} of {c.run_id} repeats shards "
                f"{sorted(s for _, s in overlap)} of an earlier one: it is ignored",
                CorruptCompactionWarning,
                stacklevel=2,
            )
            untrusted.append(c)
            continue
        covered |= {(c.run_id, s) for s in c.shards}
        trusted.append(c)
    return Compactions(trusted, untrusted)


@dataclass(frozen=True)
class StoreIndex:
    """What readers may read: trusted commits, and the trusted compactions over them."""

    commits: list[Commit]
    compactions: list[Compaction]
    untrusted: list[Compaction] = ()  # compactions readers ignore (a lost file, an overlap)

    @property
    def committed(self) -> set[tuple[str, int]]:
        """(run, shard) of every committed shard (a compacted shard stays committed even
        if its own marker is gone)."""
        shards = {(c.run_id, c.shard) for c in self.commits}
        return shards | {(c.run_id, s) for c in self.compactions for s in c.shards}

    @property
    def untrusted_but_needed(self) -> list[Compaction]:
        """Untrusted compactions whose files hold the only copy of a shard's rows (the
        shard's own files are gone and nothing else commits it): gc keeps them, so a
        restored file makes them whole again."""
        committed = self.committed
        return [c for c in self.untrusted if any((c.run_id, s) not in committed for s in c.shards)]

    def held_by_untrusted(self, run_id: str) -> set[int]:
        """Shards of ``run_id`` that an untrusted compaction names: a compaction may not
        take them, or a restored file would make two compactions hold one shard."""
        return {s for c in self.untrusted if c.run_id == run_id for s in c.shards}

    def data_files(self, table: str) -> list[str]:
        """The files holding ``table``'s committed rows, each row in exactly one file."""
        files = [f for c in self.compactions for f in c.files.get(table, [])]
        return files + [
            f for c in self.commits if c.compaction is None for f in c.files.get(table, [])
        ]


def read_index(fs: pafs.FileSystem, root: str, runs: Iterable[str] | None = None) -> StoreIndex:
    """Trusted compactions first, then every commit marker read in their light."""
    wanted = set(runs) if runs is not None else None
    found = read_compactions(fs, root, wanted)
    compactions = found.trusted
    # A compacted shard's marker is not read: the compaction carries a copy of it, so a
    # compacted run opens with one small read instead of one per shard.
    commits = [c.commit_of(s) for c in compactions for s in c.shards]
    covered = {(c.run_id, c.shard) for c in commits}
    commits += [
        commit
        for run_id, path in _markers(fs, root, schema.COMMITS_DIR, wanted)
        if (run_id, _shard_of_marker(path)) not in covered
        if (commit := load_commit(fs, path)) is not None
    ]
    commits.sort(key=lambda c: (c.run_id, c.shard))
    return StoreIndex(commits, compactions, found.untrusted)


def _shard_of_marker(path: str) -> int | None:
    name = path.rsplit("/", 1)[-1]
    digits = name.removeprefix("shard-").removesuffix(".json")
    return int(digits) if digits.isdigit() else None


def read_commits(fs: pafs.FileSystem, root: str, runs: Iterable[str] | None = None) -> list[Commit]:
    """Every trusted commit marker of the store (optionally of some runs only)."""
    return read_index(fs, root, runs).commits


def read_shard_failures(
    fs: pafs.FileSystem,
    root: str,
    committed: set[tuple[str, int]],
    runs: Iterable[str] | None = None,
) -> pa.Table:
    """``failures`` rows of shards that did not commit: one per utterance of the shard.

    A record left for a shard that has since committed (one of the ``committed``
    (run, shard) pairs) is ignored: its utterances are in ``utterances`` or in
    the shard's own ``failures``.
    """
    wanted = set(runs) if runs is not None else None
    folder = f"{root}/{schema.FAILED_DIR}"
    rows = []
    for info in with_retries(lambda: list_files(fs, folder), f"listing {folder}"):
        run_id = info.path.rsplit("/", 2)[-2].removeprefix("run_id=")
        if not info.base_name.endswith(".json") or info.base_name.startswith("."):
            continue
        if wanted is not None and run_id not in wanted:
            continue
        try:
            record = json.loads(with_retries(lambda p=info.path: read_text(fs, p), info.path))
            shard = int(record["shard"])
            ids = [str(u) for u in record.get("utterance_ids", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"shard failure record {info.path} is unreadable: {exc}", stacklevel=2)
            continue
        if (run_id, shard) in committed:
            continue
        for utterance_id in ids or [None]:
            rows.append(
                {
                    "shard": shard,
                    "utterance_id": utterance_id,
                    "stage": schema.SHARD_FAILURE_STAGE,
                    "error": str(record.get("error", "")),
                    "message": str(record.get("message", "")),
                    "run_id": run_id,
                }
            )
    return pa.Table.from_pylist(rows, schema=with_run_id("failures"))


def check_store(fs: pafs.FileSystem, root: str, uri: str) -> None:
    marker = f"{root}/{schema.STORE_MARKER}"
    info = with_retries(lambda: fs.get_file_info(marker), f"opening store {uri}")
    if info.type != pafs.FileType.File:
        raise StoreNotFoundError(f"no slm-lens store at {uri} (missing {schema.STORE_MARKER})")
    text = with_retries(lambda: read_text(fs, marker), f"reading {uri}'s store marker")
    version = json.loads(text).get("schema_version")
    if not isinstance(version, int) or version > schema.SCHEMA_VERSION:
        raise StoreVersionError(
            f"{uri} was written with store schema version {version}; this slm-lens reads up to "
            f"version {schema.SCHEMA_VERSION}: upgrade slm-lens to read it"
        )


def with_run_id(table: str) -> pa.Schema:
    """``table``'s schema with the hive partition column readers add."""
    return schema.TABLES[table].append(pa.field("run_id", pa.string()))
