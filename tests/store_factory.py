"""Synthetic stores with known contents, written through the real store writer."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from extractor.store import StoreWriter

VOCAB = (
    [(i, f"w{i}", "text") for i in range(12)]
    + [(12 + i, f"<Un{i}>", "speech") for i in range(6)]
    + [(18, "<speech>", "marker"), (19, "<text>", "marker")]
)


@dataclass
class SyntheticStore:
    uri: str
    runs: list[dict]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _ranks(rng, n, scale):
    return rng.integers(0, scale, n).astype("int32")


def build_store(
    uri: str,
    *,
    seed: int = 0,
    n_runs: int = 3,
    n_utts: int = 6,
    n_layers: int = 4,
    shards: int = 2,
    positions: str = "spoken_words",
    models: list[str] | None = None,
) -> SyntheticStore:
    """Runs of one model at several checkpoints, each over the same utterances
    (``models``: each run's model name instead, e.g. one per training seed).

    Ranks are random but skewed by layer so curves have a peak; fact pairs make
    knowledge accuracy defined. Returns the rows as DataFrames (with run_id) for
    independent pandas computations.
    """
    rng = np.random.default_rng(seed)
    writer = StoreWriter(uri)
    tables: dict[str, list[dict]] = {
        t: [] for t in ("vocab", "utterances", "words", "tokens", "lens", "word_lens")
    }
    runs = []
    for r in range(n_runs):
        run_id = f"run-{r}"
        run = dict(
            model=models[r] if models else "toy-slm",
            revision=f"ckpt{r:02d}",
            dataset="synthetic",
            n_layers=n_layers,
            vocab_size=len(VOCAB),
            k=3,
            config={"seed": seed, "lens": {"positions": positions}},
            status="finished",
            started_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            finished_at=dt.datetime(2026, 1, 1, 0, 5, tzinfo=dt.UTC),
        )
        writer.write_run(
            run_id,
            **{**run, "status": "running"},
            updated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        )
        writer.write_run(run_id, **run, updated_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
        runs.append({"run_id": run_id, **run})
        peak = 1 + r % (n_layers - 1)  # checkpoints peak at different layers
        for shard in range(shards):
            rows: dict[str, list[dict]] = {t: [] for t in tables}
            if shard == 0:
                rows["vocab"] = [{"token_id": i, "token": t, "modality": m} for i, t, m in VOCAB]
            for u in range(shard, n_utts, shards):
                utt = f"utt{u}"
                n_words = int(rng.integers(2, 5))
                position = 0
                word_rows, token_rows = [], []
                for w in range(n_words):
                    modality = "speech" if (w + u) % 3 else "text"
                    n_pos = int(rng.integers(1, 4)) if modality == "speech" else 1
                    first = position
                    for _ in range(n_pos):
                        token_rows.append(
                            {
                                "utterance_id": utt,
                                "position": position,
                                "token_id": int(rng.integers(12, 18))
                                if modality == "speech"
                                else w,
                                "modality": modality,
                                "word_index": w,
                            }
                        )
                        position += 1
                    word_rows.append(
                        {
                            "utterance_id": utt,
                            "word_index": w,
                            "word": f"w{w}",
                            "modality": modality,
                            "start_s": 0.3 * w,
                            "end_s": 0.3 * w + 0.2,
                            "first_position": first,
                            "last_position": position - 1,
                            "variant_ids": [w],
                            "next_variant_ids": [w + 1] if w + 1 < n_words else None,
                            "ctrl_word": "w7",
                            "ctrl_variant_ids": [7],
                        }
                    )
                pair = u // 2
                rows["utterances"].append(
                    {
                        "shard": shard,
                        "utterance_id": utt,
                        "n_tokens": position,
                        "duration_s": 0.3 * n_words,
                        "text": " ".join(f"w{i}" for i in range(n_words)),
                        "pair_id": f"fact{pair}" if u < n_utts - (n_utts % 2) else None,
                        "pair_role": "correct" if u % 2 == 0 else "counterfactual",
                        "continuation_start": max(1, position - 2),
                    }
                )
                rows["words"] += word_rows
                rows["tokens"] += token_rows
                for tok in token_rows:
                    w = tok["word_index"]
                    has_next = w + 1 < n_words
                    for layer in range(n_layers + 1):
                        boost = 8 if layer == peak else 0
                        n = 1
                        cur = _ranks(rng, n, 12 - boost if tok["modality"] == "speech" else 12)[0]
                        top1 = (
                            int(rng.integers(12, 18))
                            if rng.random() < 0.7
                            else int(rng.integers(0, 12))
                        )
                        speech_lm = float(np.log(rng.uniform(0.05, 0.95)))
                        rows["lens"].append(
                            {
                                "utterance_id": utt,
                                "position": tok["position"],
                                "layer": layer,
                                "word_index": w,
                                "modality": tok["modality"],
                                "topk_ids": [top1, 1, 2],
                                "topk_logprobs": [-0.5, -1.0, -2.0],
                                "text_topk_ids": [0, 1, 2],
                                "text_topk_logprobs": [-1.0, -2.0, -3.0],
                                "logsumexp": 5.0,
                                "speech_logmass": speech_lm,
                                "text_logmass": float(np.log1p(-np.exp(speech_lm))),
                                "cur_word_rank": int(cur) + 6,
                                "cur_word_text_rank": int(cur),
                                "next_word_rank": int(rng.integers(0, 20)) if has_next else None,
                                "next_word_text_rank": int(rng.integers(0, 12))
                                if has_next
                                else None,
                                "ctrl_word_rank": int(rng.integers(0, 20)),
                                "ctrl_word_text_rank": int(rng.integers(0, 12)),
                                "next_token_logprob": float(-rng.uniform(0, 5)),
                            }
                        )
                for word in word_rows:
                    if word["modality"] != "speech":
                        continue
                    for layer in range(n_layers + 1):
                        has_next = word["next_variant_ids"] is not None
                        rows["word_lens"].append(
                            {
                                "utterance_id": utt,
                                "word_index": word["word_index"],
                                "layer": layer,
                                "pooled_topk_ids": [1, 2, 3],
                                "pooled_text_topk_ids": [1, 2, 3],
                                "cur_word_rank": int(rng.integers(0, 20)),
                                "cur_word_text_rank": int(rng.integers(0, 12)),
                                "next_word_rank": int(rng.integers(0, 20)) if has_next else None,
                                "next_word_text_rank": int(rng.integers(0, 12))
                                if has_next
                                else None,
                                "ctrl_word_rank": int(rng.integers(0, 20)),
                                "ctrl_word_text_rank": int(rng.integers(0, 12)),
                            }
                        )
            with writer.shard(run_id, shard) as sw:
                for table, trows in rows.items():
                    sw.write(table, trows)
                    tables[table] += [{**row, "run_id": run_id} for row in trows]
                sw.commit({"synthetic": True})
    frames = {t: pd.DataFrame(rows) for t, rows in tables.items()}
    return SyntheticStore(uri=uri, runs=runs, tables=frames)
