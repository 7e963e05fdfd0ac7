"""The store contract: table schemas, paths and versions (docs/store.md explains it).

Shared by the writer (extractor side) and the readers (analysis side); pure
pyarrow, no torch. A store is a root folder or ``s3://bucket/prefix`` holding:

    _slm_lens_store.json                          {"schema_version": N}
    <table>/run_id=<id>/shard-<NNNNN>-<attempt>-<seq>.parquet
    runs/run_id=<id>/<utc-stamp>-<hex>.parquet     (one file per status change)
    _commits/run_id=<id>/shard-<NNNNN>.json        (a shard's commit marker)
    _attempts/run_id=<id>/shard-<NNNNN>/<attempt>.json  (files an attempt wrote)
    _failed/run_id=<id>/shard-<NNNNN>.json         (why a shard is not committed)
    _submissions/run_id=<id>/attempt-<NNN>.json    (the watcher's own job log)
    _probe/run_id=<id>/<uuid>.token                (is a local store shared by all nodes?)
    _compactions/run_id=<id>/compaction-<NNNNN>.json  (shards merged into larger files)
    _attempts/run_id=<id>/compaction-<NNNNN>/<token>.json  (a compaction's journal)
    <table>/run_id=<id>/compact-<NNNNN>-<token>-<seq>.parquet   (a compaction's data)

A shard's data files are listed in its commit marker, which is written last;
readers read only files named by markers, so nothing half-written is ever seen,
on object stores without atomic renames as well as on local disk. The attempt
journal names every file an attempt writes before it writes it, so the attempt
that commits can delete the others' leftovers without listing the store.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
STORE_MARKER = "_slm_lens_store.json"
COMMITS_DIR = "_commits"
RUNS_TABLE = "runs"

#: Shard number of a run's one-off rows (vocabulary, manifest-level failures), committed
#: like any shard: the store contract's, imported by the writer's driver and the readers.
SETUP_SHARD = 0

_rank = pa.int32()
_ids = pa.list_(pa.int32())
_lps = pa.list_(pa.float32())

#: The words whose ranks each lensed row stores: the spoken word, the next word, the control.
WORD_TARGETS = ("cur", "next", "ctrl")
#: Which rank: over the whole vocabulary, or within the text segment.
RANK_KINDS = ("full", "text")


def rank_column(word: str, kind: str = "full") -> str:
    """``cur_word_rank``, ``cur_word_text_rank``, ...: the one spelling of a rank column."""
    return f"{word}_word_text_rank" if kind == "text" else f"{word}_word_rank"


_rank_fields = [(rank_column(w, k), _rank) for w in WORD_TARGETS for k in RANK_KINDS]

TABLES: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            ("model", pa.string()),
            ("revision", pa.string()),
            ("dataset", pa.string()),
            ("n_layers", pa.int32()),
            ("vocab_size", pa.int32()),
            ("k", pa.int32()),
            ("config", pa.string()),
            ("status", pa.string()),
            ("started_at", pa.timestamp("us", tz="UTC")),
            ("finished_at", pa.timestamp("us", tz="UTC")),
            ("updated_at", pa.timestamp("us", tz="UTC")),
            ("message", pa.string()),
        ]
    ),
    "vocab": pa.schema(
        [("token_id", pa.int32()), ("token", pa.string()), ("modality", pa.string())]
    ),
    "utterances": pa.schema(
        [
            ("shard", pa.int32()),
            ("utterance_id", pa.string()),
            ("n_tokens", pa.int32()),
            ("duration_s", pa.float64()),
            ("text", pa.string()),
            ("pair_id", pa.string()),
            ("pair_role", pa.string()),
            ("continuation_start", pa.int32()),
        ]
    ),
    "words": pa.schema(
        [
            ("utterance_id", pa.string()),
            ("word_index", pa.int32()),
            ("word", pa.string()),
            ("modality", pa.string()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("first_position", pa.int32()),
            ("last_position", pa.int32()),
            ("variant_ids", _ids),
            ("next_variant_ids", _ids),
            ("ctrl_word", pa.string()),
            ("ctrl_variant_ids", _ids),
        ]
    ),
    "tokens": pa.schema(
        [
            ("utterance_id", pa.string()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("modality", pa.string()),
            ("word_index", pa.int32()),
        ]
    ),
    "lens": pa.schema(
        [
            ("utterance_id", pa.string()),
            ("position", pa.int32()),
            ("layer", pa.int16()),
            ("word_index", pa.int32()),
            ("modality", pa.string()),
            ("topk_ids", _ids),
            ("topk_logprobs", _lps),
            ("text_topk_ids", _ids),
            ("text_topk_logprobs", _lps),
            ("logsumexp", pa.float32()),
            ("speech_logmass", pa.float32()),
            ("text_logmass", pa.float32()),
            *_rank_fields,
            ("next_token_logprob", pa.float32()),
        ]
    ),
    "word_lens": pa.schema(
        [
            ("utterance_id", pa.string()),
            ("word_index", pa.int32()),
            ("layer", pa.int16()),
            ("pooled_topk_ids", _ids),
            ("pooled_text_topk_ids", _ids),
            *_rank_fields,
        ]
    ),
    "failures": pa.schema(
        [
            ("shard", pa.int32()),
            ("utterance_id", pa.string()),
            ("stage", pa.string()),
            ("error", pa.string()),
            ("message", pa.string()),
        ]
    ),
}

#: Tables written shard by shard, behind commit markers.
SHARD_TABLES = tuple(t for t in TABLES if t != RUNS_TABLE)

MODALITIES = ("text", "speech", "marker", "special")


ATTEMPTS_DIR = "_attempts"
FAILED_DIR = "_failed"
SUBMISSIONS_DIR = "_submissions"
PROBE_DIR = "_probe"
COMPACTIONS_DIR = "_compactions"


def partition_dir(table: str, run_id: str) -> str:
    return f"{table}/run_id={run_id}"


def commit_path(run_id: str, shard: int) -> str:
    return f"{COMMITS_DIR}/run_id={run_id}/shard-{shard:05d}.json"


def attempts_dir(run_id: str, shard: int) -> str:
    return f"{ATTEMPTS_DIR}/run_id={run_id}/shard-{shard:05d}"


def failed_path(run_id: str, shard: int) -> str:
    return f"{FAILED_DIR}/run_id={run_id}/shard-{shard:05d}.json"


def submission_path(run_id: str, attempt: int) -> str:
    return f"{SUBMISSIONS_DIR}/run_id={run_id}/attempt-{attempt:03d}.json"


def data_file_name(shard: int, attempt: str, seq: int) -> str:
    return f"shard-{shard:05d}-{attempt}-{seq:04d}.parquet"


def compaction_path(run_id: str, generation: int) -> str:
    return f"{COMPACTIONS_DIR}/run_id={run_id}/compaction-{generation:05d}.json"


def compaction_journal(run_id: str, generation: int, token: str) -> str:
    """The files a compaction in progress writes (gc leaves them alone while it is fresh)."""
    return f"{ATTEMPTS_DIR}/run_id={run_id}/compaction-{generation:05d}/{token}.json"


def compacted_file_name(generation: int, token: str, seq: int) -> str:
    return f"compact-{generation:05d}-{token}-{seq:04d}.parquet"


#: Failure rows of a shard that did not commit carry this stage.
SHARD_FAILURE_STAGE = "shard"


def valid_run_id(run_id: str) -> bool:
    """Run ids become path segments: keep them to a safe alphabet."""
    return bool(run_id) and all(c.isalnum() or c in "-_." for c in run_id) and run_id[0] != "."
