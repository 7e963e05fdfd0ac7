"""The watcher's own log of the Ray jobs it submitted, kept apart from the driver's records.

The driver overwrites a run's status and message as it goes; a watcher that
read its retry count from there lost count (and never gave up). Each
submission is one small record, ``_submissions/run_id=<id>/attempt-NNN.json``,
created exclusively, so two watchers cannot both claim one attempt.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass

from analysis import schema
from analysis.storage import list_files, read_text, with_retries

from .writer import StoreWriter


@dataclass(frozen=True)
class Submission:
    run_id: str
    attempt: int
    submission_id: str
    checkpoint: str
    submitted_at: str


class SubmissionLog:
    def __init__(self, store: StoreWriter) -> None:
        self.store = store

    def read(self, run_id: str) -> list[Submission]:
        """This run's submissions, oldest first (unreadable records are skipped)."""
        folder = self.store._path(f"{schema.SUBMISSIONS_DIR}/run_id={run_id}")
        infos = with_retries(lambda: list_files(self.store.fs, folder), f"listing {folder}")
        out = []
        for info in infos:
            if not info.base_name.endswith(".json") or info.base_name.startswith("."):
                continue
            try:
                out.append(Submission(**json.loads(read_text(self.store.fs, info.path))))
            except (ValueError, TypeError):
                continue
        return sorted(out, key=lambda s: s.attempt)

    def add(self, run_id: str, attempt: int, submission_id: str, checkpoint: str) -> bool:
        """Record a submission; False if this attempt was already recorded (by anyone)."""
        record = Submission(
            run_id, attempt, submission_id, checkpoint, str(dt.datetime.now(dt.UTC))
        )
        payload = json.dumps(asdict(record), sort_keys=True).encode()
        rel = schema.submission_path(run_id, attempt)
        return with_retries(
            lambda: self.store._put(rel, payload, exclusive=True), f"recording {submission_id}"
        )
