"""Many small files: recall-by-layer over a store of one shard per 64 utterances vs one shard,
and the same small-file store after ``slm-lens compact``.

    python bench/small_files.py [--utterances 100000] [--shard-size 64] [--layers 12]

The same synthetic ``lens`` rows (every spoken position of every utterance at every layer,
ranks drawn at random) are committed through the real StoreWriter twice: once in shards
of ``--shard-size`` utterances (a corpus run: ~1,600 files per table at 10^5 utterances),
once as a single shard whose data files the writer rolls at its target size (64 MB). The
small-file store is measured, then compacted (64 MB files) and measured again. Each store
is opened with ``analysis.open_store`` and queried with ``metrics.recall_by_layer`` (any
aggregation, text rank, k=10). Printed: the time to open each store (markers read, views
made), the query's best-of-3 time, the compaction's time, and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import best_of


def lens_rows(first: int, last: int, layers: int, rng) -> object:
    import numpy as np
    import pyarrow as pa

    from analysis.schema import TABLES

    utts = np.arange(first, last)
    positions = 24  # spoken positions per utterance, 8 words of 3 units
    n = len(utts) * positions * (layers + 1)
    utt = np.repeat(utts, positions * (layers + 1))
    pos = np.tile(np.repeat(np.arange(positions), layers + 1), len(utts))
    layer = np.tile(np.arange(layers + 1), len(utts) * positions)
    ranks = rng.integers(0, 200, size=(6, n))
    columns = {
        "utterance_id": pa.array([f"utt-{u:07d}" for u in utt]),
        "position": pa.array(pos, pa.int32()),
        "layer": pa.array(layer, pa.int16()),
        "word_index": pa.array(pos // 3, pa.int32()),
        "modality": pa.array(["speech"] * n),
    }
    for i, name in enumerate(("cur", "next", "ctrl")):
        columns[f"{name}_word_rank"] = pa.array(ranks[2 * i], pa.int32())
        columns[f"{name}_word_text_rank"] = pa.array(ranks[2 * i + 1], pa.int32())
    schema = TABLES["lens"]
    return pa.table(
        {f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema
    )


def build(uri: str, utterances: int, shard_size: int, layers: int) -> tuple[str, float]:
    import numpy as np

    from extractor.store import StoreWriter

    rng = np.random.default_rng(0)
    writer = StoreWriter(uri)
    run_id = "scale-run"
    writer.write_run(
        run_id,
        model="synthetic",
        revision="r0",
        dataset="synthetic",
        n_layers=layers,
        vocab_size=1000,
        k=10,
        config={},
        status="finished",
    )
    start = time.perf_counter()
    chunk = 64  # utterances per write: the rows are generated in pieces either way
    for shard, first in enumerate(range(0, utterances, shard_size), start=1):
        with writer.shard(run_id, shard) as w:
            for a in range(first, min(utterances, first + shard_size), chunk):
                last = min(utterances, first + shard_size, a + chunk)
                w.write("lens", lens_rows(a, last, layers, rng))
            w.commit({})
    return run_id, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    from analysis import metrics
    from analysis.store import open_store
    from extractor.store.compact import compact_store
    from extractor.store.gc import collect_garbage

    root = Path(tempfile.mkdtemp(prefix="slm-lens-bench-small-files-"))
    results = {}

    def measure(name: str, uri: str, note: str) -> None:
        files = len(list(Path(uri, "lens").rglob("*.parquet")))
        mb = sum(p.stat().st_size for p in Path(uri, "lens").rglob("*.parquet")) / 2**20
        start = time.perf_counter()
        con = open_store(uri)
        open_s = time.perf_counter() - start
        rows = con.sql("SELECT count(*) FROM lens").fetchone()[0]
        query_s = best_of(lambda con=con: metrics.recall_by_layer(con, 10), repeats=3)
        results[name] = (open_s, query_s)
        print(
            f"{name:>10}: {files:,} lens files, {mb:.0f} MB, {rows:,} rows; {note}; "
            f"open_store {open_s:.2f} s; recall_by_layer {query_s:.2f} s",
            flush=True,
        )

    small = str(root / "many-small")
    _, write_s = build(small, args.utterances, args.shard_size, args.layers)
    measure("many small", small, f"written in {write_s:.0f} s")
    start = time.perf_counter()
    compact_store(small)
    compact_s = time.perf_counter() - start
    collect_garbage(small, delete=True, min_age_s=0)  # the replaced files, for the file count
    measure("compacted", small, f"compacted in {compact_s:.0f} s")
    one = str(root / "one-shard")
    _, write_s = build(one, args.utterances, args.utterances, args.layers)
    measure("one shard", one, f"written in {write_s:.0f} s")
    (o2, q2) = results["one shard"]
    for name in ("many small", "compacted"):
        o1, q1 = results[name]
        print(
            f"{name} / one shard: open {o1 / o2:.2f}x, query {q1 / q2:.2f}x, "
            f"open + query {(o1 + q1) / (o2 + q2):.2f}x"
        )


if __name__ == "__main__":
    main()
