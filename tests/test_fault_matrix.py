"""Crash a real extraction at every step of a shard's life, resume it, compare with a clean run.

Each crash is a real process exit (``os._exit``: no cleanup runs) at a named
point, some leaving torn files behind. The resumed run must end with views
equal to a clean run's, row for row, and after ``gc`` a plain glob of the
store's files must equal the views.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from analysis.store import open_store
from extractor.config import parse_config
from extractor.service.driver import run_extraction
from extractor.store.faults import (
    CRASH_ENV,
    CRASH_EXIT_CODE,
    RUN_CRASH_POINTS,
    SHARD_CRASH_POINTS,
)
from extractor.store.gc import collect_garbage

from .service_helpers import assert_files_equal_views, assert_same_store, small_config, snapshot

pytestmark = pytest.mark.slow

#: Shard 2 of 3: one committed before it, one still to come.
CRASHES = [(p, 2) for p in SHARD_CRASH_POINTS] + [(p, -1) for p in RUN_CRASH_POINTS]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("matrix-data")
    store = str(tmp_path_factory.mktemp("matrix-clean") / "store")
    raw = small_config(store, data_dir, shard_size=2)
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok and summary.shards_total == 3
    return raw, summary.run_id, snapshot(store, summary.run_id)


@pytest.mark.parametrize(("point", "shard"), CRASHES, ids=[p for p, _ in CRASHES])
def test_a_crash_then_a_resume_equals_a_clean_run(clean, tmp_path, point, shard):
    raw, run_id, reference = clean
    store = tmp_path / "store"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**raw, "store": str(store)}))
    flag = tmp_path / "crashed"
    crashed = subprocess.run(
        [sys.executable, "-m", "extractor.cli", "extract", str(config), "--in-process"],
        env={**os.environ, CRASH_ENV: f"{point}:{shard}:{flag}"},
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == CRASH_EXIT_CODE and flag.exists(), crashed.stderr[-3000:]

    summary = run_extraction(
        parse_config({**raw, "store": str(store)}), progress=False, in_process=True
    )
    assert summary.ok and summary.run_id == run_id
    assert_same_store(snapshot(str(store), run_id), reference)
    assert open_store(str(store)).sql("SELECT status FROM runs").fetchone()[0] == "finished"

    collect_garbage(str(store), delete=True, min_age_s=0)
    assert collect_garbage(str(store), min_age_s=0).garbage == []
    assert_same_store(snapshot(str(store), run_id), reference)
    assert_files_equal_views(store)
