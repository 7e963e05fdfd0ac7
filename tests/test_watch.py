"""The checkpoint watcher against a real `ray start --head` cluster."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from analysis.store import open_store
from extractor.config import load_config
from extractor.demo import build_demo_model
from extractor.service.environment import SECRETS, forwarded_env
from extractor.watch import Watcher, checkpoint_complete, list_checkpoints, submission_id

from .ray_helpers import ray_head, wait_for_jobs
from .service_helpers import small_config

pytestmark = pytest.mark.slow


def _checkpoint(dst, seed: int):
    """A copy of the tiny SIMS demo model with its weights nudged: a new checkpoint."""
    src = build_demo_model(tiny=True)
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    weights = {
        k: v + 0.01 * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in weights.items()
    }
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    _checkpoint(ckpts / "step-100", 1)
    _checkpoint(ckpts / "step-200", 2)
    partial = _checkpoint(root / "step-300-full", 3)
    shutil.copytree(partial, ckpts / "step-300")
    data = (partial / "model.safetensors").read_bytes()
    (ckpts / "step-300" / "model.safetensors").write_bytes(data[: len(data) // 2])
    store = str(root / "store")
    raw = small_config(store, root / "data")
    raw["shard_size"] = 5
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return root, ckpts, config, store


def test_completeness_checks(setup):
    _root, ckpts, _, _ = setup
    assert [c.name for c in list_checkpoints(str(ckpts))] == ["step-100", "step-200", "step-300"]
    assert checkpoint_complete(str(ckpts / "step-100"))[0]
    ok, why = checkpoint_complete(str(ckpts / "step-300"))
    assert not ok and "still being written" in why


def test_watch_submits_each_new_checkpoint_once(setup):
    root, ckpts, config, store = setup
    cfg = load_config(config)
    with ray_head() as url:
        watcher = Watcher(str(ckpts), str(config), cfg, url, python=sys.executable, settle_s=0.1)
        first = watcher.once()
        assert len(first.submitted) == 2 and first.skipped_incomplete == [str(ckpts / "step-300")]
        # A duplicate trigger (a second watcher, right away) submits nothing.
        twin = Watcher(str(ckpts), str(config), cfg, url, python=sys.executable, settle_s=0.1)
        assert twin.once().submitted == []
        status = wait_for_jobs(url, [submission_id(r) for r in first.submitted])
        assert set(status.values()) == {"SUCCEEDED"}, status
        con = open_store(store)
        runs = dict(con.sql("SELECT run_id, status FROM runs").fetchall())
        assert {runs[r] for r in first.submitted} == {"finished"}
        assert watcher.once().submitted == []

        # The checkpoint finishes writing: now it is picked up, exactly once.
        shutil.copy(root / "step-300-full" / "model.safetensors", ckpts / "step-300")
        third = watcher.once()
        assert len(third.submitted) == 1
        wait_for_jobs(url, [submission_id(third.submitted[0])])
        revisions = (
            open_store(store)
            .sql("SELECT count(DISTINCT revision) FROM runs WHERE status = 'finished'")
            .fetchone()[0]
        )
        assert revisions == 3


def test_failing_job_is_reported_and_retried(setup, tmp_path):
    _root, _, config, store = setup
    bad = tmp_path / "ckpts"
    bad.mkdir()
    broken = _checkpoint(bad / "step-bad", 9)
    cfg_json = (broken / "config.json").read_text().replace('"llama"', '"no-such-arch"')
    (broken / "config.json").write_text(cfg_json)
    cfg = load_config(config)
    with ray_head() as url:
        watcher = Watcher(
            str(bad), str(config), cfg, url, python=sys.executable, max_retries=1, settle_s=0.1
        )
        (run_id,) = watcher.once().submitted
        assert wait_for_jobs(url, [submission_id(run_id)]) == {submission_id(run_id): "FAILED"}
        second = watcher.once()
        assert second.retried == [run_id] and second.submitted == [run_id]
        wait_for_jobs(url, [submission_id(run_id, 1)])
        third = watcher.once()
        assert third.submitted == [] and third.failed_jobs == [run_id]
        status, message = (
            open_store(store, runs=[run_id]).sql("SELECT status, message FROM runs").fetchone()
        )
        assert status == "job_failed" and "FAILED" in message


def test_watch_an_s3_prefix(setup, s3_env, monkeypatch):
    import pyarrow.fs as pafs

    from analysis.storage import s3_filesystem

    _root, ckpts, config, _ = setup
    fs = s3_filesystem()
    pafs.copy_files(str(ckpts / "step-100"), f"{s3_env}/ckpts/step-100", destination_filesystem=fs)
    store = f"s3://{s3_env}/store"
    cfg = load_config(config).with_store(store)
    with ray_head() as url:
        env = forwarded_env()
        assert not set(env) & set(SECRETS)
        watcher = Watcher(
            f"s3://{s3_env}/ckpts",
            str(config),
            cfg,
            url,
            python=sys.executable,
            env_vars=env,
            settle_s=0.1,
        )
        (run_id,) = watcher.once().submitted
        status = wait_for_jobs(url, [submission_id(run_id)])
        assert status == {submission_id(run_id): "SUCCEEDED"}
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(url).get_job_info(submission_id(run_id))
        shown = json.dumps(info.runtime_env or {}) + json.dumps(info.metadata or {})
        assert "AWS_SECRET_ACCESS_KEY" not in shown and "AWS_ACCESS_KEY_ID" not in shown
        assert open_store(store).sql("SELECT status FROM runs").fetchone()[0] == "finished"
        assert watcher.once().submitted == []


def test_credentials_never_travel_in_a_runtime_env():
    """The one list the driver (to actors) and the watcher (to jobs) forward from."""
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIA-x",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "tok",
        "HF_TOKEN": "hf_x",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
    }
    env = forwarded_env(environ, extra=("AWS_SECRET_ACCESS_KEY",))
    assert env == {
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
    }
