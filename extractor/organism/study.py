"""Train every organism variant over seeds, run the pipeline on each, write the results.

One command (``slm-lens organism study``) so the numbers in bench/README.md can be
reproduced: recall curves as CSV and PNG under the output folder, and a markdown
table of the mid-layer effect against its chance control.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .evaluate import evaluate
from .train import OrganismSpec, train_organism


def study(
    out: Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    n_sentences: int = 200,
    log=print,
    trained_only: bool = False,
) -> pd.DataFrame:
    """Train (unless cached) and evaluate every variant x seed; ``trained_only`` instead
    evaluates whatever models ``out/models`` already holds (to re-summarise a study)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [(v, s, steps) for v in variants for s in seeds]
    if trained_only:
        infos = [json.loads(p.read_text()) for p in (out / "models").glob("*/organism.json")]
        runs = sorted((i["variant"], i["seed"], i.get("steps", 0)) for i in infos)
    curves = []
    for variant, seed, budget in runs:
        name = f"organism-{variant}-s{seed}"
        model = out / "models" / f"{name}-{budget}steps"  # a new budget is a new model
        if trained_only:  # models of earlier versions were named without their budget
            model = next(p.parent for p in (out / "models").glob(f"{name}*/organism.json"))
        if not (model / "organism.json").is_file():
            spec = OrganismSpec(variant=variant, seed=seed, steps=budget)
            train_organism(model, spec, log=log)
        df = evaluate(model, out / "heldout", str(out / "store"), name, n_sentences)
        curves.append(df.assign(variant=variant, seed=seed))
        log(f"{name}: evaluated")
    table = pd.concat(curves, ignore_index=True)
    table.to_csv(out / "recall.csv", index=False)
    summary = summarize(table)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary))
    plot(table, out / "recall.png")
    return summary


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per variant, seed, k and aggregation: the middle layer where current-word recall
    peaks, against its chance control, and where next-word recall peaks."""
    rows = []
    keys = ["variant", "seed", "k", "agg"]
    for (variant, seed, k, agg), df in table.groupby(keys):
        cur = df[df.target == "cur"].sort_values("layer")
        nxt = df[df.target == "next"].sort_values("layer")
        n_layers = int(cur.layer.max())
        mid = cur[(cur.layer >= 1) & (cur.layer < n_layers)]
        best = mid.loc[mid.recall.idxmax()] if len(mid) else cur.iloc[0]
        nxt_peak = nxt.loc[nxt.recall.idxmax()]
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "k": k,
                "agg": agg,
                "peak_layer": int(best.layer),
                "cur_recall": best.recall,
                "control": best.control_recall,
                "ratio": best.recall / best.control_recall if best.control_recall else float("inf"),
                "next_peak_layer": int(nxt_peak.layer),
                "next_recall": nxt_peak.recall,
                "final_speech_mass": float(cur.speech_mass.iloc[-1]),
            }
        )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = table["agg"]  # not table.agg: that is DataFrame.agg
    table = table[((table.k == 10) & (agg == "any")) | ((table.k == 1) & (agg == "pooled"))]
    groups = list(table.groupby(["variant", "seed", "k", "agg"]))
    cols = 4
    rows_n = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    axes = [list(axes.flat)]
    for ax in axes[0][len(groups) :]:
        ax.axis("off")
    for ax, ((variant, seed, k, agg), df) in zip(axes[0], groups, strict=False):
        for target, style in (("cur", "-"), ("next", "--")):
            part = df[df.target == target].sort_values("layer")
            ax.plot(part.layer, part.recall, style, label=f"{target} word")
        ctrl = df[df.target == "cur"].sort_values("layer")
        ax.plot(ctrl.layer, ctrl.control_recall, ":", label="chance control")
        ax.set_title(f"{variant} s{seed}: recall@{k} ({agg})", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("recall (text rank)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
