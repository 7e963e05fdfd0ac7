"""bf16 logits with fp32 output on CPUs with AVX-512 BF16, in a K-sliced IEEE order.

The exact engine's fast logits need an fp32 output (a bf16 output rounds away 8 bits and
puts ~25x more entries in band), and no GEMM torch exposes on a CPU takes bf16 operands to
an fp32 output (``torch.mm(..., out_dtype=)`` is CUDA-only; MKL's ``gemm_bf16bf16f32`` ran
at its fp32 speed on AMD EPYC). So the fp32 path paid for fp32 operands: 2.9x the bf16
GEMM's time. This kernel is that GEMM, written for the one instruction that does the work:
``VDPBF16PS`` multiplies pairs of bf16 values and adds both products to fp32 accumulators.

Its arithmetic is the fp32 path's, not an approximation of it. Intel's manual defines the
instruction as two fp32 accumulations, the odd element's product first, each rounded to
nearest even (products of bf16 values are exact in fp32), with subnormal inputs and
outputs flushed to zero. The kernel sums each :data:`SLICE`-wide slice of the hidden
width from zero in one such chain, then adds the slices in order in fp32: the error model
of the IEEE path (``chunked.chunk_logits``) with narrower slices, bounded by
:func:`~.exact.gemm_error_factor` (the flushes by :func:`~.exact.underflow_error`). The
tests check it bit for bit against torch ops doing the same additions in the same order.

The manual is a claim about Intel's CPUs. Before the kernel is used, a probe runs the
instruction on 320,000 random lanes of normal-range operands and compares each against
the manual's definition computed with scalar fp32 operations; on any difference the
kernel is not used on that CPU (AMD EPYC Zen 5: no difference). The self-check on real
rows (:mod:`.selfcheck`) stands behind both.

The weights are repacked once per call (0.65 ms an 8,192 x 576 chunk on one thread) into
the layout the instruction reads: for each block of 16 vocabulary entries, for each pair of hidden
dimensions, 16 dwords of bf16 pairs. The split over threads runs on torch's OpenMP team
where the library binds to it (:func:`.native.shares_torchs_team`), else Python threads.
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .native import KernelUnavailable

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_KERNEL 1
/* Only these functions use AVX-512: the library loads, and has_avx512_bf16 runs, on any
   x86-64 CPU. */
#define BF16 __attribute__((target("avx512f,avx512bf16")))
#else
#define HAVE_KERNEL 0
#endif

int has_avx512_bf16(void) {
#if HAVE_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* Pack blocks [jb0, jb1) of columns [0, c) into blocks of 16 columns: block jb, pair p
   holds 16 dwords, column jb*16+j's elements (2p, 2p+1) as (low, high) halves. Column col
   is row ids[col] of w ([*][d] bf16, row stride ldw), or row col when ids is NULL (the
   caller checks ids). Columns past c and the element past an odd d are zeros: their
   products are exact 0. The output is written in order, 16 rows read side by side (a
   column at a time wrote 64 bytes apart: 2.1 against 1.1 ms an 8,192 x 896 chunk). */
void pack_blocks(const uint16_t *w, int64_t ldw, const int64_t *ids, int64_t c, int64_t d,
                 uint32_t *wp, int64_t jb0, int64_t jb1) {
    int64_t d2 = (d + 1) / 2, full = d / 2, jb, p, j;
    for (jb = jb0; jb < jb1; jb++) {
        uint32_t *out = wp + jb * d2 * 16;
        int64_t cols = c - jb * 16 < 16 ? c - jb * 16 : 16;
        const uint16_t *rows[16];
        for (j = 0; j < 16; j++) {
            int64_t col = jb * 16 + (j < cols ? j : 0);
            rows[j] = w + (ids ? ids[col] : col) * ldw;
        }
        for (p = 0; p < full; p++)
            for (j = 0; j < 16; j++)
                out[p * 16 + j] = (uint32_t)rows[j][2 * p] | ((uint32_t)rows[j][2 * p + 1] << 16);
        if (d & 1)
            for (j = 0; j < 16; j++) out[full * 16 + j] = rows[j][d - 1];
        if (cols < 16)
            for (p = 0; p < d2; p++)
                for (j = cols; j < 16; j++) out[p * 16 + j] = 0;
    }
}

/* pack_blocks over every block, split over `threads` threads of the process's OpenMP team
   (torch's own): the first touch of a fresh copy's pages is shared out too. */
void pack_team(const uint16_t *w, int64_t ldw, const int64_t *ids, int64_t c, int64_t d,
               uint32_t *wp, int threads) {
    int64_t nb = (c + 15) / 16, jb;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (jb = 0; jb < nb; jb++) pack_blocks(w, ldw, ids, c, d, wp, jb, jb + 1);
    (void)threads;
}

#if HAVE_KERNEL
/* One tile: MR rows x NR blocks of 16 columns. Each slice of `slice` pairs is one chain of
   VDPBF16PS from zero; the slices are added to the output in order (the first stored). */
#define TILE(MR, NR)                                                                         \
BF16 static void tile_##MR##_##NR(const uint32_t *h, int64_t ldh, const uint32_t *wp,       \
                                  int64_t d2, float *out, int64_t ldo, int64_t slice,        \
                                  __mmask16 last) {                                          \
    int64_t s0, s1, p;                                                                       \
    int i, j;                                                                                \
    for (s0 = 0; s0 < d2; s0 += slice) {                                                     \
        __m512 acc[MR][NR];                                                                  \
        s1 = s0 + slice < d2 ? s0 + slice : d2;                                              \
        for (i = 0; i < MR; i++)                                                             \
            for (j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();                        \
        for (p = s0; p < s1; p++) {                                                          \
            __m512bh b[NR];                                                                  \
            for (j = 0; j < NR; j++)                                                         \
                b[j] = (__m512bh)_mm512_loadu_si512(wp + (j * d2 + p) * 16);                 \
            for (i = 0; i < MR; i++) {                                                       \
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)h[i * ldh + p]);               \
                for (j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);   \
            }                                                                                \
        }                                                                                    \
        for (i = 0; i < MR; i++)                                                             \
            for (j = 0; j < NR; j++) {                                                       \
                __mmask16 m = j == NR - 1 ? last : (__mmask16)0xffff;                        \
                float *o = out + i * ldo + j * 16;                                           \
                __m512 v = s0 ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), acc[i][j])        \
                              : acc[i][j];                                                   \
                _mm512_mask_storeu_ps(o, m, v);                                              \
            }                                                                                \
    }                                                                                        \
}
TILE(8, 3) TILE(4, 3) TILE(2, 3) TILE(1, 3)
TILE(8, 2) TILE(4, 2) TILE(2, 2) TILE(1, 2)
TILE(8, 1) TILE(4, 1) TILE(2, 1) TILE(1, 1)

typedef void (*tile_fn)(const uint32_t *, int64_t, const uint32_t *, int64_t, float *,
                        int64_t, int64_t, __mmask16);
static const tile_fn TILES[4][3] = {
    {tile_1_1, tile_1_2, tile_1_3}, {tile_2_1, tile_2_2, tile_2_3},
    {tile_4_1, tile_4_2, tile_4_3}, {tile_8_1, tile_8_2, tile_8_3}};
#endif

/* out[r, col] for col in blocks [jb0, jb1) (clipped at c): h [r][2*d2] bf16 as dwords, row
   stride ldh dwords. Rounding is set to nearest for the slice additions (VDPBF16PS itself
   ignores the mode) and put back. Returns 0, or -1 without the kernel. */
int gemm_blocks(const uint32_t *h, int64_t ldh, int64_t r, int64_t d2, const uint32_t *wp,
                int64_t c, float *out, int64_t ldo, int64_t slice, int64_t jb0, int64_t jb1) {
#if HAVE_KERNEL
    unsigned int saved = _mm_getcsr();
    int64_t jb, i;
    _mm_setcsr(saved & ~0x6000u);
    for (jb = jb0; jb < jb1; jb += 3) {
        int nr = jb1 - jb < 3 ? (int)(jb1 - jb) : 3;
        int64_t tail = c - (jb + nr - 1) * 16;
        __mmask16 last = tail >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << tail) - 1);
        for (i = 0; i < r;) {
            int64_t left = r - i;
            int m = left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0;
            TILES[m][nr - 1](h + i * ldh, ldh, wp + jb * d2 * 16, d2, out + i * ldo + jb * 16,
                             ldo, slice, last);
            i += (int64_t)1 << m;
        }
    }
    _mm_setcsr(saved);
    return 0;
#else
    (void)h; (void)ldh; (void)r; (void)d2; (void)wp; (void)c; (void)out; (void)ldo;
    (void)slice; (void)jb0; (void)jb1;
    return -1;
#endif
}

/* gemm_blocks over all column blocks, split in runs of 3 blocks over `threads` threads of
   the process's OpenMP team (torch's own). */
int gemm_team(const uint32_t *h, int64_t ldh, int64_t r, int64_t d2, const uint32_t *wp,
              int64_t c, float *out, int64_t ldo, int64_t slice, int threads) {
    int64_t nb = (c + 15) / 16;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        int64_t parts = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t step = 3 * ((nb + 3 * parts - 1) / (3 * parts));
        int64_t a = t * step, b = a + step < nb ? a + step : nb;
        if (a < b) status |= gemm_blocks(h, ldh, r, d2, wp, c, out, ldo, slice, a, b);
    }
#else
    (void)threads;
    status = gemm_blocks(h, ldh, r, d2, wp, c, out, ldo, slice, 0, nb);
#endif
    return status;
}

/* The manual's definition of one lane, with scalar fp32 operations (round to nearest):
   the odd element's product first. `swapped` (for the tests: the probe tells the orders
   apart) adds the even one first. */
static float manual_lane(float acc, float a0, float a1, float b0, float b1, int swapped) {
    if (swapped) return (acc + a0 * b0) + a1 * b1;
    acc = acc + a1 * b1;
    return acc + a0 * b0;
}

static uint64_t next_random(uint64_t *state) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

static float random_bf16(uint64_t *state, int spread, uint16_t *bits) {
    uint32_t sign = next_random(state) & 1, mantissa = next_random(state) & 0x7f;
    int e = 127 + (int)(next_random(state) % (uint64_t)(2 * spread + 1)) - spread;
    uint32_t u;
    float f;
    *bits = (uint16_t)((sign << 15) | ((uint32_t)e << 7) | mantissa);
    u = (uint32_t)*bits << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if HAVE_KERNEL
BF16 static void dpbf16(const float *acc, const uint16_t *a, const uint16_t *b, float *out) {
    __m512bh va, vb;
    memcpy(&va, a, 64);
    memcpy(&vb, b, 64);
    _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), va, vb));
}
#endif

/* How many of `trials` x 16 random lanes VDPBF16PS computes differently from the manual's
   definition (lanes whose operands, products or sums leave fp32's normal range are
   skipped: there the flushes differ, within the lens's underflow bound); -1 without the
   instruction. */
int64_t probe_mismatches(int64_t trials, uint64_t seed, int swapped) {
#if HAVE_KERNEL
    static const int spreads[4] = {2, 8, 20, 60};
    const float tiny = 0x1p-124f;
    unsigned int saved = _mm_getcsr();
    int64_t bad = 0, t;
    uint64_t state = seed | 1;
    if (!has_avx512_bf16()) return -1;
    _mm_setcsr(0x1f80u);  /* round to nearest, no flushing, exceptions masked */
    for (t = 0; t < trials; t++) {
        uint16_t a[32], b[32], bits;
        float fa[32], fb[32], acc[16], got[16];
        int spread = spreads[t % 4], i;
        for (i = 0; i < 32; i++) {
            fa[i] = random_bf16(&state, spread, &a[i]);
            fb[i] = random_bf16(&state, spread, &b[i]);
        }
        for (i = 0; i < 16; i++)
            acc[i] = t % 7 == 0 ? 0.0f : random_bf16(&state, spread, &bits) * (1.0f + 0x1p-13f * i);
        dpbf16(acc, a, b, got);
        for (i = 0; i < 16; i++) {
            float p1 = fa[2 * i + 1] * fb[2 * i + 1], p0 = fa[2 * i] * fb[2 * i];
            float mid = acc[i] + p1, want = manual_lane(acc[i], fa[2 * i], fa[2 * i + 1],
                                                        fb[2 * i], fb[2 * i + 1], swapped);
            float xs[6] = {acc[i], p1, p0, mid, acc[i] + p0, want};
            int k, outside = 0;
            for (k = 0; k < 6; k++)
                if (!isfinite(xs[k]) || (xs[k] != 0.0f && fabsf(xs[k]) < tiny)) outside = 1;
            if (!outside && got[i] != want) bad++;
        }
    }
    _mm_setcsr(saved);
    return bad;
#else
    (void)trials; (void)seed; (void)swapped;
    return -1;
#endif
}

"""

#: Width of the slices each summed from zero (an even number of hidden dimensions): the
#: band is :func:`~.exact.gemm_error_factor` ``(d, SLICE)``, 72u at d = 576 against the
#: 132u of the IEEE path's 128-wide slices. On SmolLM2-135M's rows with 12 random targets
#: a row that put 186,094 entries in band a call instead of 297,817, for a kernel as fast
#: within noise (32-wide slices: 143,020, and the kernel 10-15% slower).
SLICE = 64
#: Random lanes x 16 the probe compares against the manual (about 5 ms).
PROBE_TRIALS = 20_000
PROBE_SEED = 0x5EED

#: Whether this CPU runs the kernel (None: not asked yet), and why not.
_available: bool | None = None
_why_not = ""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.has_avx512_bf16.restype = i32
    lib.has_avx512_bf16.argtypes = []
    lib.pack_blocks.restype = lib.pack_team.restype = None
    lib.pack_blocks.argtypes = [p, i64, p, i64, i64, p, i64, i64]
    lib.pack_team.argtypes = [p, i64, p, i64, i64, p, i32]
    lib.gemm_blocks.restype = lib.gemm_team.restype = i32
    lib.gemm_blocks.argtypes = [p, i64, i64, i64, p, i64, p, i64, i64, i64, i64]
    lib.gemm_team.argtypes = [p, i64, i64, i64, p, i64, p, i64, i64, i32]
    lib.probe_mismatches.restype = i64
    lib.probe_mismatches.argtypes = [i64, ctypes.c_uint64, i32]


LIBRARY = native.Library("bf16_gemm", SOURCE, _declare)


def library() -> ctypes.CDLL:
    """The compiled kernel (:meth:`.native.Library.get`)."""
    return LIBRARY.get()


def available() -> bool:
    """Whether this process may run the kernel: an x86-64 CPU with AVX-512 BF16, a C
    compiler, and the probe finding the instruction to be the manual's arithmetic. Asked
    once a process; :func:`why_unavailable` says why not."""
    global _available, _why_not
    if _available is None:
        _available, _why_not = _check()
    return _available


def why_unavailable() -> str:
    """Why :func:`available` is False ('' when it is True or was not asked)."""
    return _why_not


def _check() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not an x86-64 CPU ({platform.machine()})"
    try:
        lib = library()
    except (KernelUnavailable, OSError) as exc:
        return False, f"the kernel did not build or load: {exc}"
    if not lib.has_avx512_bf16():
        return False, "this CPU has no AVX-512 BF16 (VDPBF16PS)"
    bad = lib.probe_mismatches(PROBE_TRIALS, PROBE_SEED, 0)
    if bad:
        return False, (
            f"VDPBF16PS differed from Intel's definition on {bad} of "
            f"{PROBE_TRIALS * 16} probe lanes"
        )
    return True, ""


@dataclass(frozen=True)
class PackedColumns:
    """Vocabulary rows packed for the kernel: ``cols`` rows of width ``d``."""

    data: torch.Tensor  # int32 [ceil(cols / 16) * ceil(d / 2) * 16]
    cols: int
    d: int


def pack(w: torch.Tensor, ids: torch.Tensor | None = None) -> PackedColumns:
    """Pack ``w`` [C, d] (bf16, CPU), or its rows ``ids`` (int64) in that order, for
    :func:`logits`: the gather and the packing in one pass."""
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2:
        raise TypeError(f"pack takes a 2-D bf16 CPU tensor, not {w.dtype} {list(w.shape)}")
    if ids is not None:
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1 or ids.is_cuda:
            raise TypeError(
                f"ids must be a 1-D integer index on the CPU, not {ids.dtype} {list(ids.shape)}"
            )
        ids = ids.to(torch.int64).contiguous()
        if len(ids) and not (0 <= int(ids.min()) <= int(ids.max()) < len(w)):
            raise ValueError(f"ids must index the {len(w)} rows of w")
        if w.stride(1) != 1:  # copy the chosen rows, not the whole of W
            w, ids = w.index_select(0, ids).contiguous(), None
    w = w if w.stride(1) == 1 else w.contiguous()
    c, d = (len(w) if ids is None else len(ids)), w.shape[1]
    data = torch.empty(-(-c // 16) * -(-d // 2) * 16, dtype=torch.int32)
    lib, blocks = library(), -(-c // 16)
    ids_ptr = None if ids is None else ids.data_ptr()
    operands = (w.data_ptr(), w.stride(0), ids_ptr, c, d, data.data_ptr())
    parts = max(1, min(torch.get_num_threads(), blocks))
    step = -(-blocks // parts)
    LIBRARY.split(
        parts,
        lambda threads: lib.pack_team(*operands, threads),
        lambda p: lib.pack_blocks(*operands, p * step, min(blocks, (p + 1) * step)),
    )
    return PackedColumns(data, c, d)


def logits(h: torch.Tensor, packed: PackedColumns, out: torch.Tensor) -> torch.Tensor:
    """``out[r, c] = h[r] . w[c]`` in fp32 (``out``: fp32 [R, cols], unit column stride),
    each :data:`SLICE`-wide slice summed by VDPBF16PS from zero, slices added in
    order. ``h``: bf16 [R, d] on the CPU. Needs :func:`available`."""
    if not available():
        raise KernelUnavailable(f"the AVX-512 BF16 GEMM cannot run here: {why_unavailable()}")
    if h.dtype != torch.bfloat16 or h.dim() != 2 or h.shape[1] != packed.d:
        raise ValueError(f"h must be bf16 [R, {packed.d}], not {h.dtype} {list(h.shape)}")
    r = len(h)
    if out.dtype != torch.float32 or tuple(out.shape) != (r, packed.cols) or out.stride(1) != 1:
        raise ValueError(f"out must be fp32 [{r}, {packed.cols}] with unit column stride")
    if r == 0 or packed.cols == 0:
        return out
    if packed.d == 0:
        return out.zero_()  # empty sums
    if packed.d % 2 or h.stride(1) != 1 or h.stride(0) % 2 or h.storage_offset() % 2:
        # The kernel reads h as bf16 pairs: an even, contiguous width (a zero pads an odd d).
        h = F.pad(h, (0, packed.d % 2)).contiguous()
    d2, ldh = -(-packed.d // 2), h.stride(0) // 2
    slice_pairs = SLICE // 2
    lib = library()
    operands = (h.data_ptr(), ldh, r, d2, packed.data.data_ptr(), packed.cols)
    blocks = -(-packed.cols // 16)
    parts = max(1, min(torch.get_num_threads(), -(-blocks // 3)))
    step = 3 * -(-blocks // (3 * parts))  # whole tiles of 3 blocks a part

    def run(part: int) -> int:
        jb0, jb1 = part * step, min(blocks, (part + 1) * step)
        if jb0 >= jb1:
            return 0
        return lib.gemm_blocks(*operands, out.data_ptr(), out.stride(0), slice_pairs, jb0, jb1)

    def team(threads: int) -> int:
        return lib.gemm_team(*operands, out.data_ptr(), out.stride(0), slice_pairs, threads)

    codes = LIBRARY.split(parts, team, run)
    if any(codes):
        raise KernelUnavailable("the AVX-512 BF16 GEMM was built without its kernel")
    return out
