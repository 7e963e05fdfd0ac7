"""Ahead-of-time compile of the lens kernels for real GPU targets (run as a script).

Runs in its own process without TRITON_INTERPRET: the interpreter patches
Triton's builder globally, and a real compile must not see that.
Usage: python -m tests.triton_aot  (every target and dtype; one line each)
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from extractor.lens import triton_lens

POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_lens_kernel(arch: int, dtype: str, stage: str = "cubin", **variant):
    """The lens kernel at the CUDA block sizes; ``variant``: other constexprs (the
    default: candidate buffers, what ``triton_lens`` runs by default)."""
    kernel = triton_lens._lens_tiles_kernel
    signature = {
        "H": POINTER[dtype],
        "W": POINTER[dtype],
        "BIAS": "*fp32",
        "TGT_IDS": "*i64",
        "TGT_LO": "*fp32",
        "TGT_HI": "*fp32",
        "TILE_START": "*i32",
        "TILE_STOP": "*i32",
        "TILE_SEG": "*i32",
        "OUT_MAX": "*fp32",
        "OUT_SUM": "*fp32",
        "OUT_CV": "*fp32",
        "OUT_CI": "*i64",
        "OUT_CNT": "*i32",
        "OUT_GMAX": "*fp32",
        "AMB_COUNT": "*i32",
        "AMB_ROW": "*i32",
        "AMB_COL": "*i32",
        "AMB_VAL": "*fp32",
        "AMB_CAP": "i32",
        "N": "i32",
        "D": "i32",
        "n_tiles": "i32",
        "tiles_per_split": "i32",
        "softcap": "fp32",
        "zero": "fp32",
    }
    constexprs = {
        "T": 13,
        "TP": 16,
        "SP": 4,
        "KP": 16,
        "HAS_BIAS": True,
        "HAS_SOFTCAP": True,
        "DOT_PRECISION": "ieee",
        "GROUP": 0,
        **triton_lens.CUDA_BLOCKS,
        **variant,
    }
    return _compile(kernel, signature, constexprs, arch, stage)


def compile_entry_kernel(arch: int, dtype: str, stage: str = "cubin"):
    """The exact-values kernel (:mod:`extractor.lens.triton_exact`) at d = 576."""
    from extractor.lens import triton_exact

    kernel = triton_exact._entry_dots_kernel
    signature = {
        "H": POINTER[dtype],
        "W": POINTER[dtype],
        "ROWS": "*i64",
        "COLS": "*i64",
        "OUT": "*fp64",
        "E": "i32",
        "D": "i32",
        "stride_h": "i32",
        "stride_w": "i32",
    }
    dp = 1024
    constexprs = {
        "DP": dp,
        "LEVELS": 10,
        "BE": triton_exact.PROGRAM_PRODUCTS // dp,
    }
    return _compile(kernel, signature, constexprs, arch, stage, {"enable_fp_fusion": False})


def _compile(kernel, signature: dict, constexprs: dict, arch: int, stage: str, options=None):
    """One kernel built for ``sm_<arch>``; its ``stage`` ("cubin", "ptx", "ttgir", ...)."""
    # ASTSource binds the signature by position: list it in the kernel's own order.
    ordered = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    if set(ordered) != set(signature) | set(constexprs):
        raise SystemExit(f"kernel arguments changed: {sorted(ordered)}")
    src = ASTSource(fn=kernel, signature=ordered, constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options=options or {}).asm[stage]


ARCHS = (80, 90)
KERNELS = {
    "lens": compile_lens_kernel,
    "lens-groups": lambda arch, dtype: compile_lens_kernel(
        arch, dtype, GROUP=triton_lens.CANDIDATE_GROUP
    ),
    "entry": compile_entry_kernel,
}


if __name__ == "__main__":
    failed = 0
    for name, compile_kernel in KERNELS.items():
        for arch in ARCHS:
            for dtype in POINTER:
                try:
                    cubin = compile_kernel(arch, dtype)
                    print(f"ok sm_{arch} {dtype} {name}: {len(cubin)} bytes of cubin")
                except Exception as exc:
                    failed += 1
                    print(f"FAILED sm_{arch} {dtype} {name}: {type(exc).__name__}: {exc}")
    sys.exit(1 if failed else 0)
