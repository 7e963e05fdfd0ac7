"""A real `ray start --head` cluster on loopback, for job-submission tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def ray_head(num_cpus: int = 2):
    """Yields the dashboard URL of a head node started with `ray start`; stops it after."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    dash = free_port()
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={free_port()}",
            f"--num-cpus={num_cpus}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
        ],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if start.returncode != 0:
        raise RuntimeError(f"ray start failed: {start.stderr[-2000:]}")
    url = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 60
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        subprocess.run(
            [ray_bin, "stop", "--force"], env=ray_env(), capture_output=True, timeout=120
        )


def wait_for_jobs(url: str, ids: list[str], timeout: float = 400) -> dict[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.time() + timeout
    while True:
        status = {i: str(client.get_job_status(i)).rsplit(".", 1)[-1] for i in ids}
        if all(s in ("SUCCEEDED", "FAILED", "STOPPED") for s in status.values()):
            return status
        if time.time() > deadline:
            raise TimeoutError(f"jobs still running: {status}")
        time.sleep(1)
