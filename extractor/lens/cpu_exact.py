"""Exact dot products of chosen (row, column) entries on the CPU, in one compiled loop.

:func:`~.exact.entry_logits` defines every exact value in the lens: float64 products
(exact for bf16, fp16 and fp32 models), summed in float64 in one fixed pairwise order
(:func:`~.exact.ordered_sum`). In torch that is a gather, a float64 conversion, a product
and log2(d) halvings over [E, d] float64 temporaries: about 18 KB of memory traffic an
entry at d = 576, 1.2 to 2.3 us an entry on the development machine, against 0.3 to 0.5 us
for this loop (``bench/exact_values.py``; bench/README.md, "Stop 19").

The loop computes the same values bit for bit (NaN payloads aside: the lens refuses
non-finite rows and weights), one entry at a time in a buffer that stays in the cache:
convert the two rows to float64 (exact), multiply, then halve the buffer (element ``2j``
plus element ``2j + 1``, the odd one out plus ``0.0``) exactly as ``ordered_sum`` does.
``-ffp-contract=off`` and no fast-math keep every product and sum its own IEEE operation,
and the loop turns off the thread's flush-to-zero modes while it runs, so a subnormal
input is never read as zero. It is C, compiled once per machine with the system's C
compiler (``$CC``, else ``cc``) and loaded through :mod:`ctypes`, which releases the GIL,
so the entries are split over as many threads as torch uses: torch's own OpenMP team
where the loop is built with OpenMP and the process holds that one runtime (torch's
threads spin after each op, and took a core from a thread of ours), else Python threads.
Without a compiler the caller falls back to torch's ops
(:func:`~.exact.entry_dots_torch`): the same values, slower.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import native
from .native import KernelUnavailable, compiler

SOURCE = (
    native.IEEE_MODE_C
    + native.CLONES_C
    + r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif


/* Each conversion is exact: every bf16, fp16 and fp32 value is a float64 value. NaN
   payloads are not kept (the lens refuses non-finite rows and weights). */
static double from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return (double)f;
}

static double from_f16(uint16_t x) {
    /* The bits moved into fp32's fields (sign too), then scaled by 2^112: exact for normal
       and subnormal halves alike, and without a branch on the sign (a random sign
       mispredicted half the time: 3 us an entry). fp16's inf and NaN are set apart. */
    uint32_t u = ((uint32_t)(x & 0x8000u) << 16) | ((uint32_t)(x & 0x7fffu) << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    f *= 0x1p112f;
    if ((x & 0x7c00u) == 0x7c00u) f = (x & 0x3ffu) ? NAN : ((x >> 15) ? -INFINITY : INFINITY);
    return (double)f;
}

/* Row `row` of `base` (dtype: 0 float64, 1 float32, 2 bfloat16, 3 float16) as float64. */
static void load(const void *base, int dtype, int64_t row, int64_t stride, int64_t d,
                 double *out) {
    int64_t i;
    switch (dtype) {
    case 0: memcpy(out, (const double *)base + row * stride, (size_t)d * sizeof(double)); break;
    case 1: { const float *p = (const float *)base + row * stride;
              for (i = 0; i < d; i++) out[i] = (double)p[i]; } break;
    case 2: { const uint16_t *p = (const uint16_t *)base + row * stride;
              for (i = 0; i < d; i++) out[i] = from_bf16(p[i]); } break;
    default: { const uint16_t *p = (const uint16_t *)base + row * stride;
               for (i = 0; i < d; i++) out[i] = from_f16(p[i]); } break;
    }
}

/* How many entries ahead W's rows are prefetched. */
#define PREFETCH_AHEAD 2

/* out[e] = sum_i h[rows[e], i] * w[cols[e], i] in ordered_sum's order. A row is converted
   once for each run of entries on it (the lens asks entries mostly sorted by row). Returns 0,
   or -1 when out of memory. */
CLONES int entry_dots(const void *h, int64_t h_stride, const void *w, int64_t w_stride,
                      int dtype, int64_t d, const int64_t *rows, const int64_t *cols,
                      int64_t n, double *out) {
    double *buf = malloc((size_t)(3 * d + 2) * sizeof(double));
    if (!buf) return -1;
    fp_mode saved = ieee_mode();
    double *hrow = buf, *a = buf + d, *b = buf + 2 * d + 1;
    int64_t last = -1, e, i;
    size_t bytes = (size_t)(dtype == 0 ? 8 : dtype == 1 ? 4 : 2), off;
    for (e = 0; e < n; e++) {
        if (e + PREFETCH_AHEAD < n) {
            /* The entries' columns are scattered over W (56 MB for SmolLM2): its row for a
               later entry is fetched while this one is summed, 0.40 -> 0.27 us an entry. */
            const char *next = (const char *)w
                               + (size_t)cols[e + PREFETCH_AHEAD] * (size_t)w_stride * bytes;
            for (off = 0; off < (size_t)d * bytes; off += 64) __builtin_prefetch(next + off);
        }
        if (rows[e] != last) {
            load(h, dtype, rows[e], h_stride, d, hrow);
            last = rows[e];
        }
        load(w, dtype, cols[e], w_stride, d, a);
        if (d < 2) {  /* ordered_sum of one product is the product; of none, zero */
            out[e] = d ? hrow[0] * a[0] : 0.0;
            continue;
        }
        /* The first halving fused with the products: (h0 w0) + (h1 w1), each rounded. */
        int64_t half = d / 2;
        for (i = 0; i < half; i++) {
            double p0 = hrow[2 * i] * a[2 * i], p1 = hrow[2 * i + 1] * a[2 * i + 1];
            b[i] = p0 + p1;
        }
        if (d & 1) b[half] = hrow[d - 1] * a[d - 1] + 0.0;
        double *x = b, *y = a;
        int64_t width = half + (d & 1);
        while (width > 1) {
            half = width / 2;
            for (i = 0; i < half; i++) y[i] = x[2 * i] + x[2 * i + 1];
            if (width & 1) y[half] = x[width - 1] + 0.0;
            width = half + (width & 1);
            double *t = x; x = y; y = t;
        }
        out[e] = x[0];
    }
    restore_mode(saved);
    free(buf);
    return 0;
}

/* entry_dots split over `threads` threads of the process's OpenMP team: torch's own, whose
   threads spin after each torch op and would otherwise take the core from a thread of
   ours. Without OpenMP, one thread. */
int entry_dots_team(const void *h, int64_t h_stride, const void *w, int64_t w_stride,
                    int dtype, int64_t d, const int64_t *rows, const int64_t *cols, int64_t n,
                    double *out, int threads) {
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        int64_t parts = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t step = (n + parts - 1) / parts, a = t * step, b = a + step < n ? a + step : n;
        if (a < b)
            status |= entry_dots(h, h_stride, w, w_stride, dtype, d, rows + a, cols + a, b - a,
                                 out + a);
    }
#else
    (void)threads;
    status = entry_dots(h, h_stride, w, w_stride, dtype, d, rows, cols, n, out);
#endif
    return status;
}

"""
)

DTYPES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
__all__ = ["KernelUnavailable", "build", "compiler", "entry_dots", "library", "supports"]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.entry_dots.restype = lib.entry_dots_team.restype = i32
    lib.entry_dots.argtypes = [p, i64, p, i64, i32, i64, p, p, i64, p]
    lib.entry_dots_team.argtypes = [*lib.entry_dots.argtypes, i32]


LIBRARY = native.Library("entry_dots", SOURCE, _declare)


def build(rebuild: bool = False, openmp: bool = True) -> Path:
    """Compile the loop (:meth:`.native.Library.build`)."""
    return LIBRARY.build(rebuild, openmp)


def library() -> ctypes.CDLL:
    """The compiled loop (:meth:`.native.Library.get`)."""
    return LIBRARY.get()


#: Entries below which one thread does all the work (a split costs more than it saves).
SPLIT_ENTRIES = 512


def supports(h: torch.Tensor, unembed: torch.Tensor) -> bool:
    """Whether the loop takes these operands: CPU tensors of one dtype it converts."""
    return (
        h.device.type == unembed.device.type == "cpu"
        and h.dtype == unembed.dtype
        and h.dtype in DTYPES
    )


def entry_dots(
    h: torch.Tensor, unembed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Float64 ``sum_i h[rows[e], i] * unembed[cols[e], i]`` [E] in ``ordered_sum``'s order:
    :func:`~.exact.entry_dots_torch`'s values bit for bit.

    ``h`` and ``unembed`` are CPU tensors of one dtype (float64, float32, bfloat16 or
    float16); ``rows`` and ``cols`` index them (checked: the loop reads raw memory).
    Raises :class:`KernelUnavailable` when the loop cannot be built.
    """
    if not supports(h, unembed):
        raise TypeError(
            f"entry_dots takes CPU tensors of one dtype in {list(DTYPES)}, not "
            f"{h.dtype} on {h.device} and {unembed.dtype} on {unembed.device}"
        )
    # The loop reads raw memory: every shape it relies on is checked first.
    if h.dim() != 2 or unembed.dim() != 2 or h.shape[1] != unembed.shape[1]:
        raise ValueError(
            f"entry_dots takes h [R, d] and unembed [V, d], not {list(h.shape)} and "
            f"{list(unembed.shape)}"
        )
    for name, idx in (("rows", rows), ("cols", cols)):
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a 1-D integer tensor, not {idx.dtype} {list(idx.shape)}"
            )
    if len(rows) != len(cols):
        raise ValueError(f"{len(rows)} rows against {len(cols)} cols")
    e, d = len(rows), h.shape[1]
    out = torch.empty(e, dtype=torch.float64)
    if e == 0:
        return out
    lib = library()
    h = h if h.stride(1) == 1 else h.contiguous()
    unembed = unembed if unembed.stride(1) == 1 else unembed.contiguous()
    rows, cols = rows.cpu().contiguous().long(), cols.cpu().contiguous().long()
    for name, idx, bound in (("row", rows, len(h)), ("column", cols, len(unembed))):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= bound:
            raise IndexError(f"{name} index {lo if lo < 0 else hi} out of range [0, {bound})")
    parts = max(1, min(torch.get_num_threads(), e // SPLIT_ENTRIES))
    step = -(-e // parts)
    operands = (h.data_ptr(), h.stride(0), unembed.data_ptr(), unembed.stride(0))

    def run(a: int) -> int:
        b = min(e, a + step)
        if a >= b:
            return 0
        rows_at, cols_at, out_at = rows.data_ptr() + 8 * a, cols.data_ptr() + 8 * a, out.data_ptr()
        return lib.entry_dots(
            *operands, DTYPES[h.dtype], d, rows_at, cols_at, b - a, out_at + 8 * a
        )

    def team(threads: int) -> int:
        return lib.entry_dots_team(
            *operands,
            DTYPES[h.dtype],
            d,
            rows.data_ptr(),
            cols.data_ptr(),
            e,
            out.data_ptr(),
            threads,
        )

    codes = LIBRARY.split(parts, team, lambda i: run(i * step))
    if any(codes):
        raise MemoryError("the exact-dots loop could not allocate its row buffers")
    return out
