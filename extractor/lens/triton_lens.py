"""The fused lens as a Triton kernel: tiled GEMM, online log-sum-exp, ranks, top-k.

One program owns a block of rows and a contiguous share ("split") of the
vocabulary tiles. Tiles never straddle a segment boundary (the host builds a
tile table from the segment runs), so each tile updates one segment's state:

* fast logits accumulated in fp32 in ``BK``-wide slices (the matrix unit's own
  accumulation spans one slice), within a proven band of the exact ones
  (:func:`~.exact.mma_error_factor`);
* online max / sum-exp per segment, in fp32 registers [rows, segments];
* rank counts: entries certainly above each target's exact logit (above its band),
  the target's own column excluded; entries inside the band are written to one
  buffer (an atomic counter hands out slots);
* a per-segment candidate buffer of the best ``KP`` fast logits (``KP >= k + 4``),
  filled by repeatedly taking the tile's row maxima only while some row still has a
  value above its buffer's minimum; or, with ``GROUP > 0``, no buffer: the maximum of
  every ``GROUP`` columns is written out, and the host recomputes the best groups.

The host merges the splits (log-sum-exp of maxima/sums, sums of counts), decides the
in-band entries in float64 with the same arithmetic as the targets (ties never push a
rank down), recomputes the candidates exactly and certifies each top-k list like the
torch engine; a row whose list cannot be certified is redone by the torch engine.
Max-pooled word statistics run through the torch engine on the pooled rows only.

Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (fp32/fp16;
the interpreter mishandles bf16), which is how CI checks its logic.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .chunked import best_of_segments, chunked_lens, logit_reach, normed_rows
from .contract import LensError, LensInputs, LensResult, validate
from .exact import (
    MMA_BLOCK_K,
    bias_abs_max,
    entry_logits,
    error_band,
    exact_order,
    mma_error_factor,
    target_logits,
    thresholds,
    unembed_norm_max,
)

#: A constexpr, not a plain global: compiled kernels may only read constexpr globals
#: (the interpreter reads any global; only a real compile refuses a plain one).
KERNEL_NEG_INF = tl.constexpr(float("-inf"))
NEG_INF = float("-inf")


#: Tile sizes the launcher uses on CUDA (the AOT compile test builds exactly these).
#: BN 64 measured 1.5x faster than 128 on an H200 (bench/README.md, "The lens on a GPU").
CUDA_BLOCKS = {"BM": 64, "BN": 64, "BK": MMA_BLOCK_K}
#: Smaller tiles under TRITON_INTERPRET=1, where every program runs in Python.
INTERPRETER_BLOCKS = {"BM": 16, "BN": 32, "BK": 16}
#: Column-group width of the kernel's "groups" candidates (:func:`triton_lens`): 8 was 10%
#: faster than 16 at the worker's call on an H200 (bench/README.md).
CANDIDATE_GROUP = 8
#: The kernel's two ways to find top-k candidates: both exact (tests/test_lens_triton.py);
#: bench/gpu_lens.py times them on a GPU.
KERNEL_MODES = {"buffer": {"candidates": "buffer"}, "groups": {"candidates": "groups"}}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


# One function of ~130 lines on purpose: it is the GPU program, whose loop over vocabulary
# tiles keeps every per-row accumulator (max, sum, candidates, counts) in registers; split
# into @triton.jit helpers it would pass those tiles through calls the compiler may not
# inline, and only an ahead-of-time compile (tests/test_lens_triton_aot.py) and a real GPU
# can check the result.
@triton.jit
def _lens_tiles_kernel(
    H,  # [N, D] normed hidden, compute dtype
    W,  # [V, D] unembedding
    BIAS,  # [V] fp32 (or dummy)
    TGT_IDS,  # [N, T] int64 (-1 pads)
    TGT_LO,  # [N, T] fp32: below this an entry is certainly not above the exact target
    TGT_HI,  # [N, T] fp32: above this an entry is certainly above it
    TILE_START,  # [n_tiles] int32
    TILE_STOP,  # [n_tiles] int32
    TILE_SEG,  # [n_tiles] int32
    OUT_MAX,  # [splits, N, SP] fp32
    OUT_SUM,  # [splits, N, SP] fp32
    OUT_CV,  # [splits, N, SP * KP] fp32
    OUT_CI,  # [splits, N, SP * KP] int64
    OUT_CNT,  # [splits, N, SP * TP] int32
    OUT_GMAX,  # [N, n_tiles * (BN // GROUP)] fp32: column groups' maxima (GROUP > 0)
    AMB_COUNT,  # [1] int32: in-band entries found (may exceed AMB_CAP)
    AMB_ROW,  # [AMB_CAP] int32 row of each in-band entry
    AMB_COL,  # [AMB_CAP] int32 column
    AMB_VAL,  # [AMB_CAP] fp32 its fast logit
    AMB_CAP,
    N,
    D,
    n_tiles,
    tiles_per_split,
    softcap,
    zero,  # 0.0, passed at run time (see the K-slice loop)
    T: tl.constexpr,
    TP: tl.constexpr,
    SP: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    seg_cols = tl.arange(0, SP)
    cand_cols = tl.arange(0, SP * KP)
    cnt_cols = tl.arange(0, SP * TP)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)

    m_state = tl.full((BM, SP), KERNEL_NEG_INF, tl.float32)
    l_state = tl.zeros((BM, SP), tl.float32)
    cand_v = tl.full((BM, SP * KP), KERNEL_NEG_INF, tl.float32)
    cand_i = tl.full((BM, SP * KP), -1, tl.int64)
    counts = tl.zeros((BM, SP * TP), tl.int32)

    # int64 row and column offsets: a worker's call can hold N x d >= 2^31 elements (33
    # layers x 16k positions x d = 4096), where int32 offsets would wrap and read garbage.
    h_rows = H + rows.to(tl.int64)[:, None] * D
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    for t in range(first, last):
        start = tl.load(TILE_START + t)
        stop = tl.load(TILE_STOP + t)
        seg = tl.load(TILE_SEG + t)
        cols = start + offs_n
        col_ok = cols < stop
        w_cols = W + cols.to(tl.int64)[:, None] * D

        # K-sliced: each BK-wide slice's dot starts from zero and is added in IEEE fp32, so
        # the matrix unit's own (truncating) accumulation spans BK products, not D
        # (exact.mma_error_factor: a band ~9x narrower at d = 576). One chained accumulation
        # measured no faster on an H200 and put 9x more entries in band (bench/README.md).
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + offs_k
            h = tl.load(
                h_rows + ks[None, :],
                mask=row_ok[:, None] & (ks[None, :] < D),
                other=0.0,
            )
            w = tl.load(
                w_cols + ks[None, :],
                mask=col_ok[:, None] & (ks[None, :] < D),
                other=0.0,
            )
            # IEEE fp32 products for fp32 inputs (Triton's default there is TF32). The
            # slice starts from a zero the compiler cannot see (``zero``, a runtime 0.0):
            # from a constant zero it folds ``acc + dot`` back into one accumulation.
            fresh = tl.full((BM, BN), zero, tl.float32)
            acc += tl.dot(h, tl.trans(w), fresh, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_SOFTCAP:
            acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
        acc = tl.where(col_ok[None, :], acc, KERNEL_NEG_INF)

        # Online log-sum-exp of this tile's segment.
        in_seg = seg_cols[None, :] == seg
        m_old = tl.max(tl.where(in_seg, m_state, KERNEL_NEG_INF), axis=1)
        l_old = tl.sum(tl.where(in_seg, l_state, 0.0), axis=1)
        m_new = tl.maximum(m_old, tl.max(acc, axis=1))
        m_safe = tl.where(m_new == KERNEL_NEG_INF, 0.0, m_new)
        l_new = l_old * tl.exp(m_old - m_safe) + tl.sum(tl.exp(acc - m_safe[:, None]), axis=1)
        m_state = tl.where(in_seg, m_new[:, None], m_state)
        l_state = tl.where(in_seg, l_new[:, None], l_state)

        # Ranks: entries certainly above each target (own column excluded) are counted;
        # those inside its band are written out for the host to decide exactly.
        near = tl.zeros((BM, BN), tl.int32)
        for j in tl.static_range(T):
            tid = tl.load(TGT_IDS + rows * T + j, mask=row_ok, other=-1)
            t_lo = tl.load(TGT_LO + rows * T + j, mask=row_ok, other=float("inf"))
            t_hi = tl.load(TGT_HI + rows * T + j, mask=row_ok, other=float("inf"))
            other = (cols[None, :] != tid[:, None]) & col_ok[None, :]
            above = (acc > t_hi[:, None]) & other
            c = tl.sum(above.to(tl.int32), axis=1)
            counts += tl.where(cnt_cols[None, :] == seg * TP + j, c[:, None], 0)
            inside = (acc >= t_lo[:, None]) & (acc <= t_hi[:, None]) & other
            near = tl.maximum(near, inside.to(tl.int32))
        if T > 0:
            row_near = tl.sum(near, axis=1)
            n_near = tl.sum(row_near, axis=0)
            if n_near > 0:
                base = tl.atomic_add(AMB_COUNT, n_near)
                slot = base + (tl.cumsum(row_near, axis=0) - row_near)[:, None]
                slot += tl.cumsum(near, axis=1) - near
                keep = (near > 0) & (slot < AMB_CAP)
                tl.store(AMB_ROW + slot, rows[:, None] + 0 * offs_n[None, :], mask=keep)
                tl.store(AMB_COL + slot, cols[None, :] + 0 * rows[:, None], mask=keep)
                tl.store(AMB_VAL + slot, acc, mask=keep)

        if GROUP > 0:
            # Candidates as column groups' maxima: the host picks the best groups.
            gmax = tl.max(tl.reshape(acc, (BM, BN // GROUP, GROUP)), axis=2)
            gcols = t * (BN // GROUP) + tl.arange(0, BN // GROUP)
            gbase = rows.to(tl.int64) * n_tiles * (BN // GROUP)
            tl.store(OUT_GMAX + gbase[:, None] + gcols[None, :], gmax, mask=row_ok[:, None])
        else:
            # Candidates: insert the tile's best entries while they beat the buffer.
            in_buf = (cand_cols[None, :] // KP) == seg
            alive = col_ok[None, :] & row_ok[:, None]
            buf_min = tl.min(tl.where(in_buf, cand_v, float("inf")), axis=1)
            buf_pos = tl.argmin(tl.where(in_buf, cand_v, float("inf")), axis=1)
            free_slot = tl.max(tl.where(in_buf & (cand_i < 0), 1, 0), axis=1) > 0
            work = tl.where(alive, acc, KERNEL_NEG_INF)
            best = tl.max(work, axis=1)
            has_alive = tl.max(alive.to(tl.int32), axis=1) > 0
            want = has_alive & ((best > buf_min) | free_slot)
            go = tl.max(want.to(tl.int32), axis=0)
            while go > 0:
                arg = tl.argmax(tl.where(alive, work, KERNEL_NEG_INF), axis=1)
                # With every live value at -inf argmax may land on a dead column: pick the
                # first live one instead, so -inf logits still fill a small segment's slots.
                first_alive = tl.argmax(alive.to(tl.int32), axis=1)
                arg = tl.where(best == KERNEL_NEG_INF, first_alive, arg)
                free_pos = tl.argmax(tl.where(in_buf & (cand_i < 0), 1, 0), axis=1)
                pos = tl.where(free_slot, free_pos, buf_pos)
                hit = (cand_cols[None, :] == pos[:, None]) & want[:, None]
                cand_v = tl.where(hit, best[:, None], cand_v)
                cand_i = tl.where(hit, (start + arg).to(tl.int64)[:, None], cand_i)
                taken = (offs_n[None, :] == arg[:, None]) & want[:, None]
                alive = alive & ~taken
                work = tl.where(alive, work, KERNEL_NEG_INF)
                buf_min = tl.min(tl.where(in_buf, cand_v, float("inf")), axis=1)
                buf_pos = tl.argmin(tl.where(in_buf, cand_v, float("inf")), axis=1)
                free_slot = tl.max(tl.where(in_buf & (cand_i < 0), 1, 0), axis=1) > 0
                best = tl.max(work, axis=1)
                has_alive = tl.max(alive.to(tl.int32), axis=1) > 0
                want = has_alive & ((best > buf_min) | free_slot)
                go = tl.max(want.to(tl.int32), axis=0)

    base = pid_s * N + rows
    tl.store(OUT_MAX + base[:, None] * SP + seg_cols[None, :], m_state, mask=row_ok[:, None])
    tl.store(OUT_SUM + base[:, None] * SP + seg_cols[None, :], l_state, mask=row_ok[:, None])
    if GROUP == 0:
        cv_at = OUT_CV + base[:, None] * (SP * KP) + cand_cols[None, :]
        tl.store(cv_at, cand_v, mask=row_ok[:, None])
        ci_at = OUT_CI + base[:, None] * (SP * KP) + cand_cols[None, :]
        tl.store(ci_at, cand_i, mask=row_ok[:, None])
    tl.store(OUT_CNT + base[:, None] * (SP * TP) + cnt_cols[None, :], counts, mask=row_ok[:, None])


def _tile_table(inputs: LensInputs, tile: int, device) -> tuple[torch.Tensor, ...]:
    starts, stops, segs = [], [], []
    for a, b, s in inputs.resolved_segments().runs():
        for c in range(a, b, tile):
            starts.append(c)
            stops.append(min(b, c + tile))
            segs.append(s)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(starts), as_t(stops), as_t(segs)


@torch.no_grad()
def triton_lens(
    inputs: LensInputs,
    *,
    row_chunk: int | None = None,
    vocab_chunk: int | None = None,
    block_m: int = CUDA_BLOCKS["BM"],
    block_n: int = CUDA_BLOCKS["BN"],
    block_k: int = CUDA_BLOCKS["BK"],
    splits: int | None = None,
    compile: bool = True,
    refine: bool = True,
    candidates: str = "buffer",
    group_width: int | None = None,
) -> LensResult:
    """The fused lens through the Triton kernel (CUDA, or the interpreter on CPU).

    Exact like the torch engine (docs/lens.md): the kernel counts entries certainly above
    each target and writes out those inside its proven band, which the host decides in
    float64; top-k candidates are recomputed exactly and certified, and a row that cannot
    be certified is redone by the torch engine. ``refine=False`` skips both (ranks only
    as good as fp32; tests use it to show what the refinement is for). ``compile`` and the
    chunk sizes go to the torch engine, which computes the pooled rows.

    Two ways to find top-k candidates, both exact: ``"buffer"``, each program keeps its
    best ``k + 4`` fast logits per segment (an insertion loop in the kernel); ``"groups"``,
    the kernel writes each column group's maximum and the host recomputes the best groups
    exactly (bench/README.md compares them on an H200). ``group_width``: columns per group
    (a power of two dividing the tile; default :data:`CANDIDATE_GROUP`): narrower groups,
    more maxima written, fewer entries recomputed.
    """
    if candidates not in ("buffer", "groups"):
        raise ValueError(f"candidates must be 'buffer' or 'groups', not {candidates!r}")
    validate(inputs)
    device = inputs.unembed.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        raise LensError("the Triton lens needs CUDA tensors (or TRITON_INTERPRET=1)")
    if interpret:
        block_m, block_n, block_k = (INTERPRETER_BLOCKS[x] for x in ("BM", "BN", "BK"))
    group = (group_width or CANDIDATE_GROUP) if candidates == "groups" else 0
    if group and (block_n % group or group & (group - 1)):
        raise ValueError(f"group_width {group} must be a power of two dividing {block_n}")
    n, d, k = inputs.n_rows, inputs.unembed.shape[1], inputs.k
    segments = inputs.resolved_segments()
    targets = inputs.resolved_targets().to(device).long().contiguous()
    t = targets.shape[1]
    shape = _Shape(
        n=n,
        d=d,
        t=t,
        tp=_next_pow2(max(t, 1)),
        sp=_next_pow2(len(segments.names)),
        kp=_next_pow2(k + TOPK_MARGIN),
        bm=block_m,
        bn=block_n,
        bk=block_k,
        group=group,
    )
    h = normed_rows(inputs).contiguous()
    # The kernel accumulates in fp32: rows or W of extreme magnitude are refused, as by
    # the torch engine, rather than overflow into NaN ranks.
    logit_reach(h, [unembed_norm_max(inputs.unembed, 0, inputs.vocab_size)])
    t64 = target_logits(h, targets, inputs)
    band = (
        _band(inputs, h, block_k) if refine else torch.zeros(n, dtype=torch.float64, device=device)
    )
    lo, hi = thresholds(t64, band)
    out = _launch(inputs, h, targets, lo.contiguous(), hi.contiguous(), shape, splits)
    lse, seg_lse, counts = _merge_splits(out, len(segments.names), t)
    if refine:
        counts += _resolve_band(inputs, h, targets, t64, lo, hi, out, segments)
    certify = _certified_groups if group else _certified_topk
    seg_ids, seg_vals, certified = certify(inputs, h, out, band, len(segments.names))
    fields = _segment_results(
        segments.names, k, targets, t64, lse, seg_lse, seg_ids, seg_vals, counts
    )
    if refine:
        _redo_rows(fields, inputs, h, torch.nonzero(~certified).flatten(), compile)
    return LensResult(**fields, **_pooled(inputs, h, row_chunk, vocab_chunk, compile))


#: Candidate slots per segment and split beyond k: the host certifies top-k from them.
TOPK_MARGIN = 4
#: Room for in-band entries per row in the first launch (a second launch makes room for all).
IN_BAND_PER_ROW = 64


@dataclass(frozen=True)
class _Shape:
    """Sizes of one launch: rows, width, targets (and their power of two), segment and
    top-k slots (powers of two), and the kernel's block sizes."""

    n: int
    d: int
    t: int
    tp: int
    sp: int
    kp: int
    bm: int
    bn: int
    bk: int
    group: int = 0  # > 0: column groups' maxima instead of candidate buffers
    warps: int = 4  # Triton's defaults; bench/gpu_lens.py sweeps them
    stages: int = 3


@dataclass(frozen=True)
class _KernelOut:
    """Each split's partial maxima, sums, candidates (values, ids) and counts, and the
    in-band entries (rows, columns, fast logits) of all splits."""

    max: torch.Tensor  # [splits, N, SP]
    sum: torch.Tensor  # [splits, N, SP]
    cand_v: torch.Tensor  # [splits, N, SP * KP]
    cand_i: torch.Tensor  # [splits, N, SP * KP]
    counts: torch.Tensor  # [splits, N, SP * TP] int32
    near_rows: torch.Tensor  # [E] int64
    near_cols: torch.Tensor  # [E] int64
    near_fast: torch.Tensor  # [E] fp32
    gmax: torch.Tensor | None = None  # [N, groups] fp32 (group mode)
    groups: tuple[torch.Tensor, ...] = ()  # each group's first column, length, segment (CPU)


def _band(inputs: LensInputs, h: torch.Tensor, block_k: int) -> torch.Tensor:
    """Per-row half-width of the kernel's fast logits around the exact ones (float64)."""
    v, d = inputs.vocab_size, inputs.unembed.shape[1]
    return error_band(
        h.double().norm(dim=1),
        unembed_norm_max(inputs.unembed, 0, v),
        d,
        bias_abs_max(inputs.bias, 0, v),
        inputs.softcap,
        factor=mma_error_factor(d, block_k),
    )


def _launch(inputs: LensInputs, h, targets, lo, hi, shape: _Shape, splits: int | None):
    """Run the kernel over every (row block, vocabulary split): a :class:`_KernelOut`.

    In-band entries go to one shared buffer through an atomic counter; if it overflows,
    the kernel runs once more with room for every one it counted.
    """
    device, w = inputs.unembed.device, inputs.unembed.contiguous()
    starts, stops, segs = _tile_table(inputs, shape.bn, device)
    n, n_tiles = shape.n, len(starts)
    row_blocks = triton.cdiv(max(n, 1), shape.bm)
    if splits is None:
        # Enough programs to fill the GPU, each still walking many tiles.
        splits = max(1, min(n_tiles, 4 * 132 // row_blocks)) if device.type == "cuda" else 2
    tiles_per_split = triton.cdiv(max(n_tiles, 1), splits)
    splits = triton.cdiv(max(n_tiles, 1), tiles_per_split)
    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    bias = inputs.bias.float().contiguous() if inputs.bias is not None else torch.zeros(1, **f32)
    cap = max(1, IN_BAND_PER_ROW * n)
    # Group mode keeps no candidate buffers (the kernel never touches these then).
    cands = (splits, n, shape.sp * shape.kp) if not shape.group else (1, 1, 1)
    per_tile = shape.bn // shape.group if shape.group else 0
    while True:
        out = _KernelOut(
            max=torch.full((splits, n, shape.sp), NEG_INF, **f32),
            sum=torch.zeros((splits, n, shape.sp), **f32),
            cand_v=torch.full(cands, NEG_INF, **f32),
            cand_i=torch.full(cands, -1, dtype=torch.long, device=device),
            counts=torch.zeros((splits, n, shape.sp * shape.tp), **i32),
            near_rows=torch.empty(cap, **i32),
            near_cols=torch.empty(cap, **i32),
            near_fast=torch.empty(cap, **f32),
            gmax=torch.empty((n, n_tiles * per_tile) if per_tile else (1,), **f32),
            groups=_group_table(inputs, shape.bn, shape.group) if per_tile else (),
        )
        found = torch.zeros(1, **i32)
        if n and n_tiles:
            _lens_tiles_kernel[(row_blocks, splits)](
                h,
                w,
                bias,
                targets.clamp(min=-1),
                lo,
                hi,
                starts,
                stops,
                segs,
                out.max,
                out.sum,
                out.cand_v,
                out.cand_i,
                out.counts,
                out.gmax,
                found,
                out.near_rows,
                out.near_cols,
                out.near_fast,
                cap,
                n,
                shape.d,
                n_tiles,
                tiles_per_split,
                float(inputs.softcap or 1.0),
                0.0,
                T=shape.t,
                TP=shape.tp,
                SP=shape.sp,
                KP=shape.kp,
                HAS_BIAS=inputs.bias is not None,
                HAS_SOFTCAP=inputs.softcap is not None,
                BM=shape.bm,
                BN=shape.bn,
                BK=shape.bk,
                GROUP=shape.group,
                DOT_PRECISION="ieee",
                num_warps=shape.warps,
                num_stages=shape.stages,
            )
        total = int(found)
        if total <= cap:
            return replace(
                out,
                near_rows=out.near_rows[:total].long(),
                near_cols=out.near_cols[:total].long(),
                near_fast=out.near_fast[:total],
            )
        cap = total


def _merge_splits(out: _KernelOut, n_seg: int, t: int):
    """The splits' partial log-sum-exps and counts merged per row and segment:
    (log-sum-exp [N], segment log-sum-exp [N, S], counts [N, S, T])."""
    n, sp = out.max.shape[1:]
    tp = out.counts.shape[2] // sp
    seg_max = out.max.amax(0)  # [N, SP]
    safe = torch.where(torch.isfinite(seg_max), seg_max, 0)
    seg_sum = (out.sum * torch.exp(out.max - safe)).nan_to_num(0.0).sum(0)
    seg_lse = torch.where(torch.isfinite(seg_max), safe + torch.log(seg_sum), NEG_INF)[:, :n_seg]
    lse = torch.logsumexp(seg_lse, dim=1)
    counts = out.counts.long().sum(0).reshape(n, sp, tp)[:, :n_seg, :t]
    return lse, seg_lse, counts


def _resolve_band(inputs, h, targets, t64, lo, hi, out: _KernelOut, segments) -> torch.Tensor:
    """Counts [N, S, T] of in-band entries whose exact logit is strictly above the target's.

    Each entry is classified against each target of its row with the same fp32 fast
    value and thresholds the kernel used, so nothing is counted twice or missed.
    """
    n, t = targets.shape
    add = torch.zeros((n, len(segments.names), t), dtype=torch.long, device=h.device)
    rows, cols, fast = out.near_rows, out.near_cols, out.near_fast
    if not len(rows) or not t:
        return add
    exact = entry_logits(h, rows, cols, inputs)
    fast = fast[:, None]
    inside = (fast >= lo[rows]) & (fast <= hi[rows]) & (cols[:, None] != targets[rows])
    e, j = torch.nonzero(inside & (exact[:, None] > t64[rows]), as_tuple=True)
    seg = segments.index.to(h.device)[cols[e]]
    add.index_put_((rows[e], seg, j), torch.ones_like(e), accumulate=True)
    return add


def _certified_topk(inputs, h, out: _KernelOut, band, n_seg: int):
    """Each segment's exact top-k (ids, float64 values) from the splits' candidates, and
    which rows are certified: every entry left out of a split's full candidate buffer has
    a fast logit at most the buffer's lowest, so an exact value at most that plus the
    band; the list stands when its k-th exact value is strictly above every such bound."""
    splits, n, _ = out.cand_v.shape
    sp, k = out.max.shape[2], inputs.k
    kp = out.cand_v.shape[2] // sp
    vals = out.cand_v.view(splits, n, sp, kp)[:, :, :n_seg]
    ids = out.cand_i.view(splits, n, sp, kp)[:, :, :n_seg]
    full = (ids >= 0).all(-1)  # [splits, N, S]
    left = torch.where(full, vals.amin(-1), NEG_INF).amax(0).double()  # [N, S]
    ids = ids.permute(1, 2, 0, 3).reshape(n, n_seg, splits * kp)
    valid = ids >= 0
    exact = torch.full(ids.shape, NEG_INF, dtype=torch.float64, device=h.device)
    r, s, c = torch.nonzero(valid, as_tuple=True)
    exact[r, s, c] = entry_logits(h, r, ids[r, s, c], inputs)
    seg_ids, seg_vals = {}, {}
    certified = torch.ones(n, dtype=torch.bool, device=h.device)
    for seg in range(n_seg):
        order = exact_order(exact[:, seg], ids[:, seg])[:, :k]
        top_ids = ids[:, seg].gather(1, order)
        top_vals = torch.where(top_ids >= 0, exact[:, seg].gather(1, order), NEG_INF)
        top_ids, top_vals = _pad_to_k(top_ids, top_vals, k)
        seg_ids[seg], seg_vals[seg] = top_ids, top_vals
        kth = top_vals[:, k - 1]
        certified &= ~full[:, :, seg].any(0) | (kth > left[:, seg] + band)
    return seg_ids, seg_vals, certified


def _group_table(inputs: LensInputs, tile: int, group: int) -> tuple[torch.Tensor, ...]:
    """Each column group's first column, length (0 past its tile's end) and segment, in
    the order the kernel writes their maxima (CPU tensors: the host plans with them)."""
    starts, stops, segs = (x.long() for x in _tile_table(inputs, tile, "cpu"))
    first = (starts[:, None] + torch.arange(0, tile, group)).flatten()
    length = (stops.repeat_interleave(tile // group) - first).clamp(0, group)
    return first, length, segs.repeat_interleave(tile // group)


def _certified_groups(inputs, h, out: _KernelOut, band, n_seg: int):
    """Each segment's exact top-k from the best column groups, and which rows are certified.

    The ``k + 4`` groups with the largest fast maxima are recomputed exactly; every other
    entry has a fast logit at most the next group's maximum, so an exact value at most that
    plus the band: the list stands when its k-th exact value is strictly above that bound
    (or when every non-empty group of the segment was taken).
    """
    n, k, device = out.gmax.shape[0], inputs.k, h.device
    first, length, seg_of = out.groups
    group = int(length.max()) if len(length) else 1  # host tensors: no sync
    within = torch.arange(group, device=device)
    real = length > 0  # groups past their tile's end are empty (max -inf, no entries)
    first, length = first.to(device), length.to(device)
    runs = _column_runs(seg_of)
    seg_ids, seg_vals = {}, {}
    certified = torch.ones(n, dtype=torch.bool, device=device)
    for seg in range(n_seg):
        total = sum(b - a for a, b in runs.get(seg, []))
        nonempty = sum(int(real[a:b].sum()) for a, b in runs.get(seg, []))
        take = min(k + TOPK_MARGIN, total)
        if not nonempty or not n:
            seg_ids[seg], seg_vals[seg] = _pad_to_k(
                torch.empty((n, 0), dtype=torch.long, device=device),
                torch.empty((n, 0), dtype=torch.float64, device=device),
                k,
            )
            continue
        fast, pos = _best_groups(out.gmax, runs[seg], take + 1)
        sel = pos[:, :take]  # the groups' columns in gmax
        start = first[sel][..., None]  # [N, take, 1]
        valid = (within < length[sel][..., None]).reshape(n, -1)
        ids = (start + within).reshape(n, -1)
        rows = torch.arange(n, device=device).repeat_interleave(ids.shape[1])
        # A real column in every slot: a taken group may be empty (tied at -inf), and its
        # first column may lie past the vocabulary.
        safe = torch.where(valid, ids, 0)
        exact = entry_logits(h, rows, safe.flatten(), inputs)
        ids = torch.where(valid, ids, -1)
        exact = torch.where(valid, exact.view(n, -1), NEG_INF)
        order = exact_order(exact, ids)[:, :k]
        top_ids, top_vals = ids.gather(1, order), exact.gather(1, order)
        top_vals = torch.where(top_ids >= 0, top_vals, NEG_INF)
        seg_ids[seg], seg_vals[seg] = _pad_to_k(top_ids, top_vals, k)
        if total > take:
            # Certain when every non-empty group was taken (a segment of few entries over
            # many tiles), else when nothing left out can reach the k-th value.
            every = (length[sel] > 0).sum(1) == nonempty
            certified &= every | (seg_vals[seg][:, k - 1] > fast[:, take].double() + band)
    return seg_ids, seg_vals, certified


def _column_runs(seg_of: torch.Tensor) -> dict[int, list[tuple[int, int]]]:
    """Each segment's runs of consecutive group columns (tiles follow the segment runs)."""
    change = (torch.nonzero(seg_of[1:] != seg_of[:-1]).flatten() + 1).tolist()
    bounds = [0, *change, len(seg_of)]
    runs: dict[int, list[tuple[int, int]]] = {}
    for a, b in itertools.pairwise(bounds):
        if b > a:
            runs.setdefault(int(seg_of[a]), []).append((a, b))
    return runs


def _best_groups(gmax: torch.Tensor, runs: list[tuple[int, int]], m: int):
    """The ``m`` largest group maxima over ``runs`` of columns and their columns, each run
    read through a slice (no copy of the maxima), sorted descending."""
    values, columns = [], []
    for a, b in runs:
        v, p = gmax[:, a:b].topk(min(m, b - a), dim=1)
        values.append(v)
        columns.append(p + a)
    values, columns = torch.cat(values, 1), torch.cat(columns, 1)
    if len(runs) > 1:
        values, order = values.topk(min(m, values.shape[1]), dim=1)
        columns = columns.gather(1, order)
    return values, columns


def _pad_to_k(ids: torch.Tensor, vals: torch.Tensor, k: int):
    """A segment's top list padded to ``k`` slots (id -1, value -inf) when it holds fewer."""
    if ids.shape[1] >= k:
        return ids, vals
    pad = k - ids.shape[1]
    return (
        torch.nn.functional.pad(ids, (0, pad), value=-1),
        torch.nn.functional.pad(vals, (0, pad), value=NEG_INF),
    )


def _segment_results(names, k: int, targets, t64, lse, seg_lse, seg_ids, seg_vals, counts) -> dict:
    """The per-row result fields from exact per-segment top-k lists and exact counts."""
    pad = targets < 0
    lse64 = lse.double()[:, None]
    segs = range(len(names))
    top_ids, top_vals = best_of_segments([seg_ids[s] for s in segs], [seg_vals[s] for s in segs], k)
    t = targets.shape[1]
    return dict(
        topk_ids=top_ids,
        topk_logprobs=(top_vals - lse64).float(),
        segment_topk_ids={name: seg_ids[s] for s, name in enumerate(names)},
        segment_topk_logprobs={name: (seg_vals[s] - lse64).float() for s, name in enumerate(names)},
        logsumexp=lse,
        segment_logmass={name: seg_lse[:, s] - lse for s, name in enumerate(names)},
        target_logprobs=torch.where(pad, float("nan"), (t64 - lse64).float()),
        target_ranks=torch.where(pad, -1, counts.sum(1)) if t else targets.clone(),
        target_segment_ranks={
            name: torch.where(pad, -1, counts[:, s]) for s, name in enumerate(names)
        },
    )


ROW_FIELDS = ("topk_ids", "topk_logprobs", "logsumexp", "target_logprobs", "target_ranks")
SEGMENT_FIELDS = (
    "segment_topk_ids",
    "segment_topk_logprobs",
    "segment_logmass",
    "target_segment_ranks",
)


def _redo_rows(fields: dict, inputs: LensInputs, h, redo: torch.Tensor, compile: bool) -> None:
    """Rows whose top-k could not be certified, recomputed by the torch engine in place.

    The engine gets the already-normed rows (no norm again: a projecting norm's last bits
    depend on its batch)."""
    if not len(redo):
        return
    cut = inputs.rows(redo.to(inputs.hidden.device))
    sub = replace(cut, hidden=h[redo], final_norm=None, pool_groups=None, pool_targets=None)
    res = chunked_lens(sub, compile=compile)
    for name in ROW_FIELDS:
        fields[name][redo] = getattr(res, name).to(fields[name].dtype)
    for name in SEGMENT_FIELDS:
        for seg, tensor in fields[name].items():
            tensor[redo] = getattr(res, name)[seg].to(tensor.dtype)


def _pooled(
    inputs: LensInputs,
    h: torch.Tensor,
    row_chunk: int | None,
    vocab_chunk: int | None,
    compile: bool,
) -> dict:
    """Max-pooled statistics, from the chunked engine on the pooled rows only, as normed
    with all the others (``h``): a norm with a projection, like OPT's ``project_out``,
    is a GEMM whose last bits may depend on how many rows it sees."""
    fields = (
        "pooled_topk_ids",
        "pooled_topk_logits",
        "pooled_segment_topk_ids",
        "pooled_segment_topk_logits",
        "pooled_target_ranks",
        "pooled_target_segment_ranks",
    )
    groups = inputs.pool_groups
    keep = (
        torch.nonzero(groups >= 0).flatten()
        if groups is not None
        else torch.empty(0, dtype=torch.long)
    )
    sub = replace(inputs, hidden=h, final_norm=None).rows(keep, with_targets=False)
    if sub.pool_targets is None:
        sub = replace(sub, pool_targets=inputs.resolved_pool_targets())
    res = chunked_lens(sub, row_chunk=row_chunk, vocab_chunk=vocab_chunk, compile=compile)
    return {name: getattr(res, name) for name in fields}
