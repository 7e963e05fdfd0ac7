"""The pass over a block of fast logits on the CPU: one C loop where there were three.

For every row of a block the torch engine needs its max and min, the sum of
``exp(logit - max)`` (the online log-sum-exp), for each target ``t`` the number of logits
strictly above ``hi[t]`` (certainly above the target) and the positions of those inside
some ``[lo[t], hi[t]]`` (resolved exactly), and ``kk`` candidates for its top-k. Until
stop 22 Inductor compiled the first part, a C loop counted the bands and torch's top-k
searched the blocks with the largest maxima: three reads of a 16 MB block, and 0.5 ms of
dynamo's wrappers around each call of the compiled graph (at the Qwen2.5 shape, 0.36 +
0.34 + 0.23 s of a 3.4 s call). This loop reads each row once into the cache and does all
of it (bench/README.md, "Stop 22").

What it promises, against the compiled pass (``chunked._chunk_stats_eager``) and
``topk.block_topk``:

- maxima, minima, block maxima, counts and in-band positions: **equal**, entry for entry
  (a zero's sign in a maximum aside: +0 and -0 compare equal). Pure IEEE comparisons, no
  fast-math, subnormals never flushed whatever the calling thread's mode; positions in
  row-major order, as ``nonzero`` gives them;
- the top entries: ``kk`` largest values of the row, at columns that hold them (ties may
  pick other columns): every entry left out is ``<=`` each one kept, all that the engine's
  certification needs;
- the exp-sum: the same terms in another order, each from the loop's own ``exp`` (within
  :data:`EXP_MAX_ULPS` ulps: ``6u`` relative), added in 64 lanes and then folded. Its
  relative error is then at most ``(6 + C / 64 + 6) u``, within the ``4u`` a term of a
  ``C``-term sum that ``exact.logsumexp_error_bound`` allows (``C >= 4``; ``C`` itself is
  at least the vocabulary chunk there).

It reads fp32 logits (calls that ask ranks) and the bf16 or fp16 ones of rank-free calls,
widened exactly to fp32 as the compiled pass widens them.

Plain C loops over fixed-size arrays, which the compiler vectorises for each clone
(AVX-512, AVX2, the baseline: :data:`.native.CLONES_C`). Every clone does the same IEEE
operations in the same order (the sums' lanes are the source's, not the vector width's),
so the results are the same bits on any x86-64 CPU.
"""

from __future__ import annotations

import ctypes

import torch

from . import native
from .topk import TOPK_BLOCK

#: Columns a block maximum covers (the C source's BLOCK).
BLOCK = TOPK_BLOCK
#: The most top entries a row the loop keeps (the engine asks ``k + 4``; beyond this torch's
#: top-k is faster than the loop's small sorted lists).
MAX_KK = 64
#: The loop's ``exp`` is within this many units in the last place of the true value on
#: [-87, 88]: Taylor truncation under 0.12 ulp, the reduced argument's rounding about 0.35,
#: Horner's last rounding 0.5 and the earlier ones scaled down by |r| <= 0.35, so under 1.5
#: ulps of the polynomial, whose binade may be the result's or the one below: 3. Measured
#: 1.21 over 6.3 million values (tests/test_cpu_pass.py). Below -87 it gives 0 (the true
#: value is under 1.7e-38, and a row's sum is at least 1), above 88 infinity.
EXP_MAX_ULPS = 3

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

#define BLOCK 64
/* Lanes of the running maxima, minima and sums: one AVX-512 register of fp32. */
#define LANES 16

/* Plain loops over fixed-size arrays, which the compiler vectorises for each clone (its
   generic vectors of 16 floats were scalarised for AVX2: 50-97 ms a block, not 3).
   Maxima and minima as `a > b ? a : b`; sums lane by lane, then folded by halving (lanes
   i and i + w). */
static inline float max_s(float a, float b) { return a > b ? a : b; }
static inline float min_s(float a, float b) { return a < b ? a : b; }

static inline float fold_max(float *x) {
    int i, w;
    for (w = LANES / 2; w >= 1; w /= 2)
        for (i = 0; i < w; i++) x[i] = max_s(x[i], x[i + w]);
    return x[0];
}

static inline float fold_min(float *x) {
    int i, w;
    for (w = LANES / 2; w >= 1; w /= 2)
        for (i = 0; i < w; i++) x[i] = min_s(x[i], x[i + w]);
    return x[0];
}

static inline float fold_sum(float *x, int n) {
    int i, w;
    for (w = n / 2; w >= 1; w /= 2)
        for (i = 0; i < w; i++) x[i] += x[i + w];
    return x[0];
}

/* exp(x): x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, n ln2_hi exact), exp(r) by its
   Taylor series to r^7 (truncation under 0.12 ulp), times 2^n built in the exponent bits.
   Each * and + its own IEEE operation (-ffp-contract=off). 0 below -87 (the true value is
   under 1.7e-38), infinity above 88, NaN stays NaN. */
static inline float exp_s(float x) {
    int ok = (x >= -87.0f) & (x <= 88.0f);
    float c = ok ? x : 0.0f;
    float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    float r = c - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    /* Every operation unconditional, then selected: a multiply under a condition is not
       vectorised for AVX2 (the compiler may not speculate one that could trap). */
    float e = p * scale;
    float out = x < -87.0f ? 0.0f : (x > 88.0f ? INFINITY : x);
    return ok ? e : out;
}

/* What one call of the pass reads and writes (Python fills it: PassArgs). */
typedef struct {
    const void *x;        /* [r][ldx] logits, width c, of type dtype */
    int64_t dtype;        /* 0 fp32, 1 bf16, 2 fp16 */
    int64_t ldx, r, c;
    const float *lo, *hi; /* [r][t] bands, lo <= hi */
    int64_t t;
    int64_t kk;           /* top entries a row (0: none) */
    float *row_max, *row_min, *sumexp; /* [r] */
    float *blocks;        /* [r][c / BLOCK] block maxima, or NULL */
    int32_t *above;       /* [r][t] */
    int64_t *pos;         /* [r * c] room for in-band positions */
    int64_t *found;       /* [parts] positions listed by each part */
    float *top_v;         /* [r][kk] the kk largest of each row, in any order */
    int64_t *top_c;       /* [r][kk] their columns */
    int64_t parts;
} pass_args;

/* A row's scratch: its block maxima (all blocks, a last partial one too), the kk largest
   of them, and the entries that may be among the row's kk largest. */
typedef struct {
    int32_t *acc;       /* [t][LANES] counts above each band */
    float *bmax, *bsel; /* [ceil(c / BLOCK)], [kk] */
    float *cand_v;      /* [4 kk] */
    int64_t *cand_c;    /* [4 kk] */
    float *widened;     /* [c] a bf16 or fp16 row as fp32 */
} row_scratch;

/* Row r of a->x as fp32: the row itself, or each value widened (exactly) into `out`. */
static const float *fp32_row(const pass_args *a, int64_t r, float *out) {
    int64_t i, c = a->c;
    if (a->dtype == 0) return (const float *)a->x + r * a->ldx;
    const uint16_t *p = (const uint16_t *)a->x + r * a->ldx;
    if (a->dtype == 1) {
        for (i = 0; i < c; i++) {
            uint32_t u = (uint32_t)p[i] << 16;
            memcpy(out + i, &u, sizeof u);
        }
        return out;
    }
    for (i = 0; i < c; i++) {
        /* fp16's fields moved into fp32's, then scaled by 2^112: exact for normal and
           subnormal halves; infinities and NaN set apart. */
        uint32_t x = p[i], u = ((x & 0x8000u) << 16) | ((x & 0x7fffu) << 13), special;
        float f, g;
        memcpy(&f, &u, sizeof f);
        f *= 0x1p112f;
        special = ((x & 0x8000u) << 16) | 0x7f800000u | ((x & 0x3ffu) << 13);
        memcpy(&g, &special, sizeof g);
        out[i] = (x & 0x7c00u) == 0x7c00u ? g : f;
    }
    return out;
}

/* Keep the k largest values offered, descending in v[0, *n): for a row's block maxima,
   where after a few dozen offers almost every one is refused by one predictable
   comparison (a selection over all of them would cost as much as torch's top-k). */
static inline void keep_largest(float *v, int64_t *n, int64_t k, float x) {
    int64_t i;
    if (*n == k) {
        if (!(x > v[k - 1])) return;
        i = k - 1;
    } else {
        i = (*n)++;
    }
    for (; i > 0 && v[i - 1] < x; i--) v[i] = v[i - 1];
    v[i] = x;
}

/* The least float above x, or NaN above +inf, where there is none: `y >= next_up(x)` is
   then `y > x` for any y (every comparison with NaN is false). x is not NaN. Bits, not
   nextafterf: the library links no libm. */
static inline float next_up(float x) {
    uint32_t u;
    if (x == INFINITY) return NAN;
    if (x == 0.0f) return 0x1p-149f; /* -0 too */
    memcpy(&u, &x, sizeof u);
    u = x > 0.0f ? u + 1 : u - 1;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Move the k largest of v[0, m) (ids alike) into v[0, k), v[k - 1] the least of them:
   Hoare's selection, pivoting on the middle of the range left (linear on average; a
   pivot at a fixed place met the least value each time in rows built for it, and took
   quadratic time). */
static void select_largest(float *v, int64_t *id, int64_t m, int64_t k) {
    int64_t l = 0, h = m - 1, i, j, want = k - 1;
    while (l < h) {
        float x = v[l + (h - l) / 2], tv;
        int64_t ti;
        i = l;
        j = h;
        do {
            while (v[i] > x) i++;
            while (x > v[j]) j--;
            if (i <= j) {
                tv = v[i], v[i] = v[j], v[j] = tv;
                ti = id[i], id[i] = id[j], id[j] = ti;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < want) l = i;
        if (want < i) h = j;
    }
}

/* A full buffer of 4 kk candidates cut to its kk largest; returns the new bar, above the
   least kept (kk are kept, all >= it, so an entry equal to it is not needed; past +inf,
   NaN: none). Out of line, so that the scan's loop stays as small as before. */
static __attribute__((noinline)) float keep_best(row_scratch *s, int64_t kk) {
    select_largest(s->cand_v, s->cand_c, 4 * kk, kk);
    return next_up(s->cand_v[kk - 1]);
}

/* The kk largest entries of a row (0 < kk <= c, no NaN), in any order: every entry left
   out is <= each one kept. Only blocks whose maximum reaches tau, the kk-th largest block
   maximum, can hold one (kk blocks reach it, each with an entry >= tau), and only their
   entries >= tau: usually a few more than kk, collected unsorted. When 4 kk have come
   (rows that rise or fall along the columns), the kk largest of them are selected and the
   bar rises above the least of those: each entry costs O(1) on average, whatever the
   row's shape. A last selection leaves the kk largest. */
static void row_topk(const float *row, int64_t c, int64_t kk, row_scratch *s, float *top_v,
                     int64_t *top_c) {
    int64_t nbl = (c + BLOCK - 1) / BLOCK, n = 0, m = 0, b, i;
    float tau = -INFINITY, bar;
    /* From the last block back: columns sorted by ||W[j]|| put the largest |logits| last,
       and offers that fall are refused at once. */
    for (b = nbl - 1; b >= 0; b--) keep_largest(s->bsel, &n, kk, s->bmax[b]);
    if (n == kk) tau = s->bsel[kk - 1];
    bar = tau; /* an entry is a candidate when >= bar */
    for (b = nbl - 1; b >= 0; b--) {
        int64_t c0 = b * BLOCK, c1 = c0 + BLOCK < c ? c0 + BLOCK : c;
        if (!(s->bmax[b] >= bar)) continue;
        for (i = c1 - 1; i >= c0; i--)
            if (row[i] >= bar) {
                if (m == 4 * kk) {
                    bar = keep_best(s, kk);
                    m = kk;
                    if (!(row[i] >= bar)) continue;
                }
                s->cand_v[m] = row[i];
                s->cand_c[m++] = i;
            }
    }
    /* m >= kk: kk blocks reach tau (fewer only where a NaN hid them: that row is refused) */
    if (m > kk) select_largest(s->cand_v, s->cand_c, m, kk);
    for (i = 0; i < kk && i < m; i++) {
        top_v[i] = s->cand_v[i];
        top_c[i] = s->cand_c[i];
    }
}

/* Rows [r0, r1) of a->x. Per row: row_max, row_min, sumexp = sum exp(x - m) (m: the max
   if finite, else 0), the block maxima (into a->blocks when c % BLOCK == 0), above[r][j] =
   #{x > hi[j]}, each column with some lo[j] <= x <= hi[j] listed in pos as r * c + col,
   in order, and the kk largest entries. Returns how many positions were listed. */
CLONES static int64_t scan_rows(const pass_args *a, int64_t r0, int64_t r1, row_scratch *s,
                                int64_t *pos) {
    const float *lo = a->lo, *hi = a->hi;
    int64_t c = a->c, t = a->t;
    float *row_max = a->row_max, *row_min = a->row_min, *sumexp = a->sumexp;
    float *blocks = a->blocks;
    int32_t *above = a->above, *acc = s->acc;
    int64_t n = 0, r, c0, j, nb = c / BLOCK;
    int i, q;
    float tail[BLOCK];
    for (r = r0; r < r1; r++) {
        const float *row = fp32_row(a, r, s->widened), *l = lo + r * t, *h = hi + r * t;
        float mx = -INFINITY, mn[LANES], sum[BLOCK];
        for (i = 0; i < LANES; i++) mn[i] = INFINITY;
        /* First read: maxima and the minimum (the row then sits in the cache). A last,
           partial block is read from `tail`, padded with -inf for its maximum. Lanes in the
           outer loop: the compiler then vectorises over them (it had unrolled the other
           order into scalar maxima). */
        for (c0 = 0; c0 < c; c0 += BLOCK) {
            int64_t w = c - c0 < BLOCK ? c - c0 : BLOCK;
            const float *v = row + c0;
            float bm[LANES];
            if (w < BLOCK) {
                for (i = 0; i < BLOCK; i++) tail[i] = i < w ? v[i] : -INFINITY;
                for (i = 0; i < w; i++) mn[i % LANES] = min_s(mn[i % LANES], v[i]);
                v = tail;
                for (i = 0; i < LANES; i++) {
                    float m = v[i];
                    for (q = 1; q < BLOCK / LANES; q++) m = max_s(m, v[q * LANES + i]);
                    bm[i] = m;
                }
            } else {
                for (i = 0; i < LANES; i++) {
                    float m = v[i], least = mn[i];
                    for (q = 0; q < BLOCK / LANES; q++) {
                        float y = v[q * LANES + i];
                        m = max_s(m, y);
                        least = min_s(least, y);
                    }
                    bm[i] = m;
                    mn[i] = least;
                }
            }
            float b = fold_max(bm);
            s->bmax[c0 / BLOCK] = b;
            if (blocks && w == BLOCK) blocks[r * nb + c0 / BLOCK] = b;
            mx = max_s(mx, b);
        }
        row_max[r] = mx;
        row_min[r] = fold_min(mn);
        float safe = isfinite(mx) ? mx : 0.0f;
        for (i = 0; i < BLOCK; i++) sum[i] = 0.0f;
        for (j = 0; j < t * LANES; j++) acc[j] = 0;
        /* Second read: exp-sum and bands. A partial block is padded with NaN: neither
           above nor inside any band, and its exp is left out of the sum. */
        for (c0 = 0; c0 < c; c0 += BLOCK) {
            int64_t w = c - c0 < BLOCK ? c - c0 : BLOCK;
            const float *v = row + c0;
            int32_t inside[BLOCK], any = 0;
            if (w < BLOCK) {
                for (i = 0; i < BLOCK; i++) tail[i] = i < w ? v[i] : NAN;
                v = tail;
            }
            for (i = 0; i < BLOCK; i++) {
                float e = exp_s(v[i] - safe);
                sum[i] += i < w ? e : 0.0f;
                inside[i] = 0;
            }
            /* inside[i]: the bands holding entry i, #{j: x >= lo[j]} - #{j: x > hi[j]}
               (every lo[j] <= hi[j], checked by the caller): cheaper than and-ing two
               comparisons, 2.8 -> 2.4 ms a 512 x 8,192 block with 12 targets. */
            for (j = 0; j < t; j++) {
                float hj = h[j], lj = l[j];
                int32_t *count_j = acc + j * LANES;
                for (i = 0; i < LANES; i++) {
                    int32_t count = 0;
                    for (q = 0; q < BLOCK / LANES; q++) {
                        float x = v[q * LANES + i];
                        int32_t above_hj = x > hj;
                        count += above_hj;
                        inside[q * LANES + i] += (x >= lj) - above_hj;
                    }
                    count_j[i] += count;
                }
            }
            for (i = 0; i < BLOCK; i++) any |= inside[i];
            if (any)
                for (i = 0; i < BLOCK; i++)
                    if (inside[i]) pos[n++] = r * c + c0 + i;
        }
        for (j = 0; j < t; j++) {
            int32_t total = 0, *count_j = acc + j * LANES;
            for (i = 0; i < LANES; i++) total += count_j[i];
            above[r * t + j] = total;
        }
        sumexp[r] = fold_sum(sum, BLOCK);
        if (a->kk > 0) row_topk(row, c, a->kk, s, a->top_v + r * a->kk, a->top_c + r * a->kk);
    }
    return n;
}

/* exp_s of each of x[0, n) (the tests hold it to EXP_MAX_ULPS). */
CLONES void exp_many(const float *x, int64_t n, float *out) {
    int64_t i;
    fp_mode saved = ieee_mode();
    for (i = 0; i < n; i++) out[i] = exp_s(x[i]);
    restore_mode(saved);
}

/* Part p of `parts` (rows cut evenly): its entries from pos + first_row * c; found[p].
   Returns 0, or -1 when its scratch could not be allocated. */
int scan_part(const pass_args *a, int64_t p) {
    int64_t step = (a->r + a->parts - 1) / a->parts, r0 = p * step;
    int64_t r1 = r0 + step < a->r ? r0 + step : a->r, nbl = (a->c + BLOCK - 1) / BLOCK;
    row_scratch s;
    int status = 0;
    a->found[p] = 0;
    if (r0 >= r1) return 0;
    s.acc = aligned_alloc(64, (size_t)(a->t + 1) * LANES * sizeof(int32_t));
    s.bmax = malloc((size_t)(nbl + 5 * a->kk + 1) * sizeof(float));
    s.cand_c = malloc((size_t)(4 * a->kk + 1) * sizeof(int64_t));
    s.widened = a->dtype ? malloc((size_t)(a->c + 1) * sizeof(float)) : NULL;
    if (s.acc && s.bmax && s.cand_c && (s.widened || !a->dtype)) {
        s.bsel = s.bmax + nbl;
        s.cand_v = s.bsel + a->kk;
        fp_mode saved = ieee_mode();  /* comparisons see subnormals as they are */
        a->found[p] = scan_rows(a, r0, r1, &s, a->pos + r0 * a->c);
        restore_mode(saved);
    } else {
        status = -1;
    }
    free(s.acc);
    free(s.bmax);
    free(s.cand_c);
    free(s.widened);
    return status;
}

/* Every part, on the process's OpenMP team (torch's own); -1 if any part failed. */
int scan_team(const pass_args *a, int threads) {
    int64_t p;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : status)
#endif
    for (p = 0; p < a->parts; p++) {
        int part = scan_part(a, p);
        status = part < status ? part : status;
    }
    (void)threads;
    return status;
}
"""
)


class PassArgs(ctypes.Structure):
    """``pass_args`` in the C source, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("dtype", ctypes.c_int64),
        ("ldx", ctypes.c_int64),
        ("r", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("lo", ctypes.c_void_p),
        ("hi", ctypes.c_void_p),
        ("t", ctypes.c_int64),
        ("kk", ctypes.c_int64),
        ("row_max", ctypes.c_void_p),
        ("row_min", ctypes.c_void_p),
        ("sumexp", ctypes.c_void_p),
        ("blocks", ctypes.c_void_p),
        ("above", ctypes.c_void_p),
        ("pos", ctypes.c_void_p),
        ("found", ctypes.c_void_p),
        ("top_v", ctypes.c_void_p),
        ("top_c", ctypes.c_void_p),
        ("parts", ctypes.c_int64),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    args = ctypes.POINTER(PassArgs)
    lib.scan_part.restype = lib.scan_team.restype = i32
    lib.scan_part.argtypes = [args, i64]
    lib.scan_team.argtypes = [args, i32]
    lib.exp_many.restype = None
    lib.exp_many.argtypes = [p, i64, p]


#: The loop never reads the FP exception flags: without ``-fno-trapping-math`` the compiler
#: may not compute both sides of a select, and left the AVX2 clone's exp-sum scalar (7.8
#: against 2.0 ms a block). Values are unchanged: no contraction, no reassociation.
LIBRARY = native.Library("lens_pass", SOURCE, _declare, flags=("-fno-trapping-math",))


#: The logits' types the loop reads (bf16 and fp16 ones, from rank-free calls' GEMMs, are
#: widened to fp32 exactly, as the compiled pass's comparisons and exp-sums do).
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(values: torch.Tensor) -> bool:
    """Whether the loop takes these logits: fp32, bf16 or fp16 on the CPU."""
    return values.device.type == "cpu" and values.dtype in DTYPES


def block_pass(
    values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, kk: int = 0
) -> tuple[torch.Tensor, ...]:
    """``(row_max, row_min, sumexp, blocks, above, rows, cols, top_v, top_c)`` of ``values``
    [R, C]: ``blocks`` [R, C / BLOCK] the block maxima (``[R, 0]`` unless C is a
    multiple), ``above[r, t]`` (int32) the entries strictly above ``hi[r, t]``, ``(rows,
    cols)`` every entry inside some ``[lo[r, t], hi[r, t]]``, row-major, and ``top_v`` /
    ``top_c`` [R, kk] the values and columns of ``kk`` (at most :data:`MAX_KK`) largest
    entries of each row (in any order; every entry left out is <= each one kept, as
    ``topk.block_topk`` promises). ``lo``/``hi``: fp32 [R, T] (T may be 0). Logits
    holding NaN are refused (the lens's never do: its rows and W are finite). Raises
    :class:`~.native.KernelUnavailable` when the loop cannot be built.
    """
    if not supports(values) or values.dim() != 2:
        raise TypeError(
            f"block_pass takes fp32, bf16 or fp16 CPU logits [R, C], not {values.dtype} "
            f"{list(values.shape)}"
        )
    r, c = values.shape
    if lo.dim() != 2 or lo.shape[0] != r or hi.shape != lo.shape:
        raise ValueError(f"lo and hi must be [{r}, T], not {list(lo.shape)} and {list(hi.shape)}")
    if not 0 <= kk <= min(c, MAX_KK):
        raise ValueError(f"kk must be within [0, {min(c, MAX_KK)}], not {kk}")
    if lo.dtype != torch.float32 or hi.dtype != torch.float32:
        raise TypeError(f"lo and hi must be fp32 (the logits' type), not {lo.dtype} and {hi.dtype}")
    t = lo.shape[1]
    values = values if values.stride(1) == 1 else values.contiguous()
    lo, hi = lo.contiguous(), hi.contiguous()
    if not bool((lo <= hi).all()):  # the loop counts the bands holding an entry
        raise ValueError("every band needs lo <= hi (and neither NaN)")
    row_max, row_min, sumexp = (torch.empty(r) for _ in range(3))
    n_blocks = c // BLOCK if c % BLOCK == 0 else 0
    blocks = torch.empty(r, n_blocks)
    above = torch.zeros(r, t, dtype=torch.int32)
    top_v, top_c = torch.empty(r, kk), torch.empty(r, kk, dtype=torch.int64)
    none = torch.empty(0, dtype=torch.long)
    if r == 0:
        row_max, row_min, blocks, top_v = _in_type(values.dtype, row_max, row_min, blocks, top_v)
        return row_max, row_min, sumexp, blocks, above, none, none, top_v, top_c
    lib = LIBRARY.get()
    parts = max(1, min(torch.get_num_threads(), r))
    pos = torch.empty(r * c, dtype=torch.int64)  # untouched pages are never faulted in
    found = torch.zeros(parts, dtype=torch.int64)
    args = PassArgs(
        values.data_ptr(), DTYPES[values.dtype], values.stride(0), r, c,
        lo.data_ptr(), hi.data_ptr(), t, kk,
        row_max.data_ptr(), row_min.data_ptr(), sumexp.data_ptr(),
        blocks.data_ptr() if n_blocks else None, above.data_ptr(), pos.data_ptr(),
        found.data_ptr(), top_v.data_ptr(), top_c.data_ptr(), parts,
    )  # fmt: skip
    ref = ctypes.byref(args)
    codes = LIBRARY.split(
        parts, lambda threads: lib.scan_team(ref, threads), lambda p: lib.scan_part(ref, p)
    )
    if any(codes):
        raise MemoryError("the lens pass could not allocate its scratch")
    bad = torch.isnan(sumexp).nonzero()  # a NaN logit makes its row's exp-sum NaN
    if len(bad):
        raise ValueError(
            f"the logits hold NaN (row {int(bad[0])} of {r}): no maxima, ranks or top-k"
        )
    step = -(-r // parts)
    listed = torch.cat(
        [pos[p * step * c : p * step * c + int(n)] for p, n in enumerate(found.tolist())]
    )
    row_max, row_min, blocks, top_v = _in_type(values.dtype, row_max, row_min, blocks, top_v)
    return row_max, row_min, sumexp, blocks, above, listed // c, listed % c, top_v, top_c


def _in_type(dtype: torch.dtype, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fp32 maxima and top values in the logits' own type, as the compiled pass gives
    them (exact: each is one of the logits)."""
    return tuple(v.to(dtype) for v in values)


def exp(x: torch.Tensor) -> torch.Tensor:
    """The loop's own ``exp`` of fp32 ``x`` (what its exp-sums add up)."""
    x = x.float().contiguous().cpu()
    out = torch.empty_like(x)
    LIBRARY.get().exp_many(x.data_ptr(), x.numel(), out.data_ptr())
    return out
