"""The lens' fast-logit GEMMs on this CPU, one block each, same run (docs/lens.md, "Which GEMM").

Times each GEMM the torch engine can take for one [rows x d] @ [d x width] block, with
the copies, adds and packing it makes per chunk (``chunked.chunk_logits`` for ``ieee``,
``onednn`` and ``avx512-bf16``, ``chunked.low_precision_logits`` for ``model-dtype``),
best of ``--repeats`` after a warm-up, and prints each against ``ieee`` (torch's BLAS: MKL
on x86). Random rows and weights in the model's dtype, seed 0; each fp32-output GEMM is
checked against BLAS within the bands. The kernel's packing is timed once, beside.

    python bench/fast_gemm.py                          # SmolLM2's width, bf16/fp16/fp32
    python bench/fast_gemm.py --d 896 --width 8192 --dtypes bf16
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import best_of
from extractor.lens import chunked, cpu_gemm, exact
from extractor.lens.contract import LensInputs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="a CPU row chunk")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--width", type=int, default=8192, help="a CPU vocabulary chunk")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"one block: {args.rows} x {args.d} @ {args.d} x {args.width}, best of {args.repeats}")
    print("| dtype | GEMM | ms | ieee / this |")
    print("| --- | --- | --- | --- |")
    for name in args.dtypes:
        dtype = DTYPES[name]
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(args.rows, args.d, generator=gen).to(dtype)
        w = (torch.randn(args.width, args.d, generator=gen) / args.d**0.5).to(dtype)
        inputs = LensInputs(hidden=h, unembed=w, k=1)
        h32, scratch = h.float(), chunked.Scratch()
        scratch.keep_packed = True  # as in a call's row chunks: W is packed once a call
        block = partial(chunked.chunk_logits, h32, 0, args.width, inputs, scratch)
        runs = {chunked.IEEE: block}
        for gemm in chunked.gemm_choices(inputs):
            if gemm not in (chunked.IEEE, chunked.MODEL_DTYPE):
                runs[gemm] = partial(block, gemm=gemm)
        with chunked.ieee_fp32_matmul():
            # Each fp32-output GEMM within its band of the exact logits, so within the sum
            # of the two bands (at most twice IEEE's) of torch's BLAS.
            band = exact.error_band(
                h.double().norm(dim=1), float(w.double().norm(dim=1).max()), args.d, 0, None
            )
            ieee = runs[chunked.IEEE]().double()
            for gemm, run in runs.items():
                diff = (run().double() - ieee).abs()
                assert bool((diff <= 2 * band[:, None]).all()), f"{gemm} and BLAS disagree"
        if chunked.MODEL_DTYPE in chunked.gemm_choices(inputs):
            runs[chunked.MODEL_DTYPE] = partial(
                chunked.low_precision_logits, h, 0, args.width, inputs, scratch, need_max=False
            )
        with chunked.ieee_fp32_matmul():
            times = {gemm: best_of(run, args.repeats) * 1e3 for gemm, run in runs.items()}
        for gemm, ms in times.items():
            print(f"| {name} | {gemm} | {ms:.2f} | {times[chunked.IEEE] / ms:.2f} |")
        if chunked.AVX512_BF16 in runs:  # once a call per chunk, not per row chunk
            pack_ms = best_of(partial(cpu_gemm.pack, w), args.repeats) * 1e3
            print(f"| {name} | avx512-bf16 packing (once a call) | {pack_ms:.2f} | |")


if __name__ == "__main__":
    main()
