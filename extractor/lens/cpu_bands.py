"""Which fast logits lie above, or inside, each target's band: one C loop on the CPU.

For every target ``t`` of a row the torch engine needs the number of the row's fast logits
strictly above ``hi[t]`` (certainly above the target) and the positions of those inside
some ``[lo[t], hi[t]]`` (resolved exactly). The compiled pass did this with an fp32 mask
of the whole block (Inductor's bool stores are not vectorised) that ``nonzero`` then
scanned, and targets padded to a power of two: for 12 targets on a 512 x 8,192 block, 3.2
ms of the pass and 1.7 of the scan on AMD EPYC (Zen 5), against 2.4 for this loop, which
lists the few in-band entries as it finds them (bench/README.md, "Stop 21").

Pure IEEE comparisons (no fast-math, subnormals never flushed), so the classification is
the pass's, entry for entry; the positions come in row-major order, as ``nonzero`` gives
them. Built like the
other C kernels (:mod:`.native`), with one clone for AVX-512, one for AVX2 and a plain one
where the compiler and loader (glibc) have function multiversioning.
"""

from __future__ import annotations

import ctypes

import torch

from . import native

SOURCE = (
    native.IEEE_MODE_C
    + r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Clones need the loader's ifunc (glibc) and a compiler that has the attribute. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

#define BLOCK 64

/* Rows [r0, r1) of x ([r][ldx] fp32, width c) against lo/hi ([r][t] fp32):
   above[r][j] = #{col: x > hi[j]}; each col with some lo[j] <= x <= hi[j] listed in pos as
   r * c + col, in order. Returns how many were listed. */
CLONES static int64_t classify_rows(const float *x, int64_t ldx, int64_t c, const float *lo,
                                    const float *hi, int64_t t, int64_t r0, int64_t r1,
                                    int32_t *above, int64_t *pos) {
    int64_t n = 0, r, c0, i, j;
    for (r = r0; r < r1; r++) {
        const float *row = x + r * ldx, *l = lo + r * t, *h = hi + r * t;
        int32_t *a = above + r * t;
        for (j = 0; j < t; j++) a[j] = 0;
        for (c0 = 0; c0 < c; c0 += BLOCK) {
            int64_t w = c - c0 < BLOCK ? c - c0 : BLOCK;
            int32_t flag[BLOCK], any = 0;
            const float *v = row + c0;
            for (i = 0; i < BLOCK; i++) flag[i] = 0;
            for (j = 0; j < t; j++) {
                float hj = h[j], lj = l[j];
                int32_t count = 0;
                for (i = 0; i < w; i++) {
                    count += v[i] > hj;
                    flag[i] |= (v[i] >= lj) & (v[i] <= hj);
                }
                a[j] += count;
            }
            for (i = 0; i < w; i++) any |= flag[i];
            if (any)
                for (i = 0; i < w; i++)
                    if (flag[i]) pos[n++] = r * c + c0 + i;
        }
    }
    return n;
}

/* Part p of `parts` (rows cut evenly): its entries from pos + first_row * c; found[p]. */
int classify_part(const float *x, int64_t ldx, int64_t r, int64_t c, const float *lo,
                  const float *hi, int64_t t, int32_t *above, int64_t *pos, int64_t *found,
                  int64_t parts, int64_t p) {
    int64_t step = (r + parts - 1) / parts, a = p * step, b = a + step < r ? a + step : r;
    fp_mode saved = ieee_mode();  /* comparisons see subnormals as they are */
    found[p] = a < b ? classify_rows(x, ldx, c, lo, hi, t, a, b, above, pos + a * c) : 0;
    restore_mode(saved);
    return 0;
}

/* Every part, on the process's OpenMP team (torch's own). */
int classify_team(const float *x, int64_t ldx, int64_t r, int64_t c, const float *lo,
                  const float *hi, int64_t t, int32_t *above, int64_t *pos, int64_t *found,
                  int64_t parts, int threads) {
    int64_t p;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (p = 0; p < parts; p++) classify_part(x, ldx, r, c, lo, hi, t, above, pos, found, parts, p);
    (void)threads;
    return 0;
}
"""
)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    part = [p, i64, i64, i64, p, p, i64, p, p, p, i64]
    lib.classify_part.restype = lib.classify_team.restype = i32
    lib.classify_part.argtypes = [*part, i64]
    lib.classify_team.argtypes = [*part, i32]


LIBRARY = native.Library("lens_bands", SOURCE, _declare)


def supports(values: torch.Tensor) -> bool:
    """Whether the loop takes these logits: fp32 on the CPU."""
    return values.device.type == "cpu" and values.dtype == torch.float32


def classify(
    values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(above, rows, cols)``: ``above[r, t]`` (int32) entries of row ``r`` of ``values``
    [R, C] strictly above ``hi[r, t]``; ``(rows, cols)`` every entry inside some
    ``[lo[r, t], hi[r, t]]``, row-major. ``lo``/``hi``: fp32 [R, T]. Raises
    :class:`~.native.KernelUnavailable` when the loop cannot be built."""
    if not supports(values) or values.dim() != 2:
        raise TypeError(f"classify takes fp32 CPU logits [R, C], not {values.dtype} {values.shape}")
    r, c = values.shape
    if lo.shape != (r, lo.shape[1]) or hi.shape != lo.shape:
        raise ValueError(f"lo and hi must be [{r}, T], not {list(lo.shape)} and {list(hi.shape)}")
    t = lo.shape[1]
    values = values if values.stride(1) == 1 else values.contiguous()
    lo, hi = lo.float().contiguous(), hi.float().contiguous()
    above = torch.zeros(r, t, dtype=torch.int32)
    if r == 0 or c == 0 or t == 0:
        none = torch.empty(0, dtype=torch.long)
        return above, none, none
    lib = LIBRARY.get()
    parts = max(1, min(torch.get_num_threads(), r))
    pos = torch.empty(r * c, dtype=torch.int64)  # untouched pages are never faulted in
    found = torch.zeros(parts, dtype=torch.int64)
    operands = (values.data_ptr(), values.stride(0), r, c, lo.data_ptr(), hi.data_ptr(), t)
    buffers = (above.data_ptr(), pos.data_ptr(), found.data_ptr(), parts)
    LIBRARY.split(
        parts,
        lambda threads: lib.classify_team(*operands, *buffers, threads),
        lambda p: lib.classify_part(*operands, *buffers, p),
    )
    step = -(-r // parts)
    listed = torch.cat(
        [pos[p * step * c : p * step * c + int(n)] for p, n in enumerate(found.tolist())]
    )
    return above, listed // c, listed % c
