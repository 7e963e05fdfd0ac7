"""Fault injection for tests: die, as a killed process would, at a named point of a shard's life.

``SLM_LENS_TEST_CRASH=POINT:SHARD:FLAGFILE`` makes the process exit (``os._exit``:
no cleanup, no ``finally``) when it reaches ``POINT`` while writing shard
``SHARD``, the first time only (``FLAGFILE`` records that it happened). Shard
``-1`` matches run-level points. Unset, every call is one dictionary lookup.
"""

from __future__ import annotations

import os
from collections.abc import Callable

CRASH_ENV = "SLM_LENS_TEST_CRASH"
CRASH_EXIT_CODE = 17

#: Every point a shard passes, in order, then the run-level ones.
SHARD_CRASH_POINTS = (
    "mid_shard",  # some data files written, more to come (worker)
    "mid_data_file",  # a data file torn: half its bytes under its temporary name
    "after_data_files",  # every data file written under its temporary name
    "mid_publish",  # one file moved to its final name, the others not
    "mid_marker",  # all files final, the marker torn (half written in place)
    "after_marker",  # committed; other attempts not yet cleaned up
)
RUN_CRASH_POINTS = ("runs_record_running", "runs_record_finished")


def crash_point(point: str, shard: int, before: Callable[[], object] | None = None) -> None:
    """Exit here if the environment asks for it; ``before`` leaves the torn state first."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, target, flag = spec.split(":", 2)
    if want == point and int(target) == shard and not os.path.exists(flag):
        if before is not None:
            before()
        with open(flag, "w") as f:
            f.write(str(os.getpid()))
        os._exit(CRASH_EXIT_CODE)
