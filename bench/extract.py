"""Extraction throughput: the Ray service against an in-process loop over the same data.

    python bench/extract.py [--sentences 36] [--model demo|tiny] [--data demo|librivox]

Three runs of the same ShardProcessor (in process one shard at a time, in process with
two shards in flight so one's front end overlaps the other's model stage, and on Ray
with two in flight) over the demo dataset (espeak-ng sentences plus
the LibriVox utterances) with the SIMS-layout SmolLM2-135M demo model in bf16, every
layer lensed at every word position, into three fresh local stores. Prints tokens/s of
each (whole run, model loading included; and summed over shards, from the commit
markers' telemetry), the model stage's busy fraction (forward + lens over the span from
the first front end to the last commit), the CPU time per lens row of row building and
Parquet writing, the ratios, the lens floor (the bare bf16 GEMM of the same lens rows
against the full vocabulary, timed here), and store bytes per (position, layer) row.

``--data librivox``: only the LibriVox read-speech utterances, each ``--repeat`` times
under its own id, without word timings, so every utterance is aligned by pocketsphinx in
the front end (a front end that costs as much as the model stage), in shards of 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.store import open_store
from extractor.config import parse_config
from extractor.demo import SENTENCES, demo_config
from extractor.service.driver import run_extraction

EXTRA = [
    "the quick brown fox jumps over the lazy dog",
    "my sister lives in a house by the sea",
    "he reads a book every night before bed",
    "the children played in the park all day",
    "rain fell softly on the quiet town",
    "a bird sang from the top of the tall tree",
]


def gemm_floor_seconds(rows: int, d: int, vocab: int, repeats: int = 3) -> float:
    import torch

    h = torch.randn(min(rows, 2048), d).bfloat16()
    w = torch.randn(vocab, d).bfloat16()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = 0
        while done < rows:
            for c in range(0, vocab, 8192):
                h @ w[c : c + 8192].T
            done += len(h)
        best = min(best, time.perf_counter() - start)
    return best * rows / (done or 1)


def librivox_manifest(folder: Path, repeat: int) -> Path:
    """The demo's LibriVox utterances (no word timings), each ``repeat`` times."""
    import json

    from extractor.demo import build_demo_dataset

    demo = build_demo_dataset(folder / "demo", sentences=SENTENCES[:1], librivox=True)
    rows = [json.loads(line) for line in demo.read_text().splitlines()]
    spoken = [r for r in rows if "words" not in r]
    if not spoken:
        raise SystemExit("no LibriVox utterances on this machine (pocketsphinx test data)")
    out = folder / "librivox.jsonl"
    out.write_text(
        "".join(
            json.dumps({**r, "id": f"{r['id']}-r{i}"}) + "\n" for i in range(repeat) for r in spoken
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=60)
    parser.add_argument("--model", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--data", choices=("demo", "librivox"), default="demo")
    parser.add_argument("--repeat", type=int, default=4, help="--data librivox: copies of each")
    args = parser.parse_args()
    pool = SENTENCES + EXTRA
    sentences = [pool[i % len(pool)] for i in range(args.sentences)]
    root = Path(tempfile.mkdtemp(prefix="slm-lens-bench-extract-"))
    results = {}
    modes = {"sequential": (True, 1), "in-process": (True, 2), "ray": (False, 2)}
    for mode, (in_process, depth) in modes.items():
        raw = demo_config(
            str(root / f"store-{mode}"),
            root / "data",
            tiny=args.model == "tiny",
            sentences=sentences,
        )
        raw["lens"]["positions"] = "spoken_words"
        raw["shard_size"] = 8
        if args.data == "librivox":
            manifest = librivox_manifest(root / "librivox", args.repeat)
            raw["dataset"] = {"manifest": str(manifest), "name": "librivox"}
            raw["shard_size"] = 2
        # One actor owning both cores, as the in-process loop does (Ray pins an actor's
        # BLAS threads to its CPU share).
        raw["workers"] = {"count": 1, "gpus": 0, "cpus": 2, "in_flight_per_worker": depth}
        cfg = parse_config(raw)
        start = time.perf_counter()
        summary = run_extraction(cfg, in_process=in_process, progress=False)
        wall = time.perf_counter() - start
        con = open_store(cfg.store, runs=[summary.run_id])
        shard_s, tokens = con.sql(
            "SELECT sum(seconds), sum(json_extract(stats, '$.tokens')::BIGINT) FROM shards "
            "WHERE shard > 0"
        ).fetchone()
        rows = con.sql("SELECT count(*) FROM lens").fetchone()[0]
        model_s, span, rows_s, write_s, front_s = con.sql(
            "SELECT sum((stats->>'forward_seconds')::DOUBLE + (stats->>'lens_seconds')::DOUBLE), "
            "max((stats->>'model_finished_at')::DOUBLE) - "
            "min((stats->>'frontend_started_at')::DOUBLE), "
            "sum((stats->>'rows_seconds')::DOUBLE), sum((stats->>'write_seconds')::DOUBLE), "
            "sum((stats->>'frontend_seconds')::DOUBLE) FROM shards WHERE shard > 0"
        ).fetchone()
        size = sum(p.stat().st_size for p in Path(cfg.store, "lens").rglob("*.parquet"))
        results[mode] = dict(wall=wall, tokens=tokens, shard_s=shard_s, rows=rows, bytes=size)
        print(
            f"{mode:>10} ({depth} in flight): {tokens} tokens, {rows:,} lens rows; whole run "
            f"{wall:.1f} s ({tokens / wall:.1f} tokens/s); in shards {shard_s:.1f} s "
            f"({tokens / shard_s:.1f} tokens/s)\n"
            f"{'':>12}model stage busy {model_s / span:.0%} of the shards' span "
            f"(forward + lens {model_s:.1f} s of {span:.1f} s; front end {front_s:.1f} s); "
            f"row building {rows_s / rows * 1e6:.2f} us and Parquet writing "
            f"{write_s / rows * 1e6:.2f} us per lens row",
            flush=True,
        )
    a, b, seq = results["in-process"], results["ray"], results["sequential"]
    print(
        f"Ray / in-process throughput: whole run {a['wall'] / b['wall']:.2f}x, "
        f"in shards {a['shard_s'] / b['shard_s']:.2f}x; "
        f"pipelined / sequential (in process, whole run): {seq['wall'] / a['wall']:.2f}x"
    )
    import json

    model_cfg = json.loads((Path(raw["model"]["path"]) / "config.json").read_text())
    floor = gemm_floor_seconds(b["rows"], model_cfg["hidden_size"], model_cfg["vocab_size"])
    print(
        f"lens floor (bare bf16 GEMM of {b['rows']:,} rows x {model_cfg['vocab_size']:,}): "
        f"{floor:.2f} s = {b['tokens'] / floor:.1f} tokens/s; the service reaches "
        f"{floor / b['shard_s']:.0%} of it in shards"
    )
    print(
        f"store: {b['bytes'] / b['rows']:.1f} bytes per (position, layer) lens row "
        f"(k=10 ids + log-probs, whole vocabulary and text segment, ranks, masses)"
    )


if __name__ == "__main__":
    main()
