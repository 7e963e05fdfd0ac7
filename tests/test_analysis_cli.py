"""The analysis command line and the report, end to end on a synthetic store."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from extractor.cli import main

from .store_factory import build_store


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return build_store(str(tmp_path_factory.mktemp("cli-store"))).uri


def test_query_formats(store_uri, tmp_path, capsys):
    sql = "SELECT layer, count(*) AS n FROM lens GROUP BY layer ORDER BY layer"
    assert main(["query", "--store", store_uri, sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "layer,n" and len(lines) == 6
    assert main(["query", "--store", store_uri, sql, "--format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]
    out = tmp_path / "q.parquet"
    assert main(["query", "--store", store_uri, sql, "--format", "parquet", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 5


def test_query_reads_only_the_runs_its_filters_choose(store_uri, capsys):
    """--model-name and --revision choose runs for query as for the metrics (they were
    accepted and ignored: a review); --modality, which raw SQL decides, is refused."""
    sql = "SELECT DISTINCT run_id FROM lens ORDER BY run_id"
    assert main(["query", "--store", store_uri, sql, "--format", "csv"]) == 0
    every = capsys.readouterr().out.split()[1:]
    assert len(every) > 1
    revision = main(["query", "--store", store_uri, "SELECT revision FROM runs", "--format", "csv"])
    assert revision == 0
    first = capsys.readouterr().out.split()[1]
    assert main(["query", "--store", store_uri, sql, "--revision", first, "--format", "csv"]) == 0
    chosen = capsys.readouterr().out.split()[1:]
    assert len(chosen) == 1 and chosen[0] in every
    assert main(["query", "--store", store_uri, sql, "--model-name", "no-such-model"]) == 2
    assert "no run matches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", "--store", store_uri, sql, "--modality", "text"])


def test_query_refuses_writes(store_uri, capsys):
    assert main(["query", "--store", store_uri, "DROP VIEW lens"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_bad_store_is_a_clear_error(tmp_path, capsys):
    assert main(["query", "--store", str(tmp_path / "none"), "SELECT 1"]) == 2
    assert "no slm-lens store" in capsys.readouterr().err
    assert main(["metrics", "--store", str(tmp_path), "--run", "x"]) == 2


def test_metrics_and_sql(store_uri, capsys):
    assert main(["metrics", "--store", store_uri, "--k", "3", "--agg", "pooled"]) == 0
    out = capsys.readouterr().out
    assert "peak cur-word recall@3" in out and "run-2" in out
    assert main(["metrics", "--store", store_uri, "--show-sql", "--target", "next"]) == 0
    assert "next_word_text_rank" in capsys.readouterr().out


def test_runs_lists_checkpoints(store_uri, capsys):
    assert main(["runs", "--store", store_uri, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.count(",finished,") == 3 and "ckpt02" in out


def test_report_renders(store_uri, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--store", store_uri, "--out", str(out), "--k", "3"]) == 0
    page = (out / "index.html").read_text()
    referenced = set(re.findall(r"(?:src|href)='([^']+)'", page))
    referenced |= set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert referenced, "the report references its figures"
    for name in referenced:
        assert (out / name).is_file(), f"index.html references {name}, which was not written"
        assert "/" not in name and ":" not in name
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "recall_any_text.png",
        "recall_pooled_full.png",
        "modality_mass.png",
        "word_heatmap.png",
        "checkpoints.png",
    }
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
    assert "Spearman" in page and "run-1" in page


def test_metrics_says_pooled_equals_last_for_word_final_runs(tmp_path, capsys):
    uri = build_store(str(tmp_path / "wf"), n_runs=1, positions="word_final").uri
    assert main(["metrics", "--store", uri, "--agg", "pooled"]) == 0
    assert "pooled equals last" in capsys.readouterr().err
    assert main(["metrics", "--store", uri, "--agg", "any"]) == 0
    assert "pooled equals last" not in capsys.readouterr().err


def test_metrics_is_silent_about_it_otherwise(store_uri, capsys):
    assert main(["metrics", "--store", store_uri, "--agg", "pooled"]) == 0
    assert "pooled equals last" not in capsys.readouterr().err
