"""Ahead-of-time compile of the lens kernels for real GPU targets (run as a script).

Runs in its own process without TRITON_INTERPRET: the interpreter patches
Triton's builder globally, and a real compile must not see that.
Usage: python -m tests.triton_aot  (every target, dtype and alignment; one line each,
with the registers and spills ``ptxas`` reports)

Each kernel is built twice, as the JIT specialises it on a GPU: once with every pointer
16-byte aligned and ``D`` a multiple of 16 (fresh tensors at d = 576 or 896: what the
launchers pass), whose loads are vectorised and software-pipelined (async copies into
shared memory), and once with no such hint (an odd d), which is neither. Without the
hints the ahead-of-time build was only the second kind, which a GPU rarely runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from extractor.lens import triton_lens

POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_lens_kernel(
    arch: int, dtype: str, stage: str = "cubin", aligned: bool = True, **variant
):
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
    return _compile(kernel, signature, constexprs, arch, stage, aligned=aligned)


def compile_entry_kernel(arch: int, dtype: str, stage: str = "cubin", aligned: bool = True):
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
    options = {"enable_fp_fusion": False}
    return _compile(kernel, signature, constexprs, arch, stage, options, aligned=aligned)


#: Integer arguments the JIT finds divisible by 16 at the launchers' usual sizes.
ALIGNED_INTS = ("D", "stride_h", "stride_w")


def _compile(
    kernel,
    signature: dict,
    constexprs: dict,
    arch: int,
    stage: str,
    options=None,
    aligned: bool = True,
):
    """One kernel built for ``sm_<arch>``; its ``stage`` ("cubin", "ptx", "ttgir", ...).
    ``aligned``: the JIT's specialisation of 16-byte aligned pointers and of
    :data:`ALIGNED_INTS` divisible by 16 (the module's docstring says why)."""
    # ASTSource binds the signature by position: list it in the kernel's own order.
    ordered = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    if set(ordered) != set(signature) | set(constexprs):
        raise SystemExit(f"kernel arguments changed: {sorted(ordered)}")
    hinted = [
        i
        for i, name in enumerate(kernel.arg_names)
        if aligned and (ordered[name].startswith("*") or name in ALIGNED_INTS)
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = ASTSource(fn=kernel, signature=ordered, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options=options or {}).asm[stage]


def resources(ptx: str, arch: int, fp_fusion: bool = True) -> str:
    """What ``ptxas -v`` reports of a kernel (registers a thread, bytes spilled), run with
    the flags Triton's own build passes it (``make_cubin``: its register allocator's
    level among them, which changes the count)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        command = [
            get_ptxas(arch).path,
            "-lineinfo",
            *([] if fp_fusion else ["--fmad=false"]),
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        done = subprocess.run(
            [*command, src, "-o", f"{tmp}/kernel.cubin"], capture_output=True, text=True
        )
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spilled = re.search(r"(\d+) bytes spill stores", done.stderr)
    if done.returncode or not registers:
        return "ptxas -v said nothing of its registers"
    return f"{registers.group(1)} registers, {spilled.group(1) if spilled else 0} bytes spilled"


ARCHS = (80, 90)
KERNELS = {
    "lens": compile_lens_kernel,
    "lens-groups": lambda arch, dtype, **kw: compile_lens_kernel(
        arch, dtype, GROUP=triton_lens.CANDIDATE_GROUP, **kw
    ),
    "entry": compile_entry_kernel,
}
ALIGNMENTS = {"aligned": True, "unaligned": False}


if __name__ == "__main__":
    failed = 0
    for name, compile_kernel in KERNELS.items():
        for arch in ARCHS:
            for dtype in POINTER:
                for alignment, aligned in ALIGNMENTS.items():
                    label = f"sm_{arch} {dtype} {name} {alignment}"
                    try:
                        ptx = compile_kernel(arch, dtype, stage="ptx", aligned=aligned)
                        cubin = compile_kernel(arch, dtype, aligned=aligned)
                        used = resources(ptx, arch, fp_fusion=name != "entry")
                        print(f"ok {label}: {len(cubin)} bytes of cubin; {used}")
                    except Exception as exc:
                        failed += 1
                        print(f"FAILED {label}: {type(exc).__name__}: {exc}")
    sys.exit(1 if failed else 0)
