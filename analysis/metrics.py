"""The paper's statistics as SQL over the store's views (defined in docs/metrics.md).

Each metric has a ``*_sql`` function that returns the query (so it can be
printed, audited and pasted into any DuckDB shell over the store) and a
function that runs it and returns a tidy pandas table. Ranks were computed
exactly at extraction time, so any k is a parameter, not a re-extraction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from . import schema

AGGREGATIONS = ("any", "last", "pooled")
TARGETS = ("cur", "next")
RANKS = tuple(reversed(schema.RANK_KINDS))  # ("text", "full"): text is the default


class MetricError(ValueError):
    """A metric asked for with parameters it does not have."""


@dataclass(frozen=True)
class Filters:
    """Which runs and positions a metric reads.

    ``runs``/``models``/``revisions`` select runs (a revision is a checkpoint's
    content fingerprint); ``modality`` selects the positions a word is read at
    (``speech``: the word's unit tokens, the paper's setting).
    """

    runs: Sequence[str] | None = None
    models: Sequence[str] | None = None
    revisions: Sequence[str] | None = None
    modality: str = "speech"


#: The default: every run, words read at their speech positions.
ALL_RUNS = Filters()


def _literal_list(values: Sequence[str]) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


#: A run's foreign lens head (its checkpoint fingerprint), or '' for the model's own head.
HEAD_OF_RUN = "coalesce(json_extract_string(config, '$.lens.head_revision'), '')"
#: Why a foreign-head run scores no knowledge item.
FOREIGN_HEAD_NOTE = (
    "foreign head (lens.head): no log-prob of the model head for its next tokens; "
    "run without lens.head to score knowledge items"
)


#: Why a run with failed utterances may score some items without a member.
FAILED_NOTE = (
    "utterances failed extraction (failures view): an item that lost a counterfactual is "
    "scored against the rest"
)


def _runs_cte(filters: Filters) -> str:
    where = ["TRUE"]
    if filters.runs is not None:
        where.append(f"run_id IN ({_literal_list(filters.runs) or 'NULL'})")
    if filters.models is not None:
        where.append(f"model IN ({_literal_list(filters.models) or 'NULL'})")
    if filters.revisions is not None:
        where.append(f"revision IN ({_literal_list(filters.revisions) or 'NULL'})")
    return (
        "sel_runs AS (SELECT run_id, model, revision, n_layers, dataset, "
        f"{HEAD_OF_RUN} AS head FROM runs WHERE {' AND '.join(where)})"
    )


def selected_runs(con: duckdb.DuckDBPyConnection, filters: Filters) -> list[str]:
    """The run ids ``filters`` choose, in order."""
    sql = f"WITH {_runs_cte(filters)} SELECT run_id FROM sel_runs ORDER BY run_id"
    return [run for (run,) in con.sql(sql).fetchall()]


def _check(k: int, agg: str, target: str, rank: str) -> None:
    if not isinstance(k, int) or k < 1:
        raise MetricError(f"k must be a positive integer, got {k!r}")
    if agg not in AGGREGATIONS:
        raise MetricError(f"aggregation {agg!r} unknown: use one of {AGGREGATIONS}")
    if target not in TARGETS:
        raise MetricError(f"target {target!r} unknown: use one of {TARGETS}")
    if rank not in RANKS:
        raise MetricError(f"rank {rank!r} unknown: use one of {RANKS}")


def _rank_col(word: str, rank: str) -> str:
    return schema.rank_column(word, rank)


def _per_word_sql(agg: str, target: str, rank: str, filters: Filters) -> str:
    """One row per (run, utterance, word, layer): the word's rank ``r`` and control's ``c``."""
    col, ctrl = _rank_col(target, rank), _rank_col("ctrl", rank)
    mod = filters.modality.replace("'", "''")
    has_next = f"AND {_rank_col('next', rank)} IS NOT NULL" if target == "next" else ""
    if agg == "pooled":
        per_word = f"""
  SELECT wl.run_id, wl.utterance_id, wl.word_index, wl.layer,
         wl.{col} AS r, wl.{ctrl} AS c
  FROM word_lens wl
  JOIN words w USING (run_id, utterance_id, word_index)
  WHERE wl.run_id IN (SELECT run_id FROM sel_runs) AND w.modality = '{mod}'
    AND wl.{col} IS NOT NULL {has_next.replace("AND ", "AND wl.")}"""
    else:
        pick = "min({x})" if agg == "any" else "arg_max({x}, position)"
        per_word = f"""
  SELECT run_id, utterance_id, word_index, layer,
         {pick.format(x=col)} AS r, {pick.format(x=ctrl)} AS c
  FROM lens
  WHERE run_id IN (SELECT run_id FROM sel_runs) AND modality = '{mod}'
    AND word_index IS NOT NULL AND {col} IS NOT NULL {has_next}
  GROUP BY run_id, utterance_id, word_index, layer"""
    return per_word


def _per_word_cte(k: int, agg: str, target: str, rank: str, filters: Filters) -> str:
    """``WITH sel_runs, per_word``: what every recall query starts from (parameters checked)."""
    _check(k, agg, target, rank)
    return f"""WITH {_runs_cte(filters)},
per_word AS ({_per_word_sql(agg, target, rank, filters)}
)"""


def recall_sql(
    k: int = 10,
    agg: str = "any",
    target: str = "cur",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
) -> str:
    """Recall@k per run and layer of the current (or next) word, with its chance control.

    ``any``: some position of the word ranks a variant < k; ``last``: the word's
    last position does; ``pooled``: the element-wise max of the word's logits
    does (the ``word_lens`` table). ``rank``: ``text`` counts only text tokens
    above the variant, ``full`` the whole vocabulary.
    """
    return f"""{_per_word_cte(k, agg, target, rank, filters)}
SELECT p.run_id, s.model, s.revision, p.layer,
       p.layer / s.n_layers AS rel_depth,
       count(*) AS n_words,
       avg((p.r < {k})::DOUBLE) AS recall,
       avg((p.c < {k})::DOUBLE) AS control_recall
FROM per_word p JOIN sel_runs s USING (run_id)
GROUP BY p.run_id, s.model, s.revision, p.layer, s.n_layers
ORDER BY p.run_id, p.layer"""


def recall_by_layer(
    con: duckdb.DuckDBPyConnection,
    k: int = 10,
    agg: str = "any",
    target: str = "cur",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
) -> pd.DataFrame:
    """Tidy table: run_id, model, revision, layer, rel_depth, n_words, recall, control_recall."""
    return con.sql(recall_sql(k, agg, target, rank, filters)).df()


def recall_counts_sql(
    k: int = 10,
    agg: str = "any",
    target: str = "cur",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
) -> str:
    """Per run, utterance and layer: words, hits, words with a control, control hits.

    What :func:`recall_with_ci` resamples: summed over utterances, these give
    :func:`recall_sql`'s ratios exactly.
    """
    return f"""{_per_word_cte(k, agg, target, rank, filters)}
SELECT run_id, utterance_id, layer,
       count(*) AS n_words, count_if(r < {k}) AS hits,
       count(c) AS n_ctrl, count_if(c < {k}) AS ctrl_hits
FROM per_word
GROUP BY run_id, utterance_id, layer
ORDER BY run_id, utterance_id, layer"""


def recall_with_ci(
    con: duckdb.DuckDBPyConnection,
    k: int = 10,
    agg: str = "any",
    target: str = "cur",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`recall_by_layer` and :func:`peak_layers` with bootstrap intervals.

    Utterances are resampled (:mod:`analysis.uncertainty`), seeded per run. The recall
    table gains ``recall_lo``/``recall_hi``, ``control_lo``/``control_hi`` and
    ``ratio_lo``/``ratio_hi`` (recall over control, from the same draws); the peak
    table gains ``peak_layer_lo``/``peak_layer_hi`` (where the replicates' curves peak)
    and ``peak_recall_lo``/``peak_recall_hi`` (recall at the peak layer).
    """
    from .uncertainty import bootstrap_ratios, peak_layer_interval, percentile_interval, run_rng

    recall = recall_by_layer(con, k, agg, target, rank, filters)
    counts = con.sql(recall_counts_sql(k, agg, target, rank, filters)).df()
    bounds, peak_bounds = [], []
    for run_id, df in counts.groupby("run_id", sort=True):
        arrays = {
            c: df.pivot_table(index="utterance_id", columns="layer", values=c, fill_value=0)
            for c in ("n_words", "hits", "n_ctrl", "ctrl_hits")
        }
        layers = arrays["n_words"].columns.to_numpy()
        reps = bootstrap_ratios(
            [
                (arrays["hits"].to_numpy(), arrays["n_words"].to_numpy()),
                (arrays["ctrl_hits"].to_numpy(), arrays["n_ctrl"].to_numpy()),
            ],
            n_boot,
            run_rng(seed, run_id),
        )
        lo, hi = percentile_interval(reps, level)
        with np.errstate(invalid="ignore", divide="ignore"):  # a control of 0: no ratio
            ratio = np.where(reps[:, 1] > 0, reps[:, 0] / reps[:, 1], np.nan)
        ratio_lo, ratio_hi = percentile_interval(ratio, level)
        bounds.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "layer": layers,
                    "recall_lo": lo[0],
                    "recall_hi": hi[0],
                    "control_lo": lo[1],
                    "control_hi": hi[1],
                    "ratio_lo": ratio_lo,
                    "ratio_hi": ratio_hi,
                }
            )
        )
        layer_lo, layer_hi = peak_layer_interval(reps[:, 0], layers, level)
        peak_bounds.append({"run_id": run_id, "peak_layer_lo": layer_lo, "peak_layer_hi": layer_hi})
    if bounds:
        recall = recall.merge(pd.concat(bounds), on=["run_id", "layer"], how="left")
    peaks = peak_layers(recall)
    if peak_bounds:
        peaks = peaks.merge(pd.DataFrame(peak_bounds), on="run_id", how="left")
        at_peak = recall[["run_id", "layer", "recall_lo", "recall_hi"]].rename(
            columns={
                "layer": "peak_layer",
                "recall_lo": "peak_recall_lo",
                "recall_hi": "peak_recall_hi",
            }
        )
        peaks = peaks.merge(at_peak, on=["run_id", "peak_layer"], how="left")
    return recall, peaks


def word_final_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Runs that lensed only each word's last position (``lens.positions: word_final``).

    A word then has one lensed row, so its max-pooled ranks equal its last row's:
    ``pooled`` and ``last`` recall coincide for these runs, by construction, but for the
    words of a spoken-knowledge continuation, whose every position is lensed.
    """
    rows = con.sql(
        "SELECT DISTINCT run_id FROM runs "
        "WHERE json_extract_string(config, '$.lens.positions') = 'word_final' ORDER BY run_id"
    ).fetchall()
    return [r[0] for r in rows]


def recall_table(
    con: duckdb.DuckDBPyConnection,
    k: int = 10,
    aggs: Sequence[str] = AGGREGATIONS,
    targets: Sequence[str] = TARGETS,
    ranks: Sequence[str] = RANKS,
    filters: Filters = ALL_RUNS,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Every recall curve asked for, stacked with ``agg``, ``target`` and ``rank`` columns
    (with :func:`recall_with_ci`'s interval columns when ``ci`` is a level)."""
    parts = []
    for rank in ranks:
        for target in targets:
            for agg in aggs:
                if ci is None:
                    df = recall_by_layer(con, k, agg, target, rank, filters)
                else:
                    df, _ = recall_with_ci(con, k, agg, target, rank, filters, ci, n_boot, seed)
                parts.append(df.assign(agg=agg, target=target, rank=rank, k=k))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def peak_layers(recall: pd.DataFrame) -> pd.DataFrame:
    """Per run (and agg/target/rank if present): the layer of maximum recall, and its depth."""
    keys = [c for c in ("run_id", "model", "revision", "agg", "target", "rank", "k") if c in recall]
    if recall.empty:
        return pd.DataFrame(columns=[*keys, "peak_layer", "peak_rel_depth", "peak_recall"])
    idx = recall.groupby(keys, dropna=False)["recall"].idxmax()
    peak = recall.loc[idx, [*keys, "layer", "rel_depth", "recall", "control_recall"]]
    return peak.rename(
        columns={
            "layer": "peak_layer",
            "rel_depth": "peak_rel_depth",
            "recall": "peak_recall",
            "control_recall": "control_at_peak",
        }
    ).reset_index(drop=True)


#: A training seed in a model name, after a separator: ``-s3``, ``_seed3``, ``.seed-3``.
SEED_IN_NAME = re.compile(r"[-_.](?:s|seed-?)(\d+)(?=$|[-_.])")


def seed_family(model: str) -> tuple[str, int | None]:
    """(the model name without its seed, the seed), or (name, None) if it names none."""
    match = SEED_IN_NAME.search(model)
    if match is None:
        return model, None
    return (model[: match.start()] + model[match.end() :]).strip("-_."), int(match.group(1))


def recall_over_seeds(
    con: duckdb.DuckDBPyConnection,
    k: int = 10,
    agg: str = "any",
    target: str = "cur",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
) -> pd.DataFrame:
    """Recall curves aggregated over training seeds.

    Runs whose model names differ only by a seed (``organism-s0``, ``organism-s1``), on
    the same dataset and decoded by the same head, form a family; a run whose name has
    no seed is its own family, never merged with seeded ones. Per family and layer: the
    number of seeds, their mean recall, its sample standard deviation, min and max, and
    the mean control recall. A seed with several runs in one family (checkpoints), or an
    unseeded model with several, is refused, naming them.
    """
    columns = [
        "family",
        "dataset",
        "head",
        "layer",
        "rel_depth",
        "n_seeds",
        "seeds",
        "recall_mean",
        "recall_sd",
        "recall_min",
        "recall_max",
        "control_mean",
    ]
    recall = recall_by_layer(con, k, agg, target, rank, filters)
    if recall.empty:
        return pd.DataFrame(columns=columns)
    runs = con.sql(f"WITH {_runs_cte(filters)} SELECT run_id, model, dataset, head FROM sel_runs")
    runs = runs.df()
    runs["seed"] = [seed_family(m)[1] for m in runs["model"]]
    runs["family"] = [
        seed_family(m)[0] if s is not None else m
        for m, s in zip(runs["model"], runs["seed"], strict=True)
    ]
    runs = runs[runs["run_id"].isin(recall["run_id"])].copy()  # a run without recall: no weight
    keys = ["family", "dataset", "head"]
    # An unseeded model keeps its own family even where its name equals a seeded family's.
    runs.loc[runs["seed"].isna(), "family"] = runs["model"] + " (no seed)"
    # Several checkpoints of one seed (or of one unseeded model) would be averaged as if
    # they were seeds: refused, as pandas counts NaN seeds alike.
    repeated = runs[runs.duplicated([*keys, "seed"], keep=False)]
    if not repeated.empty:
        raise MetricError(
            "several runs share a model, dataset, head and seed (or the lack of one), so "
            f"which one stands for it is unclear: {sorted(repeated['run_id'])}; choose runs "
            "with --run"
        )
    table = recall.merge(runs[["run_id", *keys, "seed"]], on="run_id")
    out = (
        table.groupby([*keys, "layer"], dropna=False)
        .agg(
            rel_depth=("rel_depth", "first"),
            n_seeds=("run_id", "nunique"),
            seeds=("seed", lambda v: sorted(int(x) for x in v.dropna())),
            recall_mean=("recall", "mean"),
            recall_sd=("recall", "std"),
            recall_min=("recall", "min"),
            recall_max=("recall", "max"),
            control_mean=("control_recall", "mean"),
        )
        .reset_index()
    )
    return out[columns]


def modality_mass_sql(filters: Filters = ALL_RUNS) -> str:
    """Per run and layer: mean lens probability mass on speech and text tokens, top-1 modality."""
    mod = filters.modality.replace("'", "''")
    return f"""WITH {_runs_cte(filters)}
SELECT l.run_id, l.layer, l.layer / s.n_layers AS rel_depth,
       count(*) AS n_positions,
       avg(exp(l.speech_logmass)) AS speech_mass,
       avg(exp(l.text_logmass)) AS text_mass,
       avg((v.modality = 'speech')::DOUBLE) AS top1_speech_frac,
       avg((v.modality = 'text')::DOUBLE) AS top1_text_frac
FROM lens l
JOIN sel_runs s USING (run_id)
LEFT JOIN vocab v ON v.run_id = l.run_id AND v.token_id = l.topk_ids[1]
WHERE l.modality = '{mod}'
GROUP BY l.run_id, l.layer, s.n_layers
ORDER BY l.run_id, l.layer"""


def modality_mass(con: duckdb.DuckDBPyConnection, filters: Filters = ALL_RUNS) -> pd.DataFrame:
    return con.sql(modality_mass_sql(filters)).df()


def prediction_depth_sql(filters: Filters = ALL_RUNS) -> str:
    """Per run: mean/median first layer from which the top-1 stays equal to the final top-1."""
    mod = filters.modality.replace("'", "''")
    return f"""WITH {_runs_cte(filters)},
final AS (
  SELECT l.run_id, l.utterance_id, l.position, l.topk_ids[1] AS final_top1
  FROM lens l JOIN sel_runs s USING (run_id)
  WHERE l.layer = s.n_layers AND l.modality = '{mod}'
),
depth AS (
  SELECT l.run_id, l.utterance_id, l.position,
         coalesce(max(l.layer) FILTER (WHERE l.topk_ids[1] <> f.final_top1) + 1, 0) AS depth
  FROM lens l JOIN final f USING (run_id, utterance_id, position)
  GROUP BY l.run_id, l.utterance_id, l.position
)
SELECT d.run_id, count(*) AS n_positions, avg(d.depth) AS mean_depth,
       median(d.depth) AS median_depth, avg(d.depth / s.n_layers) AS mean_rel_depth
FROM depth d JOIN sel_runs s USING (run_id)
GROUP BY d.run_id ORDER BY d.run_id"""


def prediction_depth(con: duckdb.DuckDBPyConnection, filters: Filters = ALL_RUNS) -> pd.DataFrame:
    return con.sql(prediction_depth_sql(filters)).df()


def knowledge_accuracy_sql(filters: Filters = ALL_RUNS) -> str:
    """Spoken-knowledge accuracy: share of items whose correct continuation is likelier
    than every counterfactual of the item.

    A continuation's log-likelihood is the sum of the final layer's log-prob of
    each actual next token over it: positions continuation_start - 1 to n_tokens - 2.
    An item (``pair_id``) counts when it has exactly one ``correct`` utterance, at
    least one ``counterfactual``, and every continuation fully scored;
    ``n_pairs_dropped`` counts the items that do not (a role is missing or repeated, a
    continuation was cut short, or the run decodes with a foreign head, which has no
    log-prob of the model's own next token: ``note`` says so).

    An utterance that failed extraction has no ``utterances`` row, and its failure row no
    ``pair_id``: an item that lost its correct member or its only counterfactual is
    dropped unseen, and one that lost one of several counterfactuals is scored against
    the rest. ``n_failed_utterances`` counts the run's failures (of any utterance), and
    ``note`` warns when there are some.
    """
    return f"""WITH {_runs_cte(filters)},
cont AS (
  SELECT u.run_id, u.pair_id, u.pair_role, u.utterance_id,
         sum(l.next_token_logprob) AS loglik,
         coalesce(count(l.next_token_logprob) = max(u.n_tokens - u.continuation_start), false)
           AS complete
  FROM utterances u
  JOIN sel_runs s USING (run_id)
  LEFT JOIN lens l ON l.run_id = u.run_id AND l.utterance_id = u.utterance_id
                  AND l.layer = s.n_layers
                  AND l.position >= u.continuation_start - 1 AND l.position < u.n_tokens - 1
  WHERE u.pair_id IS NOT NULL
  GROUP BY u.run_id, u.pair_id, u.pair_role, u.utterance_id
),
items AS (
  SELECT run_id, pair_id,
         count_if(pair_role = 'correct') = 1 AND count_if(pair_role = 'counterfactual') >= 1
           AND bool_and(complete) AS usable,
         max(loglik) FILTER (WHERE pair_role = 'correct') AS correct_loglik,
         max(loglik) FILTER (WHERE pair_role = 'counterfactual') AS best_counterfactual
  FROM cont
  GROUP BY run_id, pair_id
),
failed AS (  -- a shard's record that named no utterance still counts, once
  SELECT f.run_id,
         count(DISTINCT f.utterance_id) + count(*) FILTER (WHERE f.utterance_id IS NULL) AS n
  FROM failures f JOIN sel_runs s USING (run_id)
  GROUP BY f.run_id
),
scored AS (
  SELECT i.run_id, count_if(usable)::BIGINT AS n_pairs,
         count_if(NOT usable)::BIGINT AS n_pairs_dropped,
         avg((correct_loglik > best_counterfactual)::DOUBLE) FILTER (WHERE usable) AS accuracy,
         any_value(s.head) <> '' AS foreign_head
  FROM items i JOIN sel_runs s USING (run_id)
  GROUP BY i.run_id
)
SELECT c.run_id, c.n_pairs, c.n_pairs_dropped, c.accuracy,
       coalesce(f.n, 0)::BIGINT AS n_failed_utterances,
       concat_ws('; ',
         CASE WHEN c.foreign_head THEN '{FOREIGN_HEAD_NOTE}' END,
         CASE WHEN f.n > 0 THEN f.n || ' {FAILED_NOTE}' END) AS note
FROM scored c LEFT JOIN failed f USING (run_id)
ORDER BY c.run_id"""


def knowledge_accuracy(con: duckdb.DuckDBPyConnection, filters: Filters = ALL_RUNS) -> pd.DataFrame:
    return con.sql(knowledge_accuracy_sql(filters)).df()


def knowledge_correlation(
    con: duckdb.DuckDBPyConnection,
    k: int = 10,
    agg: str = "any",
    rank: str = "text",
    filters: Filters = ALL_RUNS,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per checkpoint, knowledge accuracy beside peak current-word recall, and their correlation.

    A checkpoint is a (model, revision, lens head): recall measured on an aligned corpus (one run)
    meets accuracy measured on a knowledge benchmark (another run) of the same weights.
    Several runs on one side are averaged (accuracy weighted by pairs). The table keeps
    checkpoints with only one side, with a ``note`` saying why the other is missing
    (``no text tokens`` for a vocabulary without a text segment, where text recall
    cannot exist). Statistics over the checkpoints with both: Pearson and Spearman,
    permutation p-values, and bootstrap intervals over checkpoints.
    """
    from . import uncertainty as unc

    peaks = peak_layers(recall_by_layer(con, k, agg, "cur", rank, filters))
    acc = knowledge_accuracy(con, filters)
    runs = con.sql(
        f"""WITH {_runs_cte(filters)}
SELECT s.run_id, s.model, s.revision, s.head, coalesce(v.n_text, 0) AS n_text,
       s.run_id IN (SELECT run_id FROM utterances WHERE pair_id IS NOT NULL) AS has_pairs
FROM sel_runs s
LEFT JOIN (SELECT run_id, count_if(modality = 'text') AS n_text FROM vocab GROUP BY run_id) v
  USING (run_id)"""
    ).df()
    # A checkpoint decoded by another head is another measurement: never averaged together.
    keys = ["model", "revision", "head"]
    acc = acc.merge(runs[["run_id", *keys]], on="run_id")
    acc_side = (
        acc.assign(hits=acc.accuracy * acc.n_pairs)
        .groupby(keys)
        .agg(n_pairs=("n_pairs", "sum"), hits=("hits", "sum"), knowledge_runs=("run_id", ",".join))
        .reset_index()
    )
    acc_side["accuracy"] = acc_side.hits / acc_side.n_pairs
    # Knowledge items are spoken sentences too, so a knowledge run has recall of its own:
    # where a checkpoint has runs without items (its aligned corpora), recall is theirs.
    has_aligned = runs.groupby(keys)["has_pairs"].transform(lambda p: bool((~p).any()))
    eligible = set(runs.run_id[~runs.has_pairs.astype(bool) | ~has_aligned.astype(bool)])
    peaks = peaks.merge(runs[["run_id", "head"]], on="run_id")
    recall_side = (
        peaks[peaks.run_id.isin(eligible)]
        .groupby(keys)
        .agg(peak_recall=("peak_recall", "mean"), recall_runs=("run_id", ",".join))
        .reset_index()
    )
    text = runs.groupby(keys).agg(n_text=("n_text", "max")).reset_index()
    table = acc_side.drop(columns="hits").merge(recall_side, on=keys, how="outer")
    table = table.merge(text, on=keys, how="left")
    table["note"] = np.select(
        [
            table.peak_recall.isna() & (table.n_text == 0) & (rank == "text"),
            table.peak_recall.isna(),
            table.accuracy.isna(),
        ],
        ["no text tokens", "no aligned spoken words", "no knowledge pairs"],
        default="",
    )
    table = table.drop(columns="n_text").sort_values(keys).reset_index(drop=True)
    both = table[table.accuracy.notna() & table.peak_recall.notna()]
    x, y = both.accuracy.to_numpy(float), both.peak_recall.to_numpy(float)
    rng = unc.run_rng(seed, "knowledge_correlation")
    stats: dict[str, float] = {"n_checkpoints": len(both), "level": level}
    for name, fn in (("pearson", unc.pearson), ("spearman", unc.spearman)):
        stats[name] = fn(x, y)
        stats[f"{name}_p"] = unc.permutation_p(x, y, fn, rng)
        stats[f"{name}_lo"], stats[f"{name}_hi"] = unc.bootstrap_correlation(
            x, y, fn, rng, n_boot, level
        )
    return table, stats


def runs_overview(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every run by model and checkpoint: status, times, committed shards and lens rows."""
    return con.sql(
        """SELECT r.model, r.revision, r.run_id, r.status, r.started_at, r.finished_at,
                  count(s.shard) AS shards, sum(s.lens_rows) AS lens_rows, r.message
           FROM runs r LEFT JOIN shards s USING (run_id)
           GROUP BY ALL ORDER BY r.model, r.started_at, r.run_id"""
    ).df()


def layer_summary(con: duckdb.DuckDBPyConnection, filters: Filters = ALL_RUNS) -> pd.DataFrame:
    """One run's story per layer, at the speech positions of each spoken word.

    Current-word recall@10 (text rank, any position) with its chance control and
    ``n_words``; next-word recall@10 (``next_recall``); the word's text token first in
    the max-pooled logits (``top1_pooled``) beside chance (``top1_control``); and the
    lens probability mass on speech tokens (``speech_mass``, ``top1_speech_frac``).
    Meant for a store (or ``filters``) holding one run: layers of several runs would mix.
    """
    cur = recall_by_layer(con, k=10, filters=filters)
    cur = cur[["layer", "n_words", "recall", "control_recall"]]
    nxt = recall_by_layer(con, k=10, target="next", filters=filters)[["layer", "recall"]]
    mass = modality_mass(con, filters)[["layer", "speech_mass", "top1_speech_frac"]]
    strict = recall_by_layer(con, k=1, agg="pooled", filters=filters)
    strict = strict[["layer", "recall", "control_recall"]].rename(
        columns={"recall": "top1_pooled", "control_recall": "top1_control"}
    )
    return (
        cur.merge(nxt.rename(columns={"recall": "next_recall"}), on="layer", how="left")
        .merge(strict, on="layer", how="left")
        .merge(mass, on="layer", how="left")
    )
