"""The analysis layer over a store whose contents the test knows row by row."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from analysis import metrics
from analysis.metrics import Filters, MetricError
from analysis.store import (
    ReadOnlyQueryError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownRunError,
    open_store,
    query,
)

from .store_factory import build_store

K = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def con(store):
    return open_store(store.uri)


# Independent pandas computations of docs/metrics.md -------------------------------------
def pandas_recall(store, k, agg, target, rank):
    suffix = "_text_rank" if rank == "text" else "_rank"
    col, ctrl = f"{target}_word{suffix}", f"ctrl_word{suffix}"
    keys = ["run_id", "utterance_id", "word_index", "layer"]
    if agg == "pooled":
        wl = store.tables["word_lens"].merge(
            store.tables["words"][["run_id", "utterance_id", "word_index", "modality"]]
        )
        per_word = wl[(wl.modality == "speech") & wl[col].notna()].rename(
            columns={col: "r", ctrl: "c"}
        )
    else:
        lens = store.tables["lens"]
        lens = lens[(lens.modality == "speech") & lens.word_index.notna() & lens[col].notna()]
        if agg == "any":
            per_word = lens.groupby(keys).agg(r=(col, "min"), c=(ctrl, "min")).reset_index()
        else:
            last = lens.sort_values("position").groupby(keys).tail(1)
            per_word = last.rename(columns={col: "r", ctrl: "c"})
    per_word = per_word.assign(hit=per_word.r < k, ctrl_hit=per_word.c < k)
    out = per_word.groupby(["run_id", "layer"]).agg(
        n_words=("hit", "size"), recall=("hit", "mean"), control_recall=("ctrl_hit", "mean")
    )
    return out.reset_index()


@pytest.mark.parametrize("agg", metrics.AGGREGATIONS)
@pytest.mark.parametrize("target", metrics.TARGETS)
@pytest.mark.parametrize("rank", metrics.RANKS)
def test_recall_matches_pandas(store, con, agg, target, rank):
    got = metrics.recall_by_layer(con, K, agg, target, rank)
    want = pandas_recall(store, K, agg, target, rank)
    merged = got.merge(want, on=["run_id", "layer"], suffixes=("", "_pd"), validate="1:1")
    assert len(merged) == len(want) == len(got) > 0
    assert (merged.n_words == merged.n_words_pd).all()
    np.testing.assert_allclose(merged.recall, merged.recall_pd)
    np.testing.assert_allclose(merged.control_recall, merged.control_recall_pd)
    np.testing.assert_allclose(got.rel_depth, got.layer / 4)


def test_peak_layer_and_relative_depth(con):
    recall = metrics.recall_by_layer(con, K)
    peaks = metrics.peak_layers(recall)
    for _, row in peaks.iterrows():
        curve = recall[recall.run_id == row.run_id]
        assert row.peak_recall == curve.recall.max()
        assert row.peak_layer == curve.loc[curve.recall.idxmax(), "layer"]
        assert row.peak_rel_depth == row.peak_layer / 4


def test_modality_mass_matches_pandas(store, con):
    got = metrics.modality_mass(con)
    lens = store.tables["lens"]
    lens = lens[lens.modality == "speech"].copy()
    vocab = store.tables["vocab"].set_index(["run_id", "token_id"]).modality
    lens["top1_mod"] = [
        vocab[(r, ids[0])] for r, ids in zip(lens.run_id, lens.topk_ids, strict=True)
    ]
    want = (
        lens.assign(
            speech=np.exp(lens.speech_logmass),
            text=np.exp(lens.text_logmass),
            top1_speech=lens.top1_mod == "speech",
        )
        .groupby(["run_id", "layer"])
        .agg(speech=("speech", "mean"), text=("text", "mean"), top1=("top1_speech", "mean"))
        .reset_index()
    )
    merged = got.merge(want, on=["run_id", "layer"], validate="1:1")
    np.testing.assert_allclose(merged.speech_mass, merged.speech, rtol=1e-6)
    np.testing.assert_allclose(merged.text_mass, merged.text, rtol=1e-6)
    np.testing.assert_allclose(merged.top1_speech_frac, merged.top1)
    np.testing.assert_allclose(merged.speech_mass + merged.text_mass, 1, rtol=1e-5)


def test_prediction_depth_matches_pandas(store, con):
    got = metrics.prediction_depth(con).set_index("run_id")
    lens = store.tables["lens"]
    lens = lens[lens.modality == "speech"].assign(top1=lambda d: d.topk_ids.str[0])
    depths = {}
    for (run, _utt, _pos), grp in lens.groupby(["run_id", "utterance_id", "position"]):
        grp = grp.sort_values("layer")
        final = grp.top1.iloc[-1]
        differ = grp.layer[grp.top1 != final]
        depths.setdefault(run, []).append(int(differ.max()) + 1 if len(differ) else 0)
    for run, values in depths.items():
        assert got.loc[run, "mean_depth"] == pytest.approx(np.mean(values))
        assert got.loc[run, "median_depth"] == pytest.approx(np.median(values))


def test_knowledge_accuracy_and_correlation_match_numpy(store, con):
    utts = store.tables["utterances"]
    lens = store.tables["lens"]
    final = lens[lens.layer == 4]
    scores = {}
    for _, u in utts[utts.pair_id.notna()].iterrows():
        rows = final[
            (final.run_id == u.run_id)
            & (final.utterance_id == u.utterance_id)
            & (final.position >= u.continuation_start - 1)
            & (final.position < u.n_tokens - 1)
        ]
        scores[(u.run_id, u.pair_id, u.pair_role)] = rows.next_token_logprob.sum()
    acc = {}
    for (run, pair, role), value in scores.items():
        if role == "correct":
            acc.setdefault(run, []).append(value > scores[(run, pair, "counterfactual")])
    got = metrics.knowledge_accuracy(con).set_index("run_id")
    for run, hits in acc.items():
        assert got.loc[run, "accuracy"] == pytest.approx(np.mean(hits))
        assert got.loc[run, "n_pairs"] == len(hits)

    table, stats = metrics.knowledge_correlation(con, K)
    x, y = table.accuracy.to_numpy(), table.peak_recall.to_numpy()
    assert stats["pearson"] == pytest.approx(pd.Series(x).corr(pd.Series(y)))
    # Spearman's rho is Pearson's r of the (tie-averaged) ranks.
    assert stats["spearman"] == pytest.approx(pd.Series(x).rank().corr(pd.Series(y).rank()))


def test_filters_select_runs_models_and_checkpoints(con):
    one = metrics.recall_by_layer(con, K, filters=Filters(revisions=["ckpt01"]))
    assert set(one.run_id) == {"run-1"}
    assert metrics.recall_by_layer(con, K, filters=Filters(models=["other"])).empty
    two = metrics.recall_by_layer(con, K, filters=Filters(runs=["run-0", "run-2"]))
    assert set(two.run_id) == {"run-0", "run-2"}


def test_sql_is_printable_and_runs_as_is(con):
    sql = metrics.recall_sql(K, "last", "next", "full")
    assert sql.lstrip().startswith("WITH") and "next_word_rank" in sql
    assert len(query(con, sql).df()) > 0


def test_bad_metric_parameters(con):
    with pytest.raises(MetricError, match="aggregation"):
        metrics.recall_by_layer(con, K, agg="mean")
    with pytest.raises(MetricError, match="k must"):
        metrics.recall_by_layer(con, 0)


def test_runs_view_shows_the_latest_status(con):
    runs = con.sql("SELECT run_id, status, revision FROM runs ORDER BY run_id").df()
    assert list(runs.status) == ["finished"] * 3
    history = con.sql("SELECT count(*) FROM runs_history").fetchone()[0]
    assert history == 6


def test_store_partition_pruning_by_run(store):
    con = open_store(store.uri, runs=["run-2"])
    assert con.sql("SELECT DISTINCT run_id FROM lens").fetchall() == [("run-2",)]
    with pytest.raises(UnknownRunError, match="run-9"):
        open_store(store.uri, runs=["run-9"])


def test_writes_are_refused_and_nothing_changes(store, con, tmp_path):
    before = sorted(p.name for p in (tmp_path.parent).iterdir())
    for sql in (
        f"COPY (SELECT 1) TO '{tmp_path}/x.csv'",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO lens SELECT * FROM lens",
        f"ATTACH '{tmp_path}/x.db'",
        "SET enable_external_access = true",
    ):
        with pytest.raises(ReadOnlyQueryError):
            query(con, sql)
    # Even bypassing the check, the connection itself cannot touch files.
    with pytest.raises(duckdb.Error):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path}/y.csv'")
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    assert not list(tmp_path.iterdir())
    assert sorted(p.name for p in (tmp_path.parent).iterdir()) == before


def test_missing_store_and_newer_schema(tmp_path, store):
    with pytest.raises(StoreNotFoundError, match="no slm-lens store"):
        open_store(str(tmp_path / "nowhere"))
    newer = tmp_path / "newer"
    build_store(str(newer), n_runs=1, n_utts=2)
    (newer / "_slm_lens_store.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StoreVersionError, match="version 99"):
        open_store(str(newer))


def test_files_read_back_identically_with_pyarrow_duckdb_and_fastparquet(store, con):
    import fastparquet

    from analysis.index import read_commits
    from analysis.storage import resolve

    fs, root = resolve(store.uri)
    files = [f"{root}/{f}" for c in read_commits(fs, root) for f in c.files.get("lens", [])]
    cols = ["utterance_id", "position", "layer", "cur_word_text_rank", "speech_logmass"]
    by_arrow = pads.dataset(files, format="parquet").to_table(columns=cols).to_pandas()
    by_duck = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet({files!r})").df()
    by_fp = fastparquet.ParquetFile(files).to_pandas(columns=cols)
    key = ["utterance_id", "position", "layer"]
    frames = [f.sort_values(key).reset_index(drop=True) for f in (by_arrow, by_duck, by_fp)]
    for frame in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], frame, check_dtype=False)
    assert len(frames[0]) == con.sql("SELECT count(*) FROM lens").fetchone()[0]


@pytest.mark.slow
def test_same_answers_from_s3(store, s3_env, tmp_path):
    s3_store = build_store(f"s3://{s3_env}/stores/a")
    local = metrics.recall_table(open_store(store.uri), K)
    remote = metrics.recall_table(open_store(s3_store.uri), K)
    pd.testing.assert_frame_equal(local, remote)
    s3 = open_store(s3_store.uri)
    assert metrics.knowledge_accuracy(s3).equals(metrics.knowledge_accuracy(open_store(store.uri)))


READS = [
    "SELECT count(*) FROM lens",
    "WITH x AS (SELECT layer FROM lens) SELECT max(layer) FROM x",
    "EXPLAIN SELECT * FROM lens",
    "EXPLAIN ANALYZE SELECT count(*) FROM lens",
    "explain analyze select 1",
    "SELECT 1; SELECT 2",
]
WRITES = [
    "DROP VIEW lens",
    "CREATE OR REPLACE VIEW failures AS SELECT 1",
    "INSERT INTO lens SELECT * FROM lens",
    "UPDATE lens SET layer = 0",
    "DELETE FROM lens",
    "CREATE TABLE t AS SELECT 1",
    "ALTER VIEW lens RENAME TO x",
    "SET threads = 1",
    "PRAGMA threads = 1",
    "CALL pragma_version()",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CHECKPOINT",
    "DETACH memory",
    "EXPLAIN ANALYZE DROP VIEW lens",
    "EXPLAIN ANALYZE CREATE OR REPLACE VIEW failures AS SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO lens SELECT * FROM lens",
    "EXPLAIN (FORMAT json) DROP VIEW lens",
    "EXPLAIN ANALYZE   \n  DROP VIEW lens",
    "SELECT 1; DROP VIEW lens",
]


@pytest.mark.parametrize("sql", READS)
def test_every_read_is_allowed(con, sql):
    query(con, sql).fetchall()


@pytest.mark.parametrize("sql", WRITES)
def test_every_write_is_refused_and_the_views_survive(store, sql):
    con = open_store(store.uri)
    views = con.sql("SELECT count(*) FROM lens").fetchone()
    with pytest.raises((ReadOnlyQueryError, StoreError)):
        query(con, sql)
    assert con.sql("SELECT count(*) FROM lens").fetchone() == views
    assert con.sql("SELECT count(*) FROM failures").fetchone()[0] >= 0


def test_the_readme_python_and_sql_run_as_written(store):
    """README: `analysis.open_store(uri)` and its recall@k query, against a real store."""
    import re
    from pathlib import Path

    import analysis

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (sql,) = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    con = analysis.open_store(store.uri)
    rows = analysis.query(con, sql).fetchall()
    assert rows and all(0.0 <= r[1] <= 1.0 and 0.0 <= r[2] <= 1.0 for r in rows)
    assert sorted(analysis.__all__) == ["metrics", "open_store", "query"]


# Bootstrap intervals ---------------------------------------------------------------------
def _pandas_counts(store, k: int) -> pd.DataFrame:
    """Per run, utterance and layer: words and hits of current-word ``any`` text recall."""
    lens = store.tables["lens"]
    lens = lens[(lens.modality == "speech") & lens.word_index.notna()]
    lens = lens[lens.cur_word_text_rank.notna()]
    keys = ["run_id", "utterance_id", "word_index", "layer"]
    per_word = lens.groupby(keys).agg(r=("cur_word_text_rank", "min")).reset_index()
    per_word["hit"] = per_word.r < k
    return (
        per_word.groupby(["run_id", "utterance_id", "layer"])
        .agg(n_words=("hit", "size"), hits=("hit", "sum"))
        .reset_index()
    )


def test_recall_intervals_resample_utterances_as_pandas_counts_them(store, con):
    from analysis.uncertainty import bootstrap_ratios, percentile_interval, run_rng

    recall, peaks = metrics.recall_with_ci(con, K, n_boot=400, seed=7)
    plain = metrics.recall_by_layer(con, K)
    np.testing.assert_array_equal(recall.recall, plain.recall)  # the point estimate stays
    assert (recall.recall_lo <= recall.recall).all() and (recall.recall <= recall.recall_hi).all()
    counts = _pandas_counts(store, K)
    for run_id, df in counts.groupby("run_id"):
        n = df.pivot(index="utterance_id", columns="layer", values="n_words").fillna(0)
        hits = df.pivot(index="utterance_id", columns="layer", values="hits").fillna(0)
        reps = bootstrap_ratios([(hits.to_numpy(), n.to_numpy())], 400, run_rng(7, run_id))
        lo, hi = percentile_interval(reps, 0.95)
        mine = recall[recall.run_id == run_id].sort_values("layer")
        np.testing.assert_array_equal(mine.recall_lo, lo[0])
        np.testing.assert_array_equal(mine.recall_hi, hi[0])
    row = peaks.iloc[0]
    assert row.peak_layer_lo <= row.peak_layer <= row.peak_layer_hi
    # The ratio's interval comes from the same draws as recall's and control's.
    counts = con.sql(metrics.recall_counts_sql(K)).df()
    one = counts[counts.run_id == "run-1"]
    grid = {
        c: one.pivot_table(index="utterance_id", columns="layer", values=c, fill_value=0)
        for c in ("n_words", "hits", "n_ctrl", "ctrl_hits")
    }
    pairs = [
        (grid["hits"].to_numpy(), grid["n_words"].to_numpy()),
        (grid["ctrl_hits"].to_numpy(), grid["n_ctrl"].to_numpy()),
    ]
    reps = bootstrap_ratios(pairs, 400, run_rng(7, "run-1"))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(reps[:, 1] > 0, reps[:, 0] / reps[:, 1], np.nan)
    lo, hi = percentile_interval(ratio, 0.95)
    mine = recall[recall.run_id == "run-1"].sort_values("layer")
    np.testing.assert_array_equal(mine.ratio_lo, lo)
    np.testing.assert_array_equal(mine.ratio_hi, hi)
    # Seeded per run: one run's interval is the same whatever else is in the query.
    alone, _ = metrics.recall_with_ci(con, K, filters=Filters(runs=("run-1",)), n_boot=400, seed=7)
    both = recall[recall.run_id == "run-1"].reset_index(drop=True)
    np.testing.assert_array_equal(alone.recall_lo, both.recall_lo)


def test_a_bootstrap_interval_has_the_width_sampling_theory_gives():
    """400 one-word utterances, 120 hits: the 95% interval is about p +- 1.96 sqrt(p(1-p)/n)."""
    from analysis.uncertainty import bootstrap_ratios, percentile_interval, run_rng

    hits = np.zeros((400, 1))
    hits[:120] = 1
    reps = bootstrap_ratios([(hits, np.ones((400, 1)))], 4000, run_rng(0, "r"))
    lo, hi = percentile_interval(reps, 0.95)
    normal = 2 * 1.96 * np.sqrt(0.3 * 0.7 / 400)  # 0.0898
    # The normal approximation is good at n p (1 - p) = 84; 4,000 replicates put the
    # percentile bounds within ~1.5% of theirs; the grid of hits/400 adds 0.0025 per bound.
    assert abs((hi[0, 0] - lo[0, 0]) - normal) < 0.1 * normal
    always = bootstrap_ratios([(np.ones((5, 2)), np.ones((5, 2)))], 50, run_rng(0, "r"))
    assert percentile_interval(always, 0.95)[0].tolist() == [[1.0, 1.0]]


def test_metrics_cli_prints_intervals(store, capsys):
    from extractor.cli import main

    assert (
        main(["metrics", "--store", store.uri, "--k", "3", "--ci", "0.9", "--bootstrap", "200"])
        == 0
    )
    out = capsys.readouterr().out
    assert "recall_lo" in out and "peak_layer_hi" in out and "90% percentile bootstrap" in out
    with pytest.raises(SystemExit):
        main(["metrics", "--store", store.uri, "--ci", "95"])


def _checkpoints_split_across_runs(store) -> duckdb.DuckDBPyConnection:
    """Every checkpoint's recall in one run and its knowledge pairs in another, plus a
    unit-only model (no text tokens) with a knowledge run and an aligned run."""
    t = store.tables
    runs = pd.DataFrame(store.runs)[["run_id", "model", "revision", "n_layers", "dataset"]]
    runs = runs.assign(config="{}")  # the runs view's columns the metrics read
    lens, utts, vocab = t["lens"], t["utterances"], t["vocab"]
    aligned = {r: f"{r}-aligned" for r in runs.run_id}
    facts = {r: f"{r}-facts" for r in runs.run_id}
    new_runs = pd.concat(
        [
            runs.assign(run_id=runs.run_id.map(aligned)),
            runs.assign(run_id=runs.run_id.map(facts)),
            pd.DataFrame(
                [
                    {
                        "run_id": r,
                        "model": "unit-lm",
                        "revision": "main",
                        "n_layers": 4,
                        "dataset": "synthetic",
                        "config": "{}",
                    }
                    for r in ("unit-aligned", "unit-facts")
                ]
            ),
        ]
    )
    no_text = lens[lens.run_id == "run-0"].assign(cur_word_text_rank=None)
    new_lens = pd.concat(
        [
            lens.assign(run_id=lens.run_id.map(aligned)),
            # Knowledge items are spoken words too: these runs have recall of their own,
            # which must not leak into the checkpoint's (it comes from the aligned runs).
            lens.assign(
                run_id=lens.run_id.map(facts), cur_word_text_rank=0, ctrl_word_text_rank=99
            ),
            no_text.assign(run_id="unit-aligned"),
            lens[lens.run_id == "run-0"].assign(run_id="unit-facts", cur_word_text_rank=0),
        ]
    )
    new_utts = pd.concat(
        [
            utts.assign(run_id=utts.run_id.map(aligned), pair_id=None),
            utts.assign(run_id=utts.run_id.map(facts)),
            utts[utts.run_id == "run-0"].assign(run_id="unit-facts"),
        ]
    )
    speech_only = vocab[vocab.run_id == "run-0"].assign(modality="speech")
    new_vocab = pd.concat(
        [
            vocab.assign(run_id=vocab.run_id.map(aligned)),
            vocab.assign(run_id=vocab.run_id.map(facts)),
            speech_only.assign(run_id="unit-aligned"),
            speech_only.assign(run_id="unit-facts"),
        ]
    )
    con = duckdb.connect()
    for name, df in (
        ("runs", new_runs),
        ("lens", new_lens),
        ("utterances", new_utts),
        ("vocab", new_vocab),
        ("failures", _no_failures()),
    ):
        con.register(name, df)
    return con


def _no_failures() -> pd.DataFrame:
    """The ``failures`` view's columns that the metrics read, without a row."""
    return pd.DataFrame({"run_id": pd.Series(dtype=str), "utterance_id": pd.Series(dtype=str)})


def test_knowledge_meets_transcription_by_checkpoint_across_runs(store, con):
    want, want_stats = metrics.knowledge_correlation(con, K)
    table, stats = metrics.knowledge_correlation(_checkpoints_split_across_runs(store), K)
    toy = table[table.model == "toy-slm"].reset_index(drop=True)
    np.testing.assert_array_equal(toy.accuracy, want.accuracy)
    np.testing.assert_array_equal(toy.peak_recall, want.peak_recall)
    assert list(toy.knowledge_runs) == [f"run-{r}-facts" for r in range(3)]
    assert list(toy.recall_runs) == [f"run-{r}-aligned" for r in range(3)]
    unit = table[table.model == "unit-lm"].iloc[0]
    assert unit.note == "no text tokens" and np.isnan(unit.peak_recall) and unit.accuracy >= 0
    assert stats["n_checkpoints"] == want_stats["n_checkpoints"] == 3
    for key in ("pearson", "spearman", "pearson_p", "spearman_p", "pearson_lo", "spearman_hi"):
        assert stats[key] == want_stats[key] or (np.isnan(stats[key]) and np.isnan(want_stats[key]))
    # Three points: the permutation test enumerates all 6 orders, so p is a multiple of 1/6.
    assert stats["pearson_p"] * 6 == pytest.approx(round(stats["pearson_p"] * 6))


def test_an_item_with_several_counterfactuals_needs_to_beat_them_all():
    con = duckdb.connect()
    con.register(
        "runs",
        pd.DataFrame(
            [
                {
                    "run_id": "r",
                    "model": "m",
                    "revision": "x",
                    "n_layers": 1,
                    "dataset": "d",
                    "config": "{}",
                }
            ]
        ),
    )
    members = [  # item a: correct beats both; item b: loses to its second; item c: no correct
        ("a", "correct", -1.0),
        ("a", "counterfactual", -2.0),
        ("a", "counterfactual", -3.0),
        ("b", "correct", -1.0),
        ("b", "counterfactual", -2.0),
        ("b", "counterfactual", -0.5),
        ("c", "counterfactual", -0.5),
        ("d", "correct", -1.0),  # item d: its counterfactual was never scored
        ("d", "counterfactual", None),
    ]
    con.register(
        "utterances",
        pd.DataFrame(
            [
                {
                    "run_id": "r",
                    "utterance_id": f"u{i}",
                    "pair_id": p,
                    "pair_role": role,
                    "n_tokens": 3,
                    "continuation_start": 2,
                }
                for i, (p, role, _) in enumerate(members)
            ]
        ),
    )
    con.register(
        "lens",
        pd.DataFrame(
            [
                {
                    "run_id": "r",
                    "utterance_id": f"u{i}",
                    "layer": 1,
                    "position": 1,
                    "next_token_logprob": lp,
                }
                for i, (_, _, lp) in enumerate(members)
                if lp is not None
            ]
        ),
    )
    con.register("failures", _no_failures())
    got = metrics.knowledge_accuracy(con).iloc[0]
    assert (got.n_pairs, got.n_pairs_dropped, got.accuracy, got.note) == (2, 2, 0.5, "")
    assert got.n_failed_utterances == 0
    assert str(metrics.knowledge_accuracy(con).n_pairs.dtype) == "int64"
    # A failed member leaves no utterances row and no pair_id: the run says how many
    # failed, and that an item may then be scored without one of its counterfactuals.
    failed = [{"run_id": "r", "utterance_id": u} for u in ("u9", "u9", "u10", None)]
    con.register("failures", pd.DataFrame(failed))  # None: a shard's record naming no id
    got = metrics.knowledge_accuracy(con).iloc[0]
    assert (got.n_pairs, got.accuracy, got.n_failed_utterances) == (2, 0.5, 3)
    assert got.note == f"3 {metrics.FAILED_NOTE}"
    # A run decoded by a foreign head says why its items are not scored.
    foreign = {
        "run_id": "r",
        "model": "m",
        "revision": "x",
        "n_layers": 1,
        "dataset": "d",
        "config": '{"lens": {"head": "qwen", "head_revision": "abc123"}}',
    }
    con.register("runs", pd.DataFrame([foreign]))
    want = f"{metrics.FOREIGN_HEAD_NOTE}; 3 {metrics.FAILED_NOTE}"
    assert metrics.knowledge_accuracy(con).iloc[0].note == want
    con.register("failures", _no_failures())
    assert metrics.knowledge_accuracy(con).iloc[0].note == metrics.FOREIGN_HEAD_NOTE


def test_layer_summary_and_runs_overview_are_the_metrics_they_name(con):
    one = Filters(runs=("run-1",))
    table = metrics.layer_summary(con, one)
    cur = metrics.recall_by_layer(con, 10, filters=one)
    np.testing.assert_array_equal(table.recall, cur.recall)
    pooled = metrics.recall_by_layer(con, 1, agg="pooled", filters=one)
    np.testing.assert_array_equal(table.top1_pooled, pooled.recall)
    assert list(table.columns) == [
        "layer",
        "n_words",
        "recall",
        "control_recall",
        "next_recall",
        "top1_pooled",
        "top1_control",
        "speech_mass",
        "top1_speech_frac",
    ]
    runs = metrics.runs_overview(con)
    assert list(runs.run_id) == ["run-0", "run-1", "run-2"] and (runs.shards == 2).all()


def test_recall_over_seeds_is_the_mean_and_spread_of_each_seeds_curve(tmp_path, capsys):
    from analysis.metrics import recall_over_seeds, seed_family
    from extractor.cli import main

    assert seed_family("organism-interleaved-s1-630steps") == ("organism-interleaved-630steps", 1)
    assert seed_family("sims_seed-12") == ("sims", 12) and seed_family("qwen2.5") == (
        "qwen2.5",
        None,
    )
    assert seed_family("s3-model") == ("s3-model", None)  # a name that starts so is no seed
    uri = str(tmp_path / "seeds")
    models = ["toy-s0", "toy-s1", "toy-s2", "other", "toy"]
    build_store(uri, n_runs=5, models=models)
    con = open_store(uri)
    recall = metrics.recall_by_layer(con, 3)
    table = recall_over_seeds(con, 3)
    toy = table[table["family"] == "toy"].set_index("layer")
    for layer, group in recall[recall["model"].str.startswith("toy-")].groupby("layer"):
        assert toy.loc[layer, "n_seeds"] == 3 and toy.loc[layer, "seeds"] == [0, 1, 2]
        assert toy.loc[layer, "recall_mean"] == pytest.approx(group["recall"].mean())
        assert toy.loc[layer, "recall_sd"] == pytest.approx(group["recall"].std())
        assert toy.loc[layer, "recall_max"] == group["recall"].max()
    assert set(table.loc[table["family"] == "other (no seed)", "n_seeds"]) == {1}
    assert set(table.loc[table["family"] == "toy (no seed)", "n_seeds"]) == {1}  # not merged

    assert main(["metrics", "--store", uri, "--k", "3", "--over-seeds", "--format", "csv"]) == 0
    assert "toy" in capsys.readouterr().out
    for twice in (["toy-s0", "toy-s0"], ["toy", "toy"]):  # two checkpoints: not two seeds
        store = str(tmp_path / "-".join(twice))
        build_store(store, n_runs=2, models=twice)
        assert main(["metrics", "--store", store, "--over-seeds"]) == 2
        assert "several runs share a model, dataset, head and seed" in capsys.readouterr().err
