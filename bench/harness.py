"""Timing and peak-memory helpers shared by the benchmarks.

Ratios, not absolute times, are what the benchmarks report: each compares
methods in the same process run, on the same (noisy) machine. Peak memory is
measured in a fresh subprocess per method, as the growth of the resident set
over what the inputs already took.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``repeats`` calls after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """Highest resident set seen while the block runs, sampled every ~0.5 ms.

    ``ru_maxrss`` is a high-water mark since process start, so input creation
    or compilation would mask the method's own peak; sampling does not.
    """

    def __enter__(self) -> PeakRss:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def run_worker(script: str, *args: str) -> dict:
    """Run ``script --worker args...`` in a fresh interpreter and parse its JSON line."""
    out = subprocess.run(
        [sys.executable, script, "--worker", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append(
            "  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True))
        )
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
