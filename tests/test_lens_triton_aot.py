"""Compile the Triton kernels ahead of time for real GPU targets, on a CPU-only machine.

The interpreter (TRITON_INTERPRET=1, what CI runs) executes kernels as Python
and forgives what a real compile refuses (plain Python globals, for one).
Triton ships ``ptxas``, so CI compiles the lens kernel and the exact-values kernel
for sm_80 and sm_90, in every dtype, at the sizes the launchers really use on CUDA, with
and without the alignment the JIT specialises on (pipelined loads, or not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lens_kernels_compile_for_sm80_and_sm90_in_every_dtype():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 36, proc.stdout + proc.stderr[-3000:]
    assert all(line.startswith("ok sm_") for line in lines), proc.stdout
    assert all(" registers, " in line for line in lines), proc.stdout  # ptxas -v was read
