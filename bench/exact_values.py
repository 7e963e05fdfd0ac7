"""Exact lens values on the CPU: the compiled C loop against torch's ops, same run.

Both compute :func:`extractor.lens.exact.entry_logits`' float64 dot products, bit for bit
(checked here on every measured call's output). Entries are random (row, column) pairs,
sorted by row as the lens asks them; h and W are random in the model's dtype. Prints
microseconds an entry (best of ``--repeats``) and the ratio torch / C.

    python bench/exact_values.py                     # SmolLM2 (d = 576) and Qwen2.5 (896)
    python bench/exact_values.py --entries 50000 --threads 1
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from extractor.lens import cpu_exact
from extractor.lens.exact import entry_dots_torch

SHAPES = {"smollm2": (576, 49_152), "qwen2.5": (896, 152_167)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def best_us(fn, entries: int, repeats: int) -> float:
    fn()  # warm-up (and, the first time, the C build)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / entries * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=512, help="rows of h (a CPU row chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"exact values, {args.entries} entries, {torch.get_num_threads()} threads")
    print("| shape | dtype | torch us/entry | C loop us/entry | torch / C |")
    print("| --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        d, v = SHAPES[shape]
        for name in args.dtypes:
            dtype = DTYPES[name]
            w = torch.randn(v, d, generator=gen).to(dtype)
            h = torch.randn(args.rows, d, generator=gen).to(dtype)
            rows = torch.randint(0, args.rows, (args.entries,), generator=gen).sort().values
            cols = torch.randint(0, v, (args.entries,), generator=gen)
            same = torch.equal(
                cpu_exact.entry_dots(h, w, rows, cols), entry_dots_torch(h, w, rows, cols)
            )
            if not same:
                raise SystemExit(f"{shape} {name}: the C loop and torch disagree")
            operands = (h, w, rows, cols)
            torch_us = best_us(partial(entry_dots_torch, *operands), args.entries, args.repeats)
            c_us = best_us(partial(cpu_exact.entry_dots, *operands), args.entries, args.repeats)
            print(f"| {shape} | {name} | {torch_us:.3f} | {c_us:.3f} | {torch_us / c_us:.2f} |")


if __name__ == "__main__":
    main()
