"""The fused lens as a Triton kernel: tiled GEMM, online log-sum-exp, ranks, top-k.

One program owns a block of rows and a contiguous share ("split") of the
vocabulary tiles. Tiles never straddle a segment boundary (the host builds a
tile table from the segment runs), so each tile updates one segment's state:

* online max / sum-exp per segment, in fp32 registers [rows, segments];
* exact rank counts: entries of the fp32 logit tile strictly above each
  target's logit, the target's own column excluded;
* a per-segment candidate buffer of the best ``KP`` logits, filled by
  repeatedly taking the tile's row maxima only while some row still has a
  value above its buffer's minimum (after the first tiles this is 0-2 passes).

The host merges the splits (log-sum-exp of maxima/sums, top-k of candidate
buffers, sums of counts). Logits are accumulated in fp32 from the compute-dtype
GEMM, so no refinement pass is needed. Max-pooled word statistics run through
the chunked torch engine on the pooled rows only.

Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (fp32/fp16;
the interpreter mishandles bf16), which is how CI checks its logic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .chunked import chunked_lens, normed_rows
from .contract import LensError, LensInputs, LensResult, validate
from .exact import target_logits

#: A constexpr, not a plain global: compiled kernels may only read constexpr globals
#: (the interpreter reads any global; only a real compile refuses a plain one).
KERNEL_NEG_INF = tl.constexpr(float("-inf"))
NEG_INF = float("-inf")


#: Tile sizes the launcher uses on CUDA (the AOT compile test builds exactly these).
CUDA_BLOCKS = {"BM": 64, "BN": 128, "BK": 64}
#: Smaller tiles under TRITON_INTERPRET=1, where every program runs in Python.
INTERPRETER_BLOCKS = {"BM": 16, "BN": 32, "BK": 16}


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
    TGT_VALS,  # [N, T] fp32 exact target logits
    TILE_START,  # [n_tiles] int32
    TILE_STOP,  # [n_tiles] int32
    TILE_SEG,  # [n_tiles] int32
    OUT_MAX,  # [splits, N, SP] fp32
    OUT_SUM,  # [splits, N, SP] fp32
    OUT_CV,  # [splits, N, SP * KP] fp32
    OUT_CI,  # [splits, N, SP * KP] int64
    OUT_CNT,  # [splits, N, SP * TP] int64
    N,
    D,
    n_tiles,
    tiles_per_split,
    softcap,
    T: tl.constexpr,
    TP: tl.constexpr,
    SP: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
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
    counts = tl.zeros((BM, SP * TP), tl.int64)

    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    for t in range(first, last):
        start = tl.load(TILE_START + t)
        stop = tl.load(TILE_STOP + t)
        seg = tl.load(TILE_SEG + t)
        cols = start + offs_n
        col_ok = cols < stop

        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + offs_k
            h = tl.load(
                H + rows[:, None] * D + ks[None, :],
                mask=row_ok[:, None] & (ks[None, :] < D),
                other=0.0,
            )
            w = tl.load(
                W + cols[:, None] * D + ks[None, :],
                mask=col_ok[:, None] & (ks[None, :] < D),
                other=0.0,
            )
            # IEEE fp32 products for fp32 inputs (Triton's default there is TF32).
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
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

        # Exact ranks: entries strictly above each target, own column excluded.
        for j in tl.static_range(T):
            tid = tl.load(TGT_IDS + rows * T + j, mask=row_ok, other=-1)
            tval = tl.load(TGT_VALS + rows * T + j, mask=row_ok, other=0.0)
            above = (acc > tval[:, None]) & (cols[None, :] != tid[:, None]) & col_ok[None, :]
            c = tl.sum(above.to(tl.int64), axis=1)
            counts += tl.where(cnt_cols[None, :] == seg * TP + j, c[:, None], 0)

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
    tl.store(OUT_CV + base[:, None] * (SP * KP) + cand_cols[None, :], cand_v, mask=row_ok[:, None])
    tl.store(OUT_CI + base[:, None] * (SP * KP) + cand_cols[None, :], cand_i, mask=row_ok[:, None])
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
    row_chunk: int = 512,
    vocab_chunk: int = 8192,
    block_m: int = CUDA_BLOCKS["BM"],
    block_n: int = CUDA_BLOCKS["BN"],
    block_k: int = CUDA_BLOCKS["BK"],
    splits: int | None = None,
    compile: bool = True,
) -> LensResult:
    """The fused lens through the Triton kernel (CUDA, or the interpreter on CPU).

    ``compile`` is passed to the torch engine that computes the pooled rows.
    """
    validate(inputs)
    device = inputs.unembed.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        raise LensError("the Triton lens needs CUDA tensors (or TRITON_INTERPRET=1)")
    if interpret:
        block_m, block_n, block_k = (INTERPRETER_BLOCKS[x] for x in ("BM", "BN", "BK"))
    n, d, k = inputs.n_rows, inputs.unembed.shape[1], inputs.k
    segments = inputs.resolved_segments()
    names = segments.names
    n_seg = len(names)
    sp = _next_pow2(n_seg)
    kp = _next_pow2(k)
    targets = inputs.resolved_targets().to(device).long().contiguous()
    t = targets.shape[1]
    tp = _next_pow2(max(t, 1))

    h = normed_rows(inputs).contiguous()
    t_vals = target_logits(h.double(), targets, inputs).float().contiguous()
    shape = _Shape(n=n, d=d, t=t, tp=tp, sp=sp, kp=kp, bm=block_m, bn=block_n, bk=block_k)
    outputs = _launch(inputs, h, targets, t_vals, shape, splits)
    lse, seg_lse, cv, ci, counts = _merge_splits(*outputs, n_seg, t)
    fields = _segment_results(names, k, targets, t_vals, lse, seg_lse, cv, ci, counts)
    return LensResult(**fields, **_pooled(inputs, row_chunk, vocab_chunk, compile))


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


def _launch(inputs: LensInputs, h, targets, t_vals, shape: _Shape, splits: int | None):
    """Run the kernel over every (row block, vocabulary split); returns each split's
    partial maxima, sums, top-k candidates (values, ids) and target counts."""
    device, w = inputs.unembed.device, inputs.unembed.contiguous()
    starts, stops, segs = _tile_table(inputs, shape.bn, device)
    n, n_tiles = shape.n, len(starts)
    row_blocks = triton.cdiv(max(n, 1), shape.bm)
    if splits is None:
        # Enough programs to fill the GPU, each still walking many tiles.
        splits = max(1, min(n_tiles, 4 * 132 // row_blocks)) if device.type == "cuda" else 2
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    f32 = dict(dtype=torch.float32, device=device)
    out_max = torch.full((splits, n, shape.sp), NEG_INF, **f32)
    out_sum = torch.zeros((splits, n, shape.sp), **f32)
    out_cv = torch.full((splits, n, shape.sp * shape.kp), NEG_INF, **f32)
    out_ci = torch.full((splits, n, shape.sp * shape.kp), -1, dtype=torch.long, device=device)
    out_cnt = torch.zeros((splits, n, shape.sp * shape.tp), dtype=torch.long, device=device)
    bias = inputs.bias.float().contiguous() if inputs.bias is not None else out_sum
    if n and n_tiles:
        _lens_tiles_kernel[(row_blocks, splits)](
            h,
            w,
            bias,
            targets.clamp(min=-1),
            t_vals,
            starts,
            stops,
            segs,
            out_max,
            out_sum,
            out_cv,
            out_ci,
            out_cnt,
            n,
            shape.d,
            n_tiles,
            tiles_per_split,
            float(inputs.softcap or 1.0),
            T=shape.t,
            TP=shape.tp,
            SP=shape.sp,
            KP=shape.kp,
            HAS_BIAS=inputs.bias is not None,
            HAS_SOFTCAP=inputs.softcap is not None,
            BM=shape.bm,
            BN=shape.bn,
            BK=shape.bk,
            DOT_PRECISION="ieee",
        )
    return out_max, out_sum, out_cv, out_ci, out_cnt


def _merge_splits(out_max, out_sum, out_cv, out_ci, out_cnt, n_seg: int, t: int):
    """The programs' partial results, one per vocabulary split, merged per row and segment:
    (log-sum-exp, segment log-sum-exp, candidate values and ids [N, S, splits*KP], counts)."""
    splits, n, sp = out_max.shape
    kp = out_cv.shape[2] // sp
    tp = out_cnt.shape[2] // sp
    seg_max = out_max.amax(0)  # [N, SP]
    safe = torch.where(torch.isfinite(seg_max), seg_max, 0)
    seg_sum = (out_sum * torch.exp(out_max - safe)).nan_to_num(0.0).sum(0)
    seg_lse = torch.where(torch.isfinite(seg_max), safe + torch.log(seg_sum), NEG_INF)[:, :n_seg]
    lse = torch.logsumexp(seg_lse, dim=1)
    cv = out_cv.permute(1, 0, 2).reshape(n, splits, sp, kp).permute(0, 2, 1, 3).reshape(n, sp, -1)
    ci = out_ci.permute(1, 0, 2).reshape(n, splits, sp, kp).permute(0, 2, 1, 3).reshape(n, sp, -1)
    cv = torch.where(ci >= 0, cv, torch.full_like(cv, NEG_INF))
    counts = out_cnt.sum(0).reshape(n, sp, tp)[:, :n_seg, :t]  # [N, S, T]
    return lse, seg_lse, cv, ci, counts


def _segment_results(names, k: int, targets, t_vals, lse, seg_lse, cv, ci, counts) -> dict:
    """Top-k per segment and overall, masses and ranks from the merged candidates."""
    t = targets.shape[1]
    result_seg_ids, result_seg_lp, seg_mass, seg_ranks = {}, {}, {}, {}
    pad = targets < 0
    for s, name in enumerate(names):
        vals = cv[:, s]
        ids = ci[:, s]
        # Real candidates first (a -inf logit still beats an empty slot), then by value.
        rank_key = torch.where(ids >= 0, vals.double().nan_to_num(neginf=-1e29), -1e30)
        top = rank_key.topk(k, dim=1).indices
        seg_ids = torch.where(ids.gather(1, top) >= 0, ids.gather(1, top), -1)
        seg_vals = torch.where(seg_ids >= 0, vals.gather(1, top), NEG_INF)
        result_seg_ids[name] = seg_ids
        result_seg_lp[name] = seg_vals - lse[:, None]
        seg_mass[name] = seg_lse[:, s] - lse
        seg_ranks[name] = torch.where(pad, -1, counts[:, s])
    all_ids = torch.cat([result_seg_ids[name] for name in names], 1)
    all_lp = torch.cat([result_seg_lp[name] for name in names], 1)
    key = torch.where(all_ids >= 0, all_lp.double().nan_to_num(neginf=-1e29), -1e30)
    top = key.topk(k, dim=1).indices
    target_lp = torch.where(pad, float("nan"), t_vals - lse[:, None])
    ranks = torch.where(pad, -1, counts.sum(1)) if t else targets.clone()
    return dict(
        topk_ids=all_ids.gather(1, top),
        topk_logprobs=all_lp.gather(1, top),
        segment_topk_ids=result_seg_ids,
        segment_topk_logprobs=result_seg_lp,
        logsumexp=lse,
        segment_logmass=seg_mass,
        target_logprobs=target_lp,
        target_ranks=ranks,
        target_segment_ranks=seg_ranks,
    )


def _pooled(inputs: LensInputs, row_chunk: int, vocab_chunk: int, compile: bool) -> dict:
    """Max-pooled statistics, from the chunked engine on the pooled rows only."""
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
    sub = inputs.rows(keep, with_targets=False)
    if sub.pool_targets is None:
        sub = LensInputs(**{**sub.__dict__, "pool_targets": inputs.resolved_pool_targets()})
    res = chunked_lens(sub, row_chunk=row_chunk, vocab_chunk=vocab_chunk, compile=compile)
    return {name: getattr(res, name) for name in fields}
