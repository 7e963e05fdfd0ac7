"""The watcher's decisions over a job's life, with Ray's job API played by a recorder.

The real-cluster behaviour is in test_watch.py; here every outcome Ray can
report (failed, stopped, lost, unreachable) is dealt on demand, including the
driver overwriting the run's status between passes, which once made the
watcher lose count of its retries.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from analysis import schema
from analysis.store import open_store
from extractor.config import load_config
from extractor.store import StoreWriter
from extractor.store.submissions import SubmissionLog
from extractor.watch import Watcher, submission_id

from .service_helpers import small_config
from .test_watch import _checkpoint


class RecordedJobs:
    """Ray's JobSubmissionClient as far as the watcher uses it; statuses set by the test."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.submitted: list[str] = []
        self.reachable = True

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env=None) -> str:
        if submission_id in self.status:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.status[submission_id] = "PENDING"
        self.submitted.append(submission_id)
        return submission_id

    def get_job_info(self, sid: str):
        if not self.reachable:
            raise ConnectionError("Failed to connect to Ray at address: http://head:8265.")
        if sid not in self.status:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return SimpleNamespace(status=f"JobStatus.{self.status[sid]}", message="driver exited 1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch-retries")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    _checkpoint(ckpts / "step-100", 1)
    raw = small_config(str(root / "store"), root / "data")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return ckpts, config


@pytest.fixture
def watcher_for(setup, tmp_path):
    ckpts, config = setup
    cfg = load_config(config).with_store(str(tmp_path / "store"))

    def make(jobs: RecordedJobs, max_retries: int) -> Watcher:
        return Watcher(
            str(ckpts),
            str(config),
            cfg,
            "http://head:8265",
            client=jobs,
            max_retries=max_retries,
            settle_s=0.0,
        )

    return make


def _history(store: str, run_id: str) -> list[tuple[str, dict]]:
    rows = (
        open_store(store, runs=[run_id])
        .sql("SELECT status, message FROM runs_history ORDER BY updated_at")
        .fetchall()
    )
    return [(s, json.loads(m) if m else {}) for s, m in rows]


def test_retries_count_the_watchers_own_submissions_not_the_drivers_messages(watcher_for):
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=3)
    store = watcher.cfg.store
    for attempt in range(4):
        report = watcher.once()
        (run_id,) = report.submitted
        assert jobs.submitted[-1] == submission_id(run_id, attempt)
        # The driver runs and overwrites the run's status and message, then fails.
        driver = StoreWriter(store)
        driver.write_run(run_id, status="running")
        driver.write_run(run_id, status="failed", message=json.dumps({"error": "Boom"}))
        jobs.status[jobs.submitted[-1]] = "FAILED"
    final = watcher.once()
    assert final.submitted == [] and final.failed_jobs == [run_id]
    assert len(jobs.submitted) == 4  # 1 + max_retries, never an "already exists" loop
    status, info = _history(store, run_id)[-1]
    assert status == "job_failed" and info["gave_up"] and info["attempt"] == 3
    assert info["job_status"] == "FAILED"
    assert [s.attempt for s in SubmissionLog(watcher.store).read(run_id)] == [0, 1, 2, 3]
    again = watcher.once()
    assert again.submitted == [] and again.failed_jobs == [run_id]


@pytest.mark.parametrize("fate", ["FAILED", "STOPPED", "lost"])
def test_a_run_whose_driver_died_silently_gets_what_ray_says(watcher_for, fate):
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    store = watcher.cfg.store
    (run_id,) = watcher.once().submitted
    StoreWriter(store).write_run(run_id, status="running")  # then SIGKILL: nothing more
    sid = submission_id(run_id)
    if fate == "lost":
        del jobs.status[sid]  # the Ray head restarted and forgot the job
    else:
        jobs.status[sid] = fate
    report = watcher.once()
    assert report.retried == [run_id] and report.submitted == [run_id]
    settled = [info for status, info in _history(store, run_id) if status == "failed"]
    assert settled and settled[-1]["submission_id"] == sid
    assert settled[-1]["job_status"] == ("UNKNOWN" if fate == "lost" else fate)


def test_a_job_submitted_but_not_logged_is_not_submitted_twice(watcher_for):
    """The watcher died between submit_job and its log: the next pass only logs it."""
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    first = watcher.once()
    (run_id,) = first.submitted
    log = SubmissionLog(watcher.store)
    watcher.store.fs.delete_file(watcher.store._path(schema.submission_path(run_id, 0)))
    assert log.read(run_id) == []
    jobs.status[submission_id(run_id)] = "RUNNING"
    report = watcher.once()
    assert report.submitted == [] and report.already_known == [run_id]
    assert [s.attempt for s in log.read(run_id)] == [0]
    assert jobs.submitted == [submission_id(run_id)]


def test_ray_unreachable_skips_the_pass_and_submits_nothing(watcher_for):
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    (run_id,) = watcher.once().submitted
    jobs.status[submission_id(run_id)] = "FAILED"
    jobs.reachable = False
    report = watcher.once()
    assert report.submitted == [] and report.retried == []
    jobs.reachable = True
    assert watcher.once().retried == [run_id]


def test_a_job_nobody_logged_and_whose_driver_died_is_still_settled(watcher_for):
    """Review finding: watcher died before logging, driver wrote running then died."""
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    (run_id,) = watcher.once().submitted
    watcher.store.fs.delete_file(watcher.store._path(schema.submission_path(run_id, 0)))
    StoreWriter(watcher.cfg.store).write_run(run_id, status="running")
    jobs.status[submission_id(run_id)] = "FAILED"
    report = watcher.once()
    assert report.retried == [run_id] and jobs.submitted[-1] == submission_id(run_id, 1)


def test_a_ray_5xx_skips_the_pass(watcher_for):
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    (run_id,) = watcher.once().submitted
    jobs.status[submission_id(run_id)] = "RUNNING"

    def busy(sid):
        raise RuntimeError("Request failed with status code 503: Service Unavailable.")

    jobs.get_job_info = busy
    report = watcher.once()  # no exception out of the pass, nothing submitted or settled
    assert report.submitted == [] and report.retried == [] and report.failed_jobs == []


def test_a_refused_submission_gives_up_at_once(watcher_for):
    jobs = RecordedJobs()

    def refuse(**kwargs):
        raise RuntimeError("Request failed with status code 400: runtime_env is invalid.")

    jobs.submit_job = refuse
    watcher = watcher_for(jobs, max_retries=3)
    report = watcher.once()
    (run_id,) = report.failed_jobs
    status, info = _history(watcher.cfg.store, run_id)[-1]
    assert status == "job_failed" and "400" in info["refused"]
    assert watcher.once().submitted == []


def test_submitted_never_hides_a_driver_that_already_finished(watcher_for):
    """Review finding: a fast driver's `finished` was overwritten by a later `submitted`."""
    jobs = RecordedJobs()
    watcher = watcher_for(jobs, max_retries=1)
    submit = jobs.submit_job

    def fast_driver(**kwargs):
        sid = submit(**kwargs)
        run_id = sid.removeprefix("slm-lens-")
        driver = StoreWriter(watcher.cfg.store)
        driver.write_run(run_id, status="running")
        driver.write_run(run_id, status="finished")
        return sid

    jobs.submit_job = fast_driver
    (run_id,) = watcher.once().submitted
    assert _history(watcher.cfg.store, run_id)[-1][0] == "finished"


def test_a_compacting_watcher_asks_each_job_to_compact(setup, tmp_path):
    ckpts, config = setup
    cfg = load_config(config).with_store(str(tmp_path / "store"))
    plain = Watcher(str(ckpts), str(config), cfg, "http://head:8265", client=RecordedJobs())
    compacting = Watcher(
        str(ckpts), str(config), cfg, "http://head:8265", client=RecordedJobs(), compact=True
    )
    ckpt = SimpleNamespace(uri=str(ckpts / "step-100"))
    assert not plain._entrypoint(ckpt).endswith("--compact")
    assert compacting._entrypoint(ckpt).endswith("--no-progress --compact")
