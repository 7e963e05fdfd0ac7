"""Plots and one HTML report over a store: computation in metrics.py, drawing here.

Every figure is drawn from a tidy table that the metrics layer returns, so a
number in a plot is always one SQL query away.
"""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import metrics
from .metrics import ALL_RUNS, Filters

TARGET_STYLE = {"cur": ("current word", "-"), "next": ("next word", "--")}


def _finish_unit_plot(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Labels, a [0, 1] y-axis, the legend, and the PNG: what every curve plot ends with."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(recall: pd.DataFrame, path: Path, title: str) -> Path:
    """Recall curves on relative depth: current (solid), next (dashed), control (dotted)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, df) in enumerate(recall.groupby("run_id", sort=True)):
        color = f"C{i % 10}"
        for target, (label, style) in TARGET_STYLE.items():
            part = df[df.target == target].sort_values("rel_depth")
            if part.empty:
                continue
            ax.plot(part.rel_depth, part.recall, style, color=color, label=f"{run}: {label}")
            if "recall_lo" in part:  # the bootstrap interval, shaded
                ax.fill_between(
                    part.rel_depth, part.recall_lo, part.recall_hi, color=color, alpha=0.15, lw=0
                )
        ctrl = df[df.target == "cur"].sort_values("rel_depth")
        ax.plot(ctrl.rel_depth, ctrl.control_recall, ":", color=color, label=f"{run}: control")
    _finish_unit_plot(fig, ax, path, title, "relative depth (layer / n_layers)", "recall")
    return path


def plot_modality_mass(mass: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, df) in enumerate(mass.groupby("run_id", sort=True)):
        df = df.sort_values("rel_depth")
        ax.plot(df.rel_depth, df.speech_mass, "-", color=f"C{i % 10}", label=f"{run}: speech mass")
        ax.plot(df.rel_depth, df.text_mass, "--", color=f"C{i % 10}", label=f"{run}: text mass")
        ax.plot(
            df.rel_depth, df.top1_speech_frac, ":", color=f"C{i % 10}", label=f"{run}: top-1 speech"
        )
    _finish_unit_plot(
        fig,
        ax,
        path,
        "Lens probability mass at speech positions",
        "relative depth (layer / n_layers)",
        "mean probability / fraction",
    )
    return path


def word_layer_grid(
    con: duckdb.DuckDBPyConnection, run_id: str, utterance_id: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-1 text token and current-word text rank at each word's last position, per layer."""
    sql = """
    SELECT w.word_index, w.word, w.modality AS word_modality, l.layer,
           v.token AS top1_text, l.cur_word_text_rank AS rank
    FROM words w
    JOIN lens l ON l.run_id = w.run_id AND l.utterance_id = w.utterance_id
               AND l.position = w.last_position
    LEFT JOIN vocab v ON v.run_id = l.run_id AND v.token_id = l.text_topk_ids[1]
    WHERE w.run_id = ? AND w.utterance_id = ?
    ORDER BY w.word_index, l.layer
    """
    df = con.execute(sql, [run_id, utterance_id]).df()
    tokens = df.pivot(index="layer", columns="word_index", values="top1_text")
    ranks = df.pivot(index="layer", columns="word_index", values="rank")
    first = df.drop_duplicates("word_index").set_index("word_index")
    tag = {"speech": "spoken", "text": "text"}
    tokens.columns = ranks.columns = [
        f"{i}:{first.word[i]} ({tag.get(first.word_modality[i], first.word_modality[i])})"
        for i in tokens.columns
    ]
    return tokens, ranks


def plot_word_heatmap(tokens: pd.DataFrame, ranks: pd.DataFrame, path: Path, title: str) -> Path:
    """Word x layer grid: colour = log10(1 + text rank of the word), text = top-1 text token."""
    n_layers, n_words = tokens.shape
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * n_words + 1.5), max(3, 0.32 * n_layers + 1.2)))
    values = np.log10(1 + ranks.to_numpy(dtype=float))
    im = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis_r")
    for i in range(n_layers):
        for j in range(n_words):
            token = tokens.iat[i, j]
            if isinstance(token, str):
                ax.text(
                    j,
                    i,
                    token.strip()[:10],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if values[i, j] > np.nanmax(values) / 2 else "black",
                )
    ax.set_xticks(range(n_words), tokens.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n_layers), tokens.index, fontsize=6)
    ax.set_xlabel("word (last position)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10(1 + text rank of the word)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_checkpoint_series(summary: pd.DataFrame, path: Path) -> Path:
    """Peak recall (and knowledge accuracy) across each model's checkpoints, in run order."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (model, df) in enumerate(summary.groupby("model", sort=True)):
        df = df.sort_values("started_at")
        x = np.arange(len(df))
        ax.plot(x, df.peak_recall, "o-", color=f"C{i % 10}", label=f"{model}: peak recall")
        ax.plot(x, df.control_at_peak, "x:", color=f"C{i % 10}", label=f"{model}: control")
        if df.accuracy.notna().any():
            ax.plot(x, df.accuracy, "s--", color=f"C{i % 10}", label=f"{model}: knowledge acc.")
        ax.set_xticks(x, df.revision.fillna(df.run_id), rotation=30, ha="right", fontsize=7)
    _finish_unit_plot(fig, ax, path, "Metrics across checkpoints", "checkpoint (revision)", "")
    return path


def summary_table(
    con: duckdb.DuckDBPyConnection, k: int = 10, agg: str = "any", filters: Filters = ALL_RUNS
) -> pd.DataFrame:
    """One row per run: status, peak current-word recall, its layer/depth, knowledge accuracy."""
    runs = con.sql("SELECT run_id, model, revision, status, started_at FROM runs").df()
    peaks = metrics.peak_layers(metrics.recall_by_layer(con, k, agg, "cur", "text", filters))
    acc = metrics.knowledge_accuracy(con, filters)
    out = runs.merge(
        peaks.drop(columns=["model", "revision"], errors="ignore"), on="run_id", how="left"
    )
    out = out.merge(acc, on="run_id", how="left")
    if filters.runs is not None:
        out = out[out.run_id.isin(filters.runs)]
    for col in ("accuracy", "n_pairs", "peak_recall", "control_at_peak"):
        if col not in out:
            out[col] = np.nan
    return out.sort_values(["model", "started_at"]).reset_index(drop=True)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float):
                text = "" if np.isnan(value) else f"{value:.3f}"
            else:
                text = "" if value is None or value is pd.NaT else str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def build_report(
    con: duckdb.DuckDBPyConnection,
    out_dir: str | Path,
    *,
    k: int = 10,
    filters: Filters = ALL_RUNS,
    utterance: str | None = None,
    ci: float = 0.95,
    n_boot: int = 500,
    seed: int = 0,
) -> Path:
    """Write PNG plots and ``index.html`` (which references only those files) to ``out_dir``.

    Recall curves are shaded with their ``ci`` bootstrap interval (utterances
    resampled, ``n_boot`` replicates, ``seed``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    recall = metrics.recall_table(con, k, filters=filters, ci=ci, n_boot=n_boot, seed=seed)
    for rank in metrics.RANKS:
        for agg in metrics.AGGREGATIONS:
            part = recall[(recall["rank"] == rank) & (recall["agg"] == agg)]
            if part.empty:
                continue
            name = f"recall_{agg}_{rank}.png"
            title = f"recall@{k} ({agg} positions, {rank} rank)"
            plot_recall(part, out / name, title)
            figures.append((name, title))
    mass = metrics.modality_mass(con, filters)
    if not mass.empty:
        plot_modality_mass(mass, out / "modality_mass.png")
        figures.append(("modality_mass.png", "probability mass by modality"))
    summary = summary_table(con, k, filters=filters)
    if summary.peak_recall.notna().any():
        plot_checkpoint_series(summary, out / "checkpoints.png")
        figures.append(("checkpoints.png", "metrics across checkpoints"))
    if list(summary.run_id):
        figures += _word_heatmap(con, summary.run_id.iloc[0], utterance, out)
    summary.to_csv(out / "summary.csv", index=False)
    recall.to_csv(out / "recall.csv", index=False)
    intro = f"""<p>recall@{k}: current word (text rank, any position) at its peak layer; control
is the frequency-matched chance word. Shaded bands on recall curves: {ci:.0%} percentile
bootstrap intervals, utterances resampled ({n_boot} replicates, seed {seed}). Data:
<a href="summary.csv">summary.csv</a>, <a href="recall.csv">recall.csv</a>.</p>"""
    page = _page(intro, _html_table(summary), _correlation_note(con, k, filters), figures)
    index = out / "index.html"
    index.write_text(page)
    return index


def _word_heatmap(con, run_id: str, utterance: str | None, out: Path) -> list[tuple[str, str]]:
    """The word x layer heat map of ``utterance`` (default: the run's first spoken one)."""
    utt = (
        utterance
        or con.execute(
            "SELECT utterance_id FROM words WHERE run_id = ? AND modality = 'speech' "
            "ORDER BY utterance_id LIMIT 1",
            [run_id],
        ).fetchone()
    )
    utt = utt[0] if isinstance(utt, tuple) else utt
    if not utt:
        return []
    tokens, ranks = word_layer_grid(con, run_id, utt)
    if tokens.empty:
        return []
    title = f"{run_id} / {utt}: top-1 text token per word and layer"
    plot_word_heatmap(tokens, ranks, out / "word_heatmap.png", title)
    return [("word_heatmap.png", f"word x layer, {utt}")]


def _correlation_note(con, k: int, filters: Filters) -> str:
    _, stats = metrics.knowledge_correlation(con, k, filters=filters)
    if stats["n_checkpoints"] < 2:
        return ""
    pct = f"{stats['level']:.0%}"
    return (
        f"<p>Knowledge accuracy vs peak recall over {stats['n_checkpoints']} checkpoints "
        "(model and revision; recall and accuracy may come from different runs): "
        f"Pearson r = {stats['pearson']:.3f} (permutation p = {stats['pearson_p']:.3g}, "
        f"{pct} bootstrap interval [{stats['pearson_lo']:.2f}, {stats['pearson_hi']:.2f}]), "
        f"Spearman &rho; = {stats['spearman']:.3f} (p = {stats['spearman_p']:.3g}, "
        f"[{stats['spearman_lo']:.2f}, {stats['spearman_hi']:.2f}])</p>"
    )


def _page(intro: str, table: str, note: str, figures: list[tuple[str, str]]) -> str:
    body = "\n".join(
        f"<figure><img src='{html.escape(name)}' alt='{html.escape(title)}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for name, title in figures
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slm-lens report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}</style>
</head><body>
<h1>slm-lens report</h1>
{intro}
{table}
{note}
{body}
</body></html>
"""
