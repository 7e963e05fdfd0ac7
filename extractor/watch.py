"""Watch a folder of checkpoints and submit one Ray job per new, complete checkpoint.

Idempotent by construction: a checkpoint's run id comes from its content
fingerprint, the config and the dataset, and its Ray submission id from the run
id and the attempt, so a duplicate trigger, a second watcher or a re-run after a
crash finds the job already there and submits nothing.

The watcher keeps its own log of submissions (:mod:`extractor.store.submissions`);
the attempt count, retries and giving up come from that log, never from the
driver's status messages. A run whose driver died without a word (``running``
or ``submitted`` for ever) is settled by asking Ray what became of its job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shlex
import struct
import time
from dataclasses import dataclass, replace

import pyarrow.fs as pafs

from analysis.storage import read_text, resolve, with_retries
from extractor.service.environment import SECRETS

from .config import RunConfig
from .models.fingerprint import checkpoint_files
from .models.hub import branch_heads, is_hub_uri, parse_hub_uri

log = logging.getLogger("slm_lens.watch")

TERMINAL_BAD = ("FAILED", "STOPPED")
ACTIVE = ("PENDING", "RUNNING")
#: A submission id Ray has never heard of (its head restarted, or it was never sent).
UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Checkpoint:
    uri: str
    name: str


@dataclass
class WatchReport:
    submitted: list[str]
    skipped_incomplete: list[str]
    already_known: list[str]
    failed_jobs: list[str]
    retried: list[str]


def _join(root_uri: str, name: str) -> str:
    return root_uri.rstrip("/") + "/" + name


def list_checkpoints(source: str) -> list[Checkpoint]:
    """Sub-folders of ``source`` that hold a config.json (a local path or s3:// prefix).

    A Hub repository (``hf://org/name``) gives one checkpoint per branch, pinned
    to the commit at its head: a new commit on a branch is a new checkpoint.
    """
    if is_hub_uri(source):
        ref = parse_hub_uri(source)
        return [
            Checkpoint(ref.at(sha), f"{branch}@{sha[:8]}")
            for branch, sha in sorted(branch_heads(source).items())
        ]
    fs, root = resolve(source)
    infos = with_retries(
        lambda: fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True)),
        f"listing {source}",
    )
    out = []
    for info in sorted(infos, key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory:
            continue
        if fs.get_file_info(f"{info.path}/config.json").type == pafs.FileType.File:
            out.append(Checkpoint(_join(source, info.base_name), info.base_name))
    return out


def _safetensors_complete(fs: pafs.FileSystem, path: str, size: int) -> bool:
    """A safetensors file is complete when its size equals header + the data it declares."""
    if size < 8:
        return False
    with fs.open_input_file(path) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100 << 20:
            return False
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return size == 8 + header_len + max(ends, default=0)


def checkpoint_complete(uri: str, settle_s: float = 2.0) -> tuple[bool, str]:
    """(complete?, why not). All indexed weight files present and at their final sizes.

    Safetensors files are checked against their own headers; other files must
    keep the same size over ``settle_s`` seconds. A Hub commit is complete by
    construction.
    """
    if is_hub_uri(uri):
        return True, ""
    fs, root = resolve(uri)
    files = {i.base_name: i for i in checkpoint_files(uri)}
    index_name = next((n for n in files if n.endswith(".index.json")), None)
    if index_name:
        index = json.loads(read_text(fs, f"{root}/{index_name}"))
        wanted = sorted(set(index.get("weight_map", {}).values()))
    else:
        wanted = [n for n in files if n.endswith((".safetensors", ".bin"))]
    if not wanted:
        return False, "no weight files yet"
    missing = [n for n in wanted if n not in files]
    if missing:
        return False, f"weight files not there yet: {missing[:3]}"
    unverified = []
    for name in wanted:
        info = files[name]
        if name.endswith(".safetensors"):
            if not _safetensors_complete(fs, info.path, info.size):
                return False, f"{name} is still being written"
        else:
            unverified.append(info)
    if unverified:
        time.sleep(settle_s)
        for info in unverified:
            if fs.get_file_info(info.path).size != info.size:
                return False, f"{info.base_name} is still growing"
    return True, ""


class SubmissionRefused(RuntimeError):
    """Ray refused a job submission with a 4xx: resubmitting cannot help."""


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status in a JobSubmissionClient error ("Request failed with status code N")."""
    match = re.search(r"status code (\d{3})", str(exc))
    return int(match.group(1)) if match else None


def submission_id(run_id: str, attempt: int = 0) -> str:
    return f"slm-lens-{run_id}" + (f"-retry{attempt}" if attempt else "")


class Watcher:
    """One pass (``once``) or a loop over a checkpoint source."""

    def __init__(
        self,
        source: str,
        config_path: str,
        cfg: RunConfig,
        address: str,
        *,
        max_retries: int = 1,
        settle_s: float = 2.0,
        env_vars: dict[str, str] | None = None,
        python: str | None = None,
        client=None,
        compact: bool = False,
    ) -> None:
        from ray.job_submission import JobSubmissionClient

        from .store import StoreWriter
        from .store.submissions import SubmissionLog

        self.source = source
        self.config_path = config_path
        self.cfg = cfg
        self.address = address
        self.max_retries = max_retries
        self.settle_s = settle_s
        # Never credentials in a job submission (Ray shows runtime_env in plain text).
        self.env_vars = {k: v for k, v in (env_vars or {}).items() if k not in SECRETS}
        self.python = python
        self.compact = compact
        self.client = client or with_retries(
            lambda: JobSubmissionClient(address), f"connecting to Ray at {address}", attempts=5
        )
        self.store = StoreWriter(cfg.store)
        self.submissions = SubmissionLog(self.store)

    def _entrypoint(self, ckpt: Checkpoint) -> str:
        exe = f"{shlex.quote(self.python)} -m extractor.cli" if self.python else "slm-lens"
        return (
            f"{exe} extract {shlex.quote(self.config_path)} --model {shlex.quote(ckpt.uri)} "
            f"--store {shlex.quote(self.cfg.store)} --no-progress"
            + (" --compact" if self.compact else "")
        )

    def _known_runs(self) -> dict[str, dict]:
        from analysis.store import StoreNotFoundError, open_store

        try:
            con = open_store(self.cfg.store)
        except StoreNotFoundError:
            return {}
        rows = con.sql("SELECT run_id, status, message FROM runs").fetchall()
        return {r: {"status": s, "message": m} for r, s, m in rows}

    def _record(
        self, run_id: str, ckpt: Checkpoint, revision: str, status: str, info: dict, **extra
    ):
        self.store.write_run(
            run_id,
            model=self.cfg.model.name or ckpt.name,
            revision=revision,
            dataset=self.cfg.dataset.name or self.cfg.dataset.manifest,
            k=self.cfg.lens.k,
            config=replace(self.cfg, model=replace(self.cfg.model, path=ckpt.uri)).to_dict(),
            status=status,
            message=json.dumps({"checkpoint": ckpt.uri, **info}),
            **extra,
        )

    def _submit_job(self, sid: str, ckpt: Checkpoint) -> bool:
        """Submit once; False when the submission id already exists (someone did it)."""

        def go() -> bool:
            try:
                self.client.submit_job(
                    entrypoint=self._entrypoint(ckpt),
                    submission_id=sid,
                    runtime_env={"env_vars": self.env_vars} if self.env_vars else None,
                )
                return True
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return False
                code = _status_code(exc)
                if code is not None and 400 <= code < 500:
                    raise SubmissionRefused(str(exc)) from exc  # retrying cannot help
                raise ConnectionError(str(exc)) from exc  # transient: retried with backoff

        return with_retries(go, f"submitting job {sid}", attempts=5)

    def _job(self, sid: str) -> tuple[str, str]:
        """(Ray's status of the job, its message); ``UNKNOWN`` if Ray has no such job.

        A Ray that cannot be reached raises (the pass skips this checkpoint)
        rather than passing for a lost job.
        """
        try:
            info = self.client.get_job_info(sid)
        except RuntimeError as exc:
            code = _status_code(exc)
            if code == 404:
                return UNKNOWN, ""
            # Any other refusal (a 5xx, a proxy error) says nothing about the job.
            raise ConnectionError(f"Ray answered {code or '?'} about {sid}: {exc}") from exc
        return str(info.status).rsplit(".", 1)[-1], str(info.message or "")

    def once(self) -> WatchReport:
        from .service.plan import make_plan

        report = WatchReport([], [], [], [], [])
        known = self._known_runs()
        for ckpt in list_checkpoints(self.source):
            complete, why = checkpoint_complete(ckpt.uri, self.settle_s)
            if not complete:
                log.info("skip %s: %s", ckpt.uri, why)
                report.skipped_incomplete.append(ckpt.uri)
                continue
            plan = make_plan(replace(self.cfg, model=replace(self.cfg.model, path=ckpt.uri)))
            try:
                self._settle(ckpt, plan, known.get(plan.run_id, {}).get("status"), report)
            except (ConnectionError, OSError) as exc:
                log.warning("skip %s this pass: Ray or the store did not answer: %s", ckpt.uri, exc)
        return report

    def _settle(self, ckpt: Checkpoint, plan, status: str | None, report: WatchReport) -> None:
        """Decide one complete checkpoint: leave it, submit it, retry it or give up on it."""
        run_id = plan.run_id
        if status in ("finished", "job_failed"):
            (report.failed_jobs if status == "job_failed" else report.already_known).append(run_id)
            return
        history = self.submissions.read(run_id)
        if not history and self._job(submission_id(run_id))[0] != UNKNOWN:
            # Submitted by a watcher that died before logging it: adopt the job.
            self.submissions.add(run_id, 0, submission_id(run_id), ckpt.uri)
            history = self.submissions.read(run_id)
        if not history:
            if status == "running":  # started by hand, outside any watcher
                report.already_known.append(run_id)
                return
            self._submit(ckpt, plan, 0, report)
            return
        last = history[-1]
        ray_status, ray_message = self._job(last.submission_id)
        if ray_status in ACTIVE or ray_status == "SUCCEEDED":
            report.already_known.append(run_id)
            return
        # The job is over and did not succeed (or Ray lost it).
        report.failed_jobs.append(run_id)
        info = {"submission_id": last.submission_id, "attempt": last.attempt}
        info |= {"job_status": ray_status, "job_message": ray_message[:2000]}
        if status in ("running", "submitted", None):
            # The driver never recorded its end: say what Ray says, so no run wedges.
            self._record(run_id, ckpt, plan.revision, "failed", info)
        if len(history) > self.max_retries:
            self._record(run_id, ckpt, plan.revision, "job_failed", {**info, "gave_up": True})
            return
        report.retried.append(run_id)
        self._submit(ckpt, plan, len(history), report)

    def _submit(self, ckpt: Checkpoint, plan, attempt: int, report: WatchReport) -> None:
        run_id = plan.run_id
        sid = submission_id(run_id, attempt)
        stamp = dt.datetime.now(dt.UTC)  # before the job exists: its driver's records are later
        try:
            new = self._submit_job(sid, ckpt)
        except SubmissionRefused as exc:
            info = {"submission_id": sid, "attempt": attempt, "refused": str(exc)[:2000]}
            self._record(run_id, ckpt, plan.revision, "job_failed", info)
            report.failed_jobs.append(run_id)
            return
        # Logged after the job exists: a watcher that dies in between finds the job
        # already there next pass, and logs it then.
        self.submissions.add(run_id, attempt, sid, ckpt.uri)
        if not new:
            report.already_known.append(run_id)
            return
        info = {"submission_id": sid, "attempt": attempt}
        self._record(run_id, ckpt, plan.revision, "submitted", info, updated_at=stamp)
        report.submitted.append(run_id)
        log.info("submitted %s for %s", sid, ckpt.uri)

    def loop(self, every_s: float) -> None:
        while True:
            report = self.once()
            log.info("watch pass: %s", report)
            time.sleep(every_s)


def parse_interval(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)
