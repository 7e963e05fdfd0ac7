"""Recall-by-layer over a large store: DuckDB (the analysis layer) vs pandas.

    python bench/analysis.py                  # 50M lens rows (~2 GB store in /tmp)
    python bench/analysis.py --rows 5000000   # quicker

Generates a store of ``--rows`` lens rows through the real store writer (the
list columns left null: this measures the rank aggregation), then computes
current-word recall@10 (any position, text rank) with its chance control per
run and layer twice: with ``analysis.metrics.recall_by_layer`` (DuckDB over the
Arrow datasets) and with pandas over the same Parquet files (read + groupby).
Prints both times, their ratio, and checks the answers are equal.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import metrics, schema
from analysis.index import read_commits
from analysis.storage import resolve
from analysis.store import open_store
from extractor.store import StoreWriter

N_LAYERS = 24
K = 10


def generate(
    uri: str, rows: int, runs: int = 2, shard_rows: int = 2_000_000, seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    writer = StoreWriter(uri, target_file_bytes=256 << 20)
    per_run = rows // runs
    positions_per_shard = shard_rows // (N_LAYERS + 1)
    for r in range(runs):
        run_id = f"bench-{r}"
        writer.write_run(
            run_id, model="bench", revision=f"r{r}", n_layers=N_LAYERS, k=K, status="finished"
        )
        done, shard = 0, 0
        while done < per_run:
            n_pos = min(positions_per_shard, (per_run - done) // (N_LAYERS + 1) or 1)
            # ~8 positions per word, 20 words per utterance.
            pos = np.arange(n_pos)
            utt = (shard * positions_per_shard + pos) // 160
            word = (pos % 160) // 8
            layer = np.tile(np.arange(N_LAYERS + 1, dtype=np.int16), n_pos)
            rep = lambda a: np.repeat(a, N_LAYERS + 1)  # noqa: E731
            n = n_pos * (N_LAYERS + 1)
            depth_boost = np.abs(layer - N_LAYERS // 2)  # best near the middle
            table = pa.table(
                {
                    "utterance_id": pa.array(rep(utt).astype(str)),
                    "position": rep(pos % 160).astype(np.int32),
                    "layer": layer,
                    "word_index": rep(word).astype(np.int32),
                    "modality": pa.array(np.full(n, "speech")),
                    "cur_word_text_rank": (rng.geometric(0.02, n) * (1 + depth_boost)).astype(
                        np.int32
                    ),
                    "cur_word_rank": rng.integers(0, 50_000, n, dtype=np.int32),
                    "ctrl_word_text_rank": rng.geometric(0.005, n).astype(np.int32),
                    "ctrl_word_rank": rng.integers(0, 50_000, n, dtype=np.int32),
                }
            )
            full = pa.table(
                {
                    name: table[name]
                    if name in table.column_names
                    else pa.nulls(n, type=schema.TABLES["lens"].field(name).type)
                    for name in schema.TABLES["lens"].names
                }
            )
            with writer.shard(run_id, shard) as sw:
                sw.write("lens", full)
                sw.commit()
            done += n
            shard += 1


def pandas_recall(uri: str):
    import pyarrow.dataset as pads

    fs, root = resolve(uri)
    frames = []
    for commit in read_commits(fs, root):
        files = [f"{root}/{f}" for f in commit.files.get("lens", [])]
        t = pads.dataset(files, filesystem=fs, format="parquet").to_table(
            columns=[
                "utterance_id",
                "word_index",
                "layer",
                "modality",
                "cur_word_text_rank",
                "ctrl_word_text_rank",
            ]
        )
        frames.append(t.to_pandas().assign(run_id=commit.run_id))
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    df = df[(df.modality == "speech") & df.word_index.notna()]
    per_word = df.groupby(["run_id", "utterance_id", "word_index", "layer"], observed=True).agg(
        r=("cur_word_text_rank", "min"), c=("ctrl_word_text_rank", "min")
    )
    per_word = per_word.assign(hit=per_word.r < K, ctrl=per_word.c < K)
    out = per_word.groupby(["run_id", "layer"]).agg(
        n_words=("hit", "size"), recall=("hit", "mean"), control_recall=("ctrl", "mean")
    )
    return out.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--store", help="reuse/create the store here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    args = parser.parse_args()
    uri = args.store or tempfile.mkdtemp(prefix="slm-lens-bench-")
    if not Path(uri, schema.STORE_MARKER).exists():
        start = time.perf_counter()
        generate(uri, args.rows)
        print(f"generated {args.rows:,} lens rows in {time.perf_counter() - start:.1f} s -> {uri}")
    con = open_store(uri)
    n = con.sql("SELECT count(*) FROM lens").fetchone()[0]
    size = sum(p.stat().st_size for p in Path(uri).rglob("*.parquet"))
    print(f"store: {n:,} lens rows, {size / 2**30:.2f} GiB, {size / n:.1f} bytes per row")

    start = time.perf_counter()
    duck = metrics.recall_by_layer(con, K)
    t_duck = time.perf_counter() - start
    start = time.perf_counter()
    pdf = pandas_recall(uri)
    t_pd = time.perf_counter() - start
    merged = duck.merge(pdf, on=["run_id", "layer"], suffixes=("", "_pd"))
    equal = (
        len(merged) == len(duck) == len(pdf)
        and (merged.n_words == merged.n_words_pd).all()
        and np.allclose(merged.recall, merged.recall_pd)
        and np.allclose(merged.control_recall, merged.control_recall_pd)
    )
    print(f"DuckDB recall-by-layer: {t_duck:.2f} s")
    print(f"pandas (read + groupby): {t_pd:.2f} s")
    print(f"DuckDB speed-up: {t_pd / t_duck:.1f}x   answers equal: {equal}")
    if not args.keep and not args.store:
        shutil.rmtree(uri, ignore_errors=True)
    if not equal:
        raise SystemExit("answers differ")


if __name__ == "__main__":
    main()
