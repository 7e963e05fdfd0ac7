"""The extraction service end to end, on real local Ray clusters and a loopback S3."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from analysis.index import read_commits
from analysis.storage import resolve
from analysis.store import open_store
from extractor.config import parse_config
from extractor.service.driver import run_extraction
from extractor.store.faults import CRASH_ENV, CRASH_EXIT_CODE

from .ray_helpers import ray_env, ray_head
from .service_helpers import FlakyProxy, assert_same_store, small_config, snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("service-data")


@pytest.fixture(scope="module")
def clean(data_dir, tmp_path_factory):
    """The reference: the run in process, no faults."""
    store = str(tmp_path_factory.mktemp("clean") / "store")
    cfg = parse_config(small_config(store, data_dir))
    summary = run_extraction(cfg, in_process=True, progress=False)
    assert summary.ok and summary.shards_done == 5
    return summary.run_id, snapshot(store, summary.run_id), cfg


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _wait_for_commits(uri: str, n: int, timeout: float = 120) -> None:
    fs, root = resolve(uri)
    deadline = time.time() + timeout
    while len(read_commits(fs, root)) < n:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {n} commits after {timeout} s")
        time.sleep(0.2)


def test_ray_run_equals_in_process_and_reruns_are_idempotent(clean, data_dir, tmp_path, local_ray):
    run_id, reference, _ = clean
    store = str(tmp_path / "store")
    cfg = parse_config(small_config(store, data_dir, workers={"count": 2}))
    summary = run_extraction(cfg, progress=False)
    assert summary.run_id == run_id  # same inputs, same run id, whatever the store
    assert summary.ok and summary.shards_done == 5
    assert_same_store(snapshot(store, run_id), reference)
    again = run_extraction(cfg, progress=False)
    assert again.shards_done == 0 and again.shards_skipped == 5
    assert_same_store(snapshot(store, run_id), reference)
    con = open_store(store)
    assert con.sql("SELECT status FROM runs").fetchall() == [("finished",)]
    stats = con.sql("SELECT count(*), sum(lens_rows) FROM shards WHERE shard > 0").fetchone()
    assert stats == (5, len(reference["lens"]))


def test_actor_killed_mid_shard_is_retried(clean, data_dir, tmp_path, local_ray, monkeypatch):
    run_id, reference, _ = clean
    flag = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"mid_shard:3:{flag}")
    store = str(tmp_path / "store")
    summary = run_extraction(parse_config(small_config(store, data_dir)), progress=False)
    assert flag.exists(), "the worker really died mid-shard"
    assert summary.ok and summary.retries >= 1
    assert_same_store(snapshot(store, run_id), reference)


def test_multi_node_with_a_node_removed_mid_run(clean, data_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    run_id, reference, _ = clean
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        store = str(tmp_path / "store")
        cfg = parse_config(small_config(store, data_dir, workers={"count": 2, "cpus": 0.5}))
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(summary=run_extraction(cfg, progress=False))
        )
        thread.start()
        _wait_for_commits(store, 2)  # setup shard + one data shard
        cluster.remove_node(nodes[0])
        cluster.add_node(num_cpus=1)
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert result["summary"].ok
        assert_same_store(snapshot(store, run_id), reference)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_driver_killed_and_resubmitted(clean, data_dir, tmp_path):
    """The driver dies mid-run, as a killed process does (no cleanup, no ``finally``), then
    the same command is resubmitted. It dies at a step, inside its fourth shard: killing
    it from outside once three commits showed raced the driver, which finished all six
    shards first once the lens got faster (found by a fresh-clone run)."""
    run_id, reference, _ = clean
    store = str(tmp_path / "store")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(store, data_dir)))
    cmd = [
        sys.executable,
        "-m",
        "extractor.cli",
        "extract",
        str(config),
        "--in-process",
        "--no-progress",
    ]
    flag = tmp_path / "killed"
    env = {**os.environ, CRASH_ENV: f"mid_shard:3:{flag}"}
    driver = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert driver.returncode == CRASH_EXIT_CODE and flag.exists(), driver.stderr[-3000:]
    done = len(read_commits(*resolve(store)))
    assert done < 6, "the driver was killed before finishing"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert_same_store(snapshot(store, run_id), reference)


def test_same_rows_on_s3_through_an_outage(clean, data_dir, moto_endpoint, s3_env, monkeypatch):
    run_id, reference, _ = clean
    proxy = FlakyProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = f"s3://{s3_env}/stores/run"
    cfg = parse_config(small_config(store, data_dir))
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(summary=run_extraction(cfg, in_process=True, progress=False))
    )
    thread.start()
    _wait_for_commits(store, 2)
    proxy.outage()
    time.sleep(4)
    proxy.restore()
    thread.join(timeout=300)
    assert result["summary"].ok
    assert_same_store(snapshot(store, run_id), reference)


def test_concurrent_reader_never_sees_a_half_written_shard(data_dir, tmp_path):
    store = str(tmp_path / "store")
    cfg = parse_config(small_config(store, data_dir))
    thread = threading.Thread(target=lambda: run_extraction(cfg, in_process=True, progress=False))
    thread.start()
    checks = 0
    while thread.is_alive() or checks == 0:
        fs, root = resolve(store)
        if not read_commits(fs, root):
            time.sleep(0.05)
            continue
        con = open_store(store)
        lens_rows = con.sql("SELECT count(*) FROM lens").fetchone()[0]
        promised = con.sql("SELECT coalesce(sum(lens_rows), 0) FROM shards").fetchone()[0]
        utts = {r[0] for r in con.sql("SELECT utterance_id FROM utterances").fetchall()}
        lens_utts = {r[0] for r in con.sql("SELECT DISTINCT utterance_id FROM lens").fetchall()}
        # What a reader sees is exactly the committed shards, each one whole.
        assert lens_rows == promised
        assert lens_utts <= utts
        checks += 1
    thread.join()
    assert checks >= 1


def test_bad_items_land_in_failures_and_the_rest_completes(clean, data_dir, tmp_path):
    import json

    import numpy as np
    import soundfile as sf

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "corrupt.wav").write_bytes(b"RIFF....not audio")
    sf.write(bad_dir / "short.wav", np.zeros(8000, np.float32), 16000)
    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["audio"] = str(data_dir / row["audio"])
    rows += [
        {
            "id": "corrupt",
            "audio": str(bad_dir / "corrupt.wav"),
            "text": "a",
            "words": [["a", 0, 0.1]],
        },
        {
            "id": "late-word",
            "audio": str(bad_dir / "short.wav"),
            "text": "a",
            "words": [["a", 0.2, 2.5]],
        },
        {
            "id": "too-long",
            "text": "long",
            "words": [["long", 0.0, 100.0]],
            "units": [i % 500 for i in range(2500)],
            "durations": [1] * 2500,
        },
    ]
    manifest = bad_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    store = str(tmp_path / "store")
    raw = small_config(store, data_dir, dataset={"manifest": str(manifest), "name": "bad"})
    raw["prompt"] = {"mode": "speech"}
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert not summary.ok and summary.failures == 4
    con = open_store(store)
    failures = dict(con.sql("SELECT utterance_id, error FROM failures").fetchall())
    assert failures == {
        "corrupt": "AudioReadError",
        "late-word": "WordTimingError",
        "too-long": "SequenceTooLongError",
        "line9": "ManifestRowError",
    }
    done = {r[0] for r in con.sql("SELECT DISTINCT utterance_id FROM lens").fetchall()}
    assert len(done) == 5
    assert con.sql("SELECT status FROM runs").fetchone()[0] == "failed"


def test_a_hub_folder_of_parquet_parts_with_embedded_audio_gives_the_clean_run(
    clean, data_dir, tmp_path
):
    """The same utterances as Hub-layout Parquet parts (audio as HF datasets embeds it):
    planned from ids only, each shard reading its own rows, the same store row for row."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    want = clean[1]
    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        audio = data_dir / row["audio"]
        row["audio"] = {"bytes": audio.read_bytes(), "path": audio.name}
        row["words"] = json.dumps(row["words"]) if "words" in row else None
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    for k, part in enumerate((rows[:2], rows[2:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"test-{k:05d}-of-00002.parquet")
    store = str(tmp_path / "store")
    raw = small_config(store, data_dir, dataset={"manifest": str(tmp_path / "hub"), "name": "hub"})
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok and summary.shards_done == 5
    assert_same_store(want, snapshot(store, summary.run_id))


def test_audio_on_an_unreachable_store_is_retried_and_left_for_a_rerun(
    clean, data_dir, tmp_path, moto_endpoint, s3_env, monkeypatch
):
    """A transient read error is not a failure of the utterance: the shard stays open."""
    import json

    import analysis.storage as storage
    from analysis.storage import s3_filesystem

    _, reference, _ = clean
    monkeypatch.setattr(storage, "IO_ATTEMPTS", 2)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setenv("SLM_LENS_S3_RETRIES", "1")
    fs = s3_filesystem()
    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        with fs.open_output_stream(f"{s3_env}/audio/{row['id']}.wav") as f:
            f.write((data_dir / row["audio"]).read_bytes())
        row["audio"] = f"s3://{s3_env}/audio/{row['id']}.wav"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proxy = FlakyProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = str(tmp_path / "store")
    cfg = parse_config(small_config(store, data_dir, dataset={"manifest": str(manifest)}))

    proxy.outage()
    down = run_extraction(cfg, in_process=True, progress=False)
    assert not down.ok and len(down.shards_failed) == 5 and down.failures == 5
    con = open_store(store)
    assert con.sql("SELECT DISTINCT stage, error FROM failures").fetchall() == [
        ("shard", "StorageError")
    ]
    assert "reading audio of" in con.sql("SELECT any_value(message) FROM failures").fetchone()[0]
    assert con.sql("SELECT count(*) FROM shards WHERE shard > 0").fetchone()[0] == 0

    proxy.restore()
    up = run_extraction(cfg, in_process=True, progress=False)
    assert up.ok and up.shards_done == 5
    assert_same_store(snapshot(store, up.run_id), reference)


def test_ray_job_submit(clean, data_dir, tmp_path):
    run_id, reference, _ = clean
    with ray_head() as url:
        store = str(tmp_path / "store")
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(small_config(store, data_dir)))
        submit = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--address",
                url,
                "--",
                sys.executable,
                "-m",
                "extractor.cli",
                "extract",
                str(config),
                "--no-progress",
            ],
            env=ray_env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        assert_same_store(snapshot(store, run_id), reference)


def test_extract_command_exit_codes(data_dir, tmp_path, capsys):
    from extractor.cli import main

    config = tmp_path / "run.yaml"
    raw = small_config(str(tmp_path / "store"), data_dir)
    raw["lens"]["k"] = 0
    config.write_text(yaml.safe_dump(raw))
    assert main(["extract", str(config), "--in-process", "--no-progress"]) == 2
    assert "lens.k" in capsys.readouterr().err

    manifest = tmp_path / "m.jsonl"
    good = (data_dir / "manifest.jsonl").read_text().splitlines()[0]
    import json

    row = json.loads(good)
    row["audio"] = str(data_dir / row["audio"])
    manifest.write_text(json.dumps(row) + "\n" + json.dumps({"id": "x", "text": ""}) + "\n")
    raw = small_config(str(tmp_path / "store"), data_dir, dataset={"manifest": str(manifest)})
    config.write_text(yaml.safe_dump(raw))
    assert main(["extract", str(config), "--in-process", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "failed items: 1" in out and "2 done" in out


def test_a_slamkit_unit_lm_checkpoint_runs_end_to_end(data_dir, tmp_path):
    """SIMS ships as slamkit's UnitLM: nested base_config, 'lm.' weights. It must just work."""
    import json

    from safetensors.torch import load_file, save_file

    from extractor.demo import build_demo_model

    src = build_demo_model(tiny=True)
    unit_lm = tmp_path / "sims-unitlm"
    unit_lm.mkdir()
    base = json.loads((src / "config.json").read_text())
    vocab_size = base.pop("vocab_size")
    for key in ("architectures", "dtype", "torch_dtype", "transformers_version"):
        base.pop(key, None)
    (unit_lm / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["UnitLM"],
                "model_type": "speech_language_model",
                "vocab_size": vocab_size,
                "base_config": base,
            }
        )
    )
    weights = {f"lm.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, unit_lm / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (unit_lm / name).write_bytes((src / name).read_bytes())
    store = str(tmp_path / "store")
    raw = small_config(store, data_dir, model={"path": str(unit_lm), "name": "sims-unitlm"})
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok and summary.lens_rows > 0
    con = open_store(store)
    assert con.sql("SELECT n_layers, vocab_size FROM runs").fetchone() == (2, vocab_size)


def test_an_engine_that_disagrees_is_replaced_before_it_stores_a_number(
    clean, data_dir, tmp_path, monkeypatch
):
    """A preferred engine that fails its self-check on this device never writes a row."""
    from extractor.service import worker

    _, reference, _ = clean
    honest = worker.LENS_ENGINES["torch"]

    def off_by_one(inputs):
        res = honest(inputs)
        res.target_ranks = torch.where(res.target_ranks >= 0, res.target_ranks + 1, -1)
        return res

    monkeypatch.setitem(worker.LENS_ENGINES, "triton", off_by_one)
    store = str(tmp_path / "store")
    cfg = parse_config(small_config(store, data_dir, lens={"engine": "triton"}))
    with pytest.warns(UserWarning, match="disagrees with the float64 reference"):
        summary = run_extraction(cfg, in_process=True, progress=False)
    assert summary.ok
    got = snapshot(store, summary.run_id)["lens"]
    assert sorted(got["cur_word_rank"].dropna()) == sorted(
        reference["lens"]["cur_word_rank"].dropna()
    )
    con = open_store(store)
    rows = con.sql("SELECT DISTINCT engine, self_check FROM shards WHERE shard > 0").fetchall()
    assert rows == [("torch", "failed")]
    clean_con = open_store(clean[2].store)
    assert clean_con.sql(
        "SELECT DISTINCT engine, self_check FROM shards WHERE shard > 0"
    ).fetchall() == [("torch", "passed")]


def test_a_driver_that_raises_still_ends_its_run(data_dir, tmp_path):
    """Issue 11, item 4: a model folder without a tokenizer used to leave 'running' for ever."""
    import shutil

    store = str(tmp_path / "store")
    raw = small_config(store, data_dir)
    broken = tmp_path / "model-without-tokenizer"
    shutil.copytree(raw["model"]["path"], broken)
    for f in broken.iterdir():
        keep = f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors"
        if not keep:
            f.unlink()
    raw["model"]["path"] = str(broken)
    with pytest.raises(Exception) as caught:
        run_extraction(parse_config(raw), in_process=True, progress=False)
    con = open_store(store)
    status, message = con.sql("SELECT status, message FROM runs").fetchone()
    assert status == "failed"
    assert type(caught.value).__name__ in message


def test_actors_that_cannot_start_fail_the_run_at_once(data_dir, tmp_path, local_ray):
    """Issue 11, item 6: not 'worker lost, retrying' max_retries times per shard."""
    import shutil

    from extractor.service.driver import WorkerStartError

    store = str(tmp_path / "store")
    raw = small_config(store, data_dir, workers={"max_retries": 5})
    broken = tmp_path / "model-with-cut-weights"
    shutil.copytree(raw["model"]["path"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the driver reads only config.json
    raw["model"]["path"] = str(broken)
    with pytest.raises(WorkerStartError, match="could not start"):
        run_extraction(parse_config(raw), progress=False)
    status, message = open_store(store).sql("SELECT status, message FROM runs").fetchone()
    assert status == "failed" and "WorkerStartError" in message


def test_a_local_store_not_shared_with_a_node_is_refused(
    data_dir, tmp_path, local_ray, monkeypatch
):
    """Issue 11, item 9: the probe the driver writes must be readable by every actor.

    One machine cannot have two disks, so the probe is removed as soon as the
    driver wrote it: to the actors it is as absent as on another node's disk.
    """
    from extractor.service import driver
    from extractor.service.driver import WorkerStartError
    from extractor.service.probe import remove_probe, write_probe

    def driver_only(uri, run_id):
        probe = write_probe(uri, run_id)
        remove_probe(probe)
        return probe

    monkeypatch.setattr(driver, "write_probe", driver_only)
    store = str(tmp_path / "store")
    with pytest.raises(WorkerStartError, match="does not share it with the driver"):
        run_extraction(parse_config(small_config(store, data_dir)), progress=False)
    assert not list((tmp_path / "store" / "_probe").rglob("*.token"))


def test_the_front_end_of_one_shard_runs_while_another_holds_the_model(clean, data_dir, tmp_path):
    """Two shards in flight: a shard's CPU stage overlaps another's model stage, the
    stores are the same, and every stage's time is in the shard telemetry."""
    store = str(tmp_path / "store")
    raw = small_config(store, data_dir, workers={"in_flight_per_worker": 2})
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok
    assert_same_store(clean[1], snapshot(store, summary.run_id))
    con = open_store(store, runs=[summary.run_id])
    stages = con.sql(
        "SELECT shard, (stats->>'frontend_started_at')::DOUBLE AS f0, "
        "(stats->>'frontend_started_at')::DOUBLE + (stats->>'frontend_seconds')::DOUBLE AS f1, "
        "(stats->>'model_started_at')::DOUBLE AS m0, (stats->>'model_finished_at')::DOUBLE AS m1, "
        "(stats->>'forward_seconds')::DOUBLE + (stats->>'lens_seconds')::DOUBLE AS model, "
        "(stats->>'rows_seconds')::DOUBLE AS rows FROM shards WHERE shard > 0 ORDER BY shard"
    ).df()
    assert len(stages) == 5 and (stages.model > 0).all() and (stages.rows > 0).all()
    overlaps = [
        (a.shard, b.shard)
        for a in stages.itertuples()
        for b in stages.itertuples()
        if a.shard != b.shard and a.f0 < b.m1 and b.m0 < a.f1
    ]
    assert overlaps, stages
    # One shard at a time per stage: model stages never overlap each other.
    ordered = stages.sort_values("m0")
    assert (ordered.m0.to_numpy()[1:] >= ordered.m1.to_numpy()[:-1]).all()
