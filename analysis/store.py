"""Open a store as a read-only DuckDB connection with the contract's views.

Files are found through commit markers (never by globbing), so readers see
only complete shards. Local stores are scanned by DuckDB's own Parquet reader
over exactly those files (about twice as fast as going through Arrow); object
stores as Arrow datasets over ``pyarrow.fs`` (no DuckDB extension needed), with
projection and filter pushdown. Either way DuckDB is then denied all file
access except reading the committed files, so no SQL sent through the
connection can write anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from . import schema
from .index import (
    CorruptCommitWarning,
    CorruptCompactionWarning,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownRunError,
    check_store,
    read_index,
    read_shard_failures,
    with_run_id,
)
from .storage import list_files, resolve, with_retries

#: The errors and warnings a reader of :func:`open_store` may meet, defined with the index.
__all__ = [
    "CorruptCommitWarning",
    "CorruptCompactionWarning",
    "ReadOnlyQueryError",
    "StoreError",
    "StoreNotFoundError",
    "StoreVersionError",
    "UnknownRunError",
    "check_read_only",
    "open_store",
    "query",
]


def _dataset(fs, root: str, table: str, files: list[str]) -> pads.Dataset | pa.Table:
    full = with_run_id(table)
    if not files:
        return full.empty_table()
    return pads.dataset(
        [f"{root}/{f}" for f in files],
        schema=full,
        filesystem=fs,
        format="parquet",
        partitioning=pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive"),
        partition_base_dir=root,
    )


def open_store(uri: str, runs: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection over the store at ``uri`` with the contract's views.

    ``runs`` restricts every view to those run ids (the other runs' files are
    never opened); an id not in the store raises :class:`UnknownRunError`.
    Views: runs, vocab, utterances, words, tokens, lens, word_lens, failures,
    plus ``shards`` (one row per committed shard, with its telemetry).
    """
    fs, root = resolve(uri)
    check_store(fs, root, uri)
    run_filter = list(runs) if runs is not None else None
    index = read_index(fs, root, run_filter)
    run_files = _run_files(fs, root, uri, run_filter, index.committed)

    con = duckdb.connect(":memory:")
    local = isinstance(fs, pafs.LocalFileSystem)
    sources: dict[str, object] = {}
    readable: list[str] = []
    table_files = {t: index.data_files(t) for t in schema.SHARD_TABLES}
    # Committed failure rows, plus one per utterance of every shard that did not commit.
    table_files["_committed_failures"] = table_files.pop("failures")
    table_files["runs_history"] = run_files
    sources["_shard_failures"] = read_shard_failures(fs, root, index.committed, run_filter)
    for table, files in table_files.items():
        if local and files:
            paths = [f"{root}/{f}" for f in files]
            readable += paths
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_sql_list(paths)}, "
                "hive_partitioning = true, hive_types = {'run_id': 'VARCHAR'})"
            )
        else:
            contract = {"runs_history": "runs", "_committed_failures": "failures"}.get(table, table)
            sources[table] = _dataset(fs, root, contract, files)
    sources["shards"] = _shards_table(index.commits)
    for name, source in sources.items():
        con.register(f"_src_{name}", source)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _src_{name}")
    _create_derived_views(con)
    # From here on the connection can read the committed files and nothing else, and
    # write nowhere (DuckDB refuses even an overwrite of an allowed file).
    if readable:
        con.execute(f"SET allowed_paths = {_sql_list(readable)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _run_files(
    fs, root: str, uri: str, run_filter: list[str] | None, committed: set[tuple[str, int]]
) -> list[str]:
    """The ``runs`` records' files (relative to the root), of the asked runs only."""
    run_files = [
        i.path.removeprefix(root + "/")
        for i in with_retries(lambda: list_files(fs, f"{root}/{schema.RUNS_TABLE}"), "listing runs")
        if i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
    ]
    if run_filter is None:
        return run_files
    known = {f.split("/")[1].removeprefix("run_id=") for f in run_files}
    known |= {run_id for run_id, _ in committed}
    missing = [r for r in run_filter if r not in known]
    if missing:
        raise UnknownRunError(f"run(s) {missing} not in store {uri}")
    return [f for f in run_files if f.split("/")[1].removeprefix("run_id=") in run_filter]


def _shards_table(commits) -> pa.Table:
    """One row per committed shard: its marker's counts and telemetry."""
    return pa.Table.from_pylist(
        [
            {
                "run_id": c.run_id,
                "shard": c.shard,
                "rows": json.dumps(c.rows),
                "lens_rows": c.rows.get("lens", 0),
                "bytes": c.bytes,
                "seconds": c.seconds,
                "committed_at": c.committed_at,
                "stats": json.dumps(c.stats),
                "engine": c.stats.get("engine"),
                "self_check": c.stats.get("self_check"),
                "compaction": c.compaction,
            }
            for c in commits
        ],
        schema=pa.schema(
            [
                ("run_id", pa.string()),
                ("shard", pa.int32()),
                ("rows", pa.string()),
                ("lens_rows", pa.int64()),
                ("bytes", pa.int64()),
                ("seconds", pa.float64()),
                ("committed_at", pa.string()),
                ("stats", pa.string()),
                ("engine", pa.string()),
                ("self_check", pa.string()),
                ("compaction", pa.int32()),
            ]
        ),
    )


def _create_derived_views(con: duckdb.DuckDBPyConnection) -> None:
    """``failures`` (committed rows and uncommitted shards' records) and ``runs`` (each
    run's latest record)."""
    con.execute(
        "CREATE VIEW failures AS SELECT * FROM _committed_failures "
        "UNION ALL BY NAME SELECT * FROM _shard_failures"
    )
    con.execute(
        """
        CREATE VIEW runs AS
        SELECT run_id, model, revision, dataset, n_layers, vocab_size, k, config, status,
               started_at, finished_at, updated_at, message
        FROM (
            SELECT *,
                   row_number() OVER (PARTITION BY run_id ORDER BY updated_at DESC) AS _latest
            FROM runs_history
        ) WHERE _latest = 1
        """
    )


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


class ReadOnlyQueryError(StoreError):
    """A statement that would write, attach or change settings."""


#: ``EXPLAIN [ANALYZE] [(options)]`` before the statement it explains.
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)


def check_read_only(sql: str) -> None:
    """Refuse anything but queries, before it reaches DuckDB.

    ``EXPLAIN`` is allowed only of a read: ``EXPLAIN ANALYZE`` *runs* its statement,
    so ``EXPLAIN ANALYZE DROP VIEW lens`` would change the connection.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"cannot parse SQL: {exc}") from exc
    if not statements:
        raise StoreError("no SQL statement given")
    for st in statements:
        kind = st.type.name if hasattr(st.type, "name") else str(st.type)
        if kind not in READ_ONLY_STATEMENTS:
            raise ReadOnlyQueryError(
                f"the store is read-only: {kind} statements are not allowed "
                f"(only SELECT/WITH/EXPLAIN queries)"
            )
        if kind == "EXPLAIN":
            inner = _EXPLAIN_PREFIX.sub("", st.query, count=1)
            if inner.strip() == st.query.strip():
                raise ReadOnlyQueryError(f"cannot tell what this EXPLAIN explains: {st.query!r}")
            check_read_only(inner)


def query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Run a read-only query (refusing writes with :class:`ReadOnlyQueryError`)."""
    check_read_only(sql)
    return con.sql(sql)
