"""The C pass over a block of fast logits against its torch fallback, same run.

    python bench/cpu_pass.py              # best of 30 a case, 2 threads (torch's)

The fallback is what runs without a C compiler or with the pass turned off by the
self-check: torch's compiled pass (``chunked.chunk_stats``), a ``nonzero`` scan of its
in-band mask and ``block_topk``. Both give the same classification, maxima and top-k
values (tests/test_cpu_pass.py). Cases: the row scope of a whole-contract call (512 x
8,192 fp32 fast logits, 12 targets a row, 14 candidates), the pooled scope (64 rows, 4
targets), a rank-free call's bf16 block (no targets), rows that rise or fall along the
columns (whose top-k candidates overflow the pass's buffer again and again), and, at 64
candidates, a review's row built against a selection with a fixed pivot
(``tests/lens_checks.runs_against_a_fixed_pivot``). Prints milliseconds and
fallback / C.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import best_of
from extractor.lens import chunked, cpu_pass, exact
from tests.lens_checks import runs_against_a_fixed_pivot

KK = 14  # k = 10 and the engine's margin of 4


def _case(rows: int, targets: int, dtype: torch.dtype, slope: float = 0.0):
    gen = torch.Generator().manual_seed(0)
    if slope:
        values = (slope * torch.arange(8192.0)).repeat(rows, 1)
    else:
        values = torch.randn(rows, 8192, generator=gen) * 4
    centre = values[torch.arange(rows)[:, None], torch.randint(0, 8192, (rows, targets))]
    return values.to(dtype), centre - 5e-4, centre + 5e-4, KK  # a band of SmolLM2's width


def _pivot_case(rows: int, kk: int = 64):
    values = runs_against_a_fixed_pivot(8192, kk).repeat(rows, 1)
    return values, torch.zeros(rows, 0), torch.zeros(rows, 0), kk


def main() -> None:
    cpu_pass.LIBRARY.get()  # no compiler: say so, rather than time the fallback twice
    cases = {
        "row scope, 512 x 8,192, 12 targets": _case(512, 12, torch.float32),
        "pooled scope, 64 x 8,192, 4 targets": _case(64, 4, torch.float32),
        "rank-free bf16, 512 x 8,192": _case(512, 0, torch.bfloat16),
        "rising rows, 512 x 8,192": _case(512, 0, torch.float32, slope=1.0),
        "falling rows, 512 x 8,192": _case(512, 0, torch.float32, slope=-1.0),
        "runs against a fixed pivot, 512 x 8,192, kk = 64": _pivot_case(512),
    }
    print(f"the lens pass on a block, {torch.get_num_threads()} threads, best of 30")
    print("| case | C pass ms | torch fallback ms | fallback / C |")
    print("| --- | --- | --- | --- |")
    for name, (values, lo, hi, kk) in cases.items():
        c_ms = 1e3 * best_of(lambda: chunked._classify(values, lo, hi, True, kk), 30)  # noqa: B023
        exact.set_kernel_enabled(exact.C_PASS, False)
        try:
            torch_ms = 1e3 * best_of(lambda: chunked._classify(values, lo, hi, True, kk), 30)  # noqa: B023
        finally:
            exact.set_kernel_enabled(exact.C_PASS, True)
        print(f"| {name} | {c_ms:.2f} | {torch_ms:.2f} | {torch_ms / c_ms:.2f} |")


if __name__ == "__main__":
    main()
