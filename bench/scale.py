"""Corpus scale: planning time and memory of the driver and of one actor, 10^4 vs 10^5 utterances.

    python bench/scale.py [--sizes 10000 100000] [--parts 16]

A synthetic corpus of utterances with precomputed units (5 to 12 words, two units per
word), written as ``--parts`` Parquet parts per size, is planned and then one shard of
it is processed by a ShardProcessor around the tiny demo model (2-layer random Llama in
SIMS layout, bf16, CPU). Each measurement runs in a fresh interpreter (bench.harness),
as the growth of its resident set over what it held after its imports:

* **plan**: ``make_plan`` (ids only, fingerprint from footers, control-pool sample);
* **whole manifest**: the old way, every row parsed into the driver (``read_manifest``),
  as the baseline of the same run;
* **actor**: ``ShardProcessor`` built and one shard (64 utterances) processed.

Printed: seconds and MB of each at each size, bytes per utterance of the driver's plan
(from the growth between the two sizes), and the actor's 10^5 / 10^4 memory ratio.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import PeakRss, run_worker, table

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "he",
    "she",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "his",
    "her",
    "they",
    "at",
    "by",
    "this",
    "had",
    "from",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "two",
    "like",
    "time",
]


def write_corpus(folder: Path, n: int, parts: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    data = folder / "data"
    data.mkdir(parents=True)
    per = -(-n // parts)
    for k in range(parts):
        rows = []
        for i in range(k * per, min(n, (k + 1) * per)):
            words = [WORDS[j] for j in rng.integers(len(WORDS), size=int(rng.integers(5, 13)))]
            units = rng.integers(500, size=2 * len(words)).tolist()
            rows.append(
                {
                    "id": f"utt-{i:07d}",
                    "text": " ".join(words),
                    "words": [
                        {"word": w, "start": 0.32 * j, "end": 0.32 * (j + 1)}
                        for j, w in enumerate(words)
                    ],
                    "units": units,
                    "durations": [4] * len(units),
                    "duration_s": 0.32 * len(words),
                }
            )
        name = f"test-{k:05d}-of-{parts:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data / name, row_group_size=1024)
    return folder


def config(store: str, manifest: str) -> dict:
    from extractor.demo import build_demo_model, build_demo_speech_tokenizer

    hubert, centroids = build_demo_speech_tokenizer()
    return {
        "model": {"path": str(build_demo_model(tiny=True)), "dtype": "bfloat16", "layout": "sims"},
        "speech": {
            "kind": "hubert-kmeans",
            "model": str(hubert),
            "centroids": str(centroids),
            "layer": 2,
        },
        "dataset": {"manifest": manifest, "name": "scale"},
        "prompt": {"mode": "speech"},
        "lens": {"positions": "spoken_words", "k": 10},
        "store": store,
        "shard_size": 64,
        "workers": {"count": 1, "gpus": 0, "cpus": 2},
    }


def worker(kind: str, manifest: str, store: str, scratch: str) -> dict:
    from extractor.config import parse_config
    from extractor.service.plan import make_plan
    from extractor.service.worker import ShardProcessor
    from extractor.speech.dataset import read_manifest

    cfg = parse_config(config(store, manifest))
    if kind == "actor":
        with open(scratch, "rb") as f:
            run_id, source, rows = pickle.load(f)
        start = time.perf_counter()
        with PeakRss() as peak:
            stats = ShardProcessor(cfg, run_id, source).process(1, rows)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "mb": peak.growth_mb, "utterances": stats.utterances}
    start = time.perf_counter()
    with PeakRss() as peak:
        if kind == "plan":
            plan = make_plan(cfg)
            n = sum(len(r) for r in plan.shards.values())
        else:
            n = len(read_manifest(manifest).utterances)
    seconds = time.perf_counter() - start
    if kind == "plan":
        with open(scratch, "wb") as f:
            pickle.dump((plan.run_id, plan.source, plan.shards[1]), f)
    return {"seconds": seconds, "mb": peak.growth_mb, "utterances": n}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(10_000, 100_000))
    parser.add_argument("--parts", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slm-lens-bench-scale-"))
    rows, got = [], {}
    for n in args.sizes:
        corpus = write_corpus(root / f"corpus-{n}", n, args.parts)
        size = sum(p.stat().st_size for p in corpus.rglob("*.parquet"))
        scratch = str(root / f"plan-{n}.pkl")
        store = str(root / f"store-{n}")
        for kind in ("plan", "whole manifest", "actor"):
            r = run_worker(__file__, kind, str(corpus), store, scratch)
            got[(kind, n)] = r
            rows.append({"utterances": n, "corpus MB": size / 2**20, "step": kind, **r})
            print(f"{n:>7} {kind:>15}: {r['seconds']:.2f} s, {r['mb']:.1f} MB", flush=True)
    print()
    print(table(rows, ["utterances", "corpus MB", "step", "seconds", "mb", "utterances"]))
    small, large = args.sizes
    for kind in ("plan", "whole manifest"):
        a, b = got[(kind, small)], got[(kind, large)]
        per = (b["mb"] - a["mb"]) * 2**20 / (large - small)
        print(
            f"{kind}: {per:.0f} bytes per utterance (growth {small:,} -> {large:,}); "
            f"time {b['seconds'] / a['seconds']:.2f}x"
        )
    a, b = got[("actor", small)], got[("actor", large)]
    print(f"actor memory {large:,} / {small:,}: {b['mb'] / max(a['mb'], 1e-9):.2f}x")
    plan, whole = got[("plan", large)], got[("whole manifest", large)]
    print(
        f"at {large:,}: plan / whole manifest = {plan['seconds'] / whole['seconds']:.2f}x time, "
        f"{plan['mb'] / whole['mb']:.2f}x memory"
    )


if __name__ == "__main__":
    main()
