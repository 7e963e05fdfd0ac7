"""Helpers for the extraction-service tests: small demo runs and store snapshots."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.store import open_store

SENTENCES = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "a small dog ran home",
    "we drank tea by the river",
    "the sun rises in the east",
]

KEYS = {
    "utterances": ["utterance_id"],
    "words": ["utterance_id", "word_index"],
    "tokens": ["utterance_id", "position"],
    "lens": ["utterance_id", "position", "layer"],
    "word_lens": ["utterance_id", "word_index", "layer"],
    "failures": ["utterance_id", "stage"],
    "vocab": ["token_id"],
}


def small_config(store: str, data_dir: Path, **overrides) -> dict:
    """A fast run: tiny random LM in SIMS layout over espeak sentences, fp32 for stable ranks."""
    from extractor.demo import demo_config

    raw = demo_config(store, data_dir, tiny=True, librivox=False, sentences=SENTENCES)
    raw["model"]["dtype"] = "float32"
    raw["shard_size"] = 1
    raw["lens"]["positions"] = "all"
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return raw


def _hashable(value):
    if isinstance(value, list | np.ndarray):
        return tuple(_hashable(v) for v in value)
    return value


def snapshot(uri: str, run_id: str) -> dict[str, pd.DataFrame]:
    """Every shard table of a run, sorted by its key, list cells as tuples."""
    con = open_store(uri, runs=[run_id])
    out = {}
    for table, keys in KEYS.items():
        df = con.sql(f"SELECT * EXCLUDE (run_id) FROM {table}").df()
        for col in df.columns:
            if df[col].dtype == object:
                df[col] = df[col].map(_hashable)
        out[table] = df.sort_values(keys).reset_index(drop=True)
    return out


def _is_float_lists(column: pd.Series) -> bool:
    first = next((v for v in column if isinstance(v, tuple) and v), None)
    return first is not None and isinstance(first[0], float | np.floating)


def assert_same_store(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    """Equal row for row: keys, ids and ranks exactly; floats to 1e-4 (thread counts
    differ between a Ray actor and this process, and so does GEMM summation order)."""
    for table in KEYS:
        left, right = a[table], b[table]
        assert len(left) == len(right), (table, len(left), len(right))
        for col in left.columns:
            if left[col].dtype.kind == "f":
                np.testing.assert_allclose(
                    left[col], right[col], rtol=1e-4, atol=1e-4, err_msg=f"{table}.{col}"
                )
            elif left[col].dtype == object and _is_float_lists(left[col]):
                np.testing.assert_allclose(
                    np.array(left[col].tolist(), dtype=float),
                    np.array(right[col].tolist(), dtype=float),
                    rtol=1e-4,
                    atol=1e-4,
                    err_msg=f"{table}.{col}",
                )
            else:
                assert left[col].tolist() == right[col].tolist(), f"{table}.{col} differs"


class FlakyProxy:
    """A TCP proxy on loopback that can drop everything for a while: an unreachable store."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self.up.is_set() and (data := src.recv(65536)):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def outage(self) -> None:
        """Refuse new connections and cut the open ones."""
        self.up.clear()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns.clear()

    def restore(self) -> None:
        self.up.set()


def assert_files_equal_views(store: Path) -> None:
    """A plain hive-partitioned glob of each table's files gives exactly the views' rows."""
    import duckdb

    from analysis import schema

    con = open_store(str(store))
    for table in schema.SHARD_TABLES:
        folder = store / table
        if not folder.exists():
            assert con.sql(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
            continue
        raw = duckdb.sql(
            f"SELECT * FROM read_parquet('{folder}/*/*.parquet', hive_partitioning = true)"
        ).to_arrow_table()
        view = con.sql(f"SELECT * FROM {table}").to_arrow_table()
        assert raw.num_rows == view.num_rows, (table, raw.num_rows, view.num_rows)
        both = duckdb.connect()
        both.register("raw", raw)
        both.register("view", view)
        for a, b in (("raw", "view"), ("view", "raw")):
            extra = both.sql(
                f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})"
            ).fetchone()[0]
            assert extra == 0, f"{table}: {extra} rows in {a} but not in {b}"
