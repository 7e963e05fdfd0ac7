"""The fused lens in plain torch: chunked over rows and vocabulary.

Why it is fast and exact enough:

* The vocabulary is walked in chunks that never straddle a segment boundary,
  so each [rows x vocab-chunk] logit block updates exactly one segment's
  running state (online max/sum-exp, top-k candidates, rank counts). The whole
  vocabulary's numbers are derived from the segments' at the end.
* The GEMM and the elementwise passes run in the compute dtype (bf16 on a
  modern CPU or GPU), which is where the time goes. Everything that is
  *returned* as a value is then refined in fp32: the top candidates' and the
  targets' logits are recomputed as fp32 dot products, and the log-sum-exp is
  corrected by swapping the candidates' rounded terms for exact ones. What
  rounding is left sits in the tail of the distribution.
* Ranks compare each low-precision logit with the target's exact logit rounded
  *down* to the compute dtype, which is the same predicate as comparing with
  the exact value; the target's own entry is never counted.

Nothing larger than [rows-chunk x vocab-chunk] logits (plus the [rows-chunk x
targets x vocab-chunk] comparison mask) ever exists.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from .contract import LensInputs, LensResult, check_width, validate

NEG_INF = float("-inf")


@dataclass
class _SegmentState:
    """Running state of one vocabulary segment for one row chunk."""

    max: torch.Tensor  # [R] fp32 running max
    sumexp: torch.Tensor  # [R] fp32, sum of exp(logit - max)
    cand_vals: torch.Tensor  # [R, <=kk] compute dtype
    cand_ids: torch.Tensor  # [R, <=kk] int64
    counts: torch.Tensor  # [R, T] int64, entries strictly above each target
    pooled_vals: torch.Tensor  # [Gc, <=kk]
    pooled_ids: torch.Tensor  # [Gc, <=kk]
    pooled_counts: torch.Tensor  # [Gc, Tp]
    touched: bool = field(default=False)


def vocab_chunks(inputs: LensInputs, vocab_chunk: int) -> list[tuple[int, int, int]]:
    """(start, stop, segment) chunks of at most ``vocab_chunk`` inside one segment run."""
    chunks = []
    for start, stop, seg in inputs.resolved_segments().runs():
        for c0 in range(start, stop, vocab_chunk):
            chunks.append((c0, min(stop, c0 + vocab_chunk), seg))
    return chunks


def row_chunks(groups: torch.Tensor, row_chunk: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Order rows so each pool group is contiguous and cut chunks between groups.

    Returns the row order and half-open [a, b) spans into it. A group larger than
    ``row_chunk`` becomes one chunk of its own size: pooling needs all its rows.
    """
    # Unpooled rows first, then groups by (size, id): each chunk then holds its pooled
    # rows as one contiguous suffix, in runs of equal-sized groups that pool as views.
    if groups.numel() == 0:
        return torch.empty(0, dtype=torch.long), []
    sizes = torch.bincount(groups.clamp(min=0), minlength=1)[groups.clamp(min=0)]
    key = torch.where(groups < 0, -1, sizes * (int(groups.max().clamp(min=0)) + 1) + groups)
    order = torch.argsort(key, stable=True)
    g = groups[order]
    n = int(g.numel())
    if n == 0:
        return order, []
    # A cut before row i is allowed when it does not split a group.
    allowed = torch.ones(n, dtype=torch.bool)
    allowed[1:] = (g[1:] != g[:-1]) | (g[1:] < 0)
    cuts = [*torch.nonzero(allowed).flatten().tolist()[1:], n]
    spans, start, prev = [], 0, 0
    for cut in cuts:
        if cut - start > row_chunk and prev > start:
            spans.append((start, prev))
            start = prev
        prev = cut
    spans.append((start, n))
    return order, spans


def round_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest ``dtype`` value <= each fp32 value, so ``x > round_down(t)`` iff ``x > t``."""
    if dtype == torch.float32 or dtype == torch.float64:
        return values.to(dtype)
    q = values.to(dtype)
    too_big = q.float() > values
    lower = torch.nextafter(q, torch.full_like(q, NEG_INF))
    return torch.where(too_big, lower, q)


def exact_logits(
    h32: torch.Tensor,
    ids: torch.Tensor,
    inputs: LensInputs,
) -> torch.Tensor:
    """fp32 lens logits of ``ids`` [R, T] for rows ``h32`` [R, d] (pads give garbage)."""
    if ids.shape[-1] == 0:
        return torch.empty(ids.shape, dtype=torch.float32, device=h32.device)
    safe = ids.clamp(min=0)
    out = torch.empty(ids.shape, dtype=torch.float32, device=h32.device)
    # Gathered rows of W_U are [rows, T, d]: go 128 rows at a time to keep them small.
    for a in range(0, len(ids), 128):
        w = inputs.unembed[safe[a : a + 128]].float()
        out[a : a + 128] = torch.bmm(w, h32[a : a + 128].unsqueeze(2)).squeeze(2)
    if inputs.bias is not None:
        out = out + inputs.bias.float()[safe]
    if inputs.softcap is not None:
        out = inputs.softcap * torch.tanh(out / inputs.softcap)
    return out


def _merge_topk(
    vals: torch.Tensor, ids: torch.Tensor, new_vals: torch.Tensor, new_ids: torch.Tensor, kk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.cat([vals, new_vals], dim=1)
    ids = torch.cat([ids, new_ids], dim=1)
    if vals.shape[1] <= kk:
        return vals, ids
    top, where = vals.topk(kk, dim=1)
    return top, ids.gather(1, where)


#: Width of the blocks whose maxima pre-select top-k candidates (see :func:`block_topk`).
TOPK_BLOCK = 64


def _chunk_stats_eager(
    logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max, sum of exp(logit - max) in fp32, entries above each threshold, block maxima.

    One pass's worth of work per element; compiled, it never materialises the
    [rows x thresholds x vocab] comparison. Block maxima are of consecutive
    :data:`TOPK_BLOCK`-wide blocks (the chunk width must be a multiple, else []).
    """
    row_max = logits.amax(dim=1)
    safe = torch.where(torch.isfinite(row_max), row_max, 0)
    sumexp = torch.exp((logits - safe[:, None]).float()).sum(dim=1)
    counts = (logits.unsqueeze(1) > thresholds.unsqueeze(2)).sum(-1, dtype=torch.int32)
    rows, width = logits.shape
    if width % TOPK_BLOCK == 0:
        blocks = logits.view(rows, width // TOPK_BLOCK, TOPK_BLOCK).amax(-1)
    else:
        blocks = logits[:, :0]
    return row_max, sumexp, counts, blocks


def block_topk(
    logits: torch.Tensor, block_max: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, searching only the k blocks with the largest maxima.

    Exact up to ties: every one of a row's k best entries sits in a block whose
    maximum is at least that entry, so the k best blocks by maximum hold them.
    Turns a top-k over the whole chunk into one over k x TOPK_BLOCK entries.
    """
    rows, n_blocks = block_max.shape
    if n_blocks == 0 or k * TOPK_BLOCK >= logits.shape[1]:
        return logits.topk(k, dim=1)
    best_blocks = block_max.topk(k, dim=1).indices  # [R, k]
    cols = (
        best_blocks.unsqueeze(2) * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=logits.device)
    ).reshape(rows, -1)
    values = logits.gather(1, cols)
    top, where = values.topk(k, dim=1)
    return top, cols.gather(1, where)


_compiled_stats = None


def chunk_stats(logits: torch.Tensor, thresholds: torch.Tensor):
    """:func:`_chunk_stats_eager`, through ``torch.compile`` unless ``SLM_LENS_COMPILE=0``.

    Eager, the rank comparison alone costs ~30x the GEMM on a CPU; compiled it
    fuses into one vectorised loop (~1.5x). Any compiler failure falls back to
    eager with a warning, never to a wrong answer.
    """
    global _compiled_stats
    if os.environ.get("SLM_LENS_COMPILE", "1") == "0" or not logits.numel():
        return _chunk_stats_eager(logits, thresholds)
    if _compiled_stats is None:
        _compiled_stats = torch.compile(_chunk_stats_eager, dynamic=True)
    try:
        return _compiled_stats(logits, thresholds)
    except Exception as exc:  # compiler missing or broken: stay correct, get slower
        warnings.warn(
            f"torch.compile of the lens reduction failed ({type(exc).__name__}: {exc}); "
            "using eager mode",
            stacklevel=2,
        )
        os.environ["SLM_LENS_COMPILE"] = "0"
        return _chunk_stats_eager(logits, thresholds)


def _own_correction(
    logits: torch.Tensor, thresholds: torch.Tensor, own: torch.Tensor, c0: int
) -> torch.Tensor:
    """1 where a target's own entry lies in this chunk and was counted above itself."""
    width = logits.shape[1]
    inside = (own >= c0) & (own < c0 + width)
    own_vals = logits.gather(1, (own - c0).clamp(0, width - 1))
    return (inside & (own_vals > thresholds)).long()


def _segment_max(data: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Max over consecutive row groups of the given lengths: [sum(lengths), C] -> [G, C].

    Groups come sorted by size (see :func:`row_chunks`), so each run of equal-sized
    groups reduces as one strided view; ``segment_reduce`` was ~5x slower.
    """
    if len(lengths) == len(data):
        return data
    sizes = lengths.tolist()
    out = torch.empty((len(sizes), *data.shape[1:]), dtype=data.dtype, device=data.device)
    g = row = 0
    while g < len(sizes):
        size, run = sizes[g], 1
        while g + run < len(sizes) and sizes[g + run] == size:
            run += 1
        block = data[row : row + run * size]
        out[g : g + run] = block.view(run, size, *data.shape[1:]).amax(1)
        g += run
        row += run * size
    return out


@torch.no_grad()
def chunked_lens(
    inputs: LensInputs,
    *,
    row_chunk: int = 512,
    vocab_chunk: int = 8192,
    margin: int = 8,
) -> LensResult:
    """Fused final-norm + unembedding + top-k/ranks/masses, chunked (see module doc).

    Runs on whatever device ``inputs.unembed`` lives on, in its dtype.
    ``margin`` extra candidates per segment absorb reorderings that low-precision
    logits cause near the k-th place before the fp32 refinement.
    """
    validate(inputs)
    device = inputs.unembed.device
    dtype = inputs.unembed.dtype
    n, k, v = inputs.n_rows, inputs.k, inputs.vocab_size
    segments = inputs.resolved_segments()
    names = segments.names
    n_seg = len(names)
    seg_sizes = torch.bincount(segments.index, minlength=n_seg).tolist()
    kk = min(k + margin, v)

    targets = inputs.resolved_targets().to(device).long()
    pool_targets = inputs.resolved_pool_targets().to(device).long()
    n_groups = pool_targets.shape[0]
    groups = (
        inputs.pool_groups.to(device).long()
        if inputs.pool_groups is not None
        else torch.full((n,), -1, dtype=torch.long, device=device)
    )
    hidden = inputs.hidden.to(device)
    chunks = vocab_chunks(inputs, vocab_chunk)
    order, spans = row_chunks(groups.cpu(), row_chunk)
    order = order.to(device)

    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.long, device=device)
    out_seg_ids = {name: torch.full((n, k), -1, **i64) for name in names}
    out_seg_lp = {name: torch.full((n, k), NEG_INF, **f32) for name in names}
    out_seg_lse = {name: torch.full((n,), NEG_INF, **f32) for name in names}
    out_seg_ranks = {name: torch.zeros(targets.shape, **i64) for name in names}
    out_topk_ids = torch.full((n, k), -1, **i64)
    out_topk_lp = torch.full((n, k), NEG_INF, **f32)
    out_lse = torch.full((n,), NEG_INF, **f32)
    out_target_lp = torch.full(targets.shape, float("nan"), **f32)
    p_seg_ids = {name: torch.full((n_groups, k), -1, **i64) for name in names}
    p_seg_vals = {name: torch.full((n_groups, k), NEG_INF, **f32) for name in names}
    p_seg_ranks = {name: torch.zeros(pool_targets.shape, **i64) for name in names}
    p_ids = torch.full((n_groups, k), -1, **i64)
    p_vals = torch.full((n_groups, k), NEG_INF, **f32)

    for a, b in spans:
        rows = order[a:b]
        h = hidden[rows]
        if inputs.final_norm is not None:
            h = inputs.final_norm(h)
            check_width(h, inputs.unembed)
        h = h.to(dtype)
        h32 = h.float()
        r = len(rows)
        tg = targets[rows]
        t_exact = exact_logits(h32, tg, inputs)
        t_q = round_down(t_exact, dtype)

        g = groups[rows]
        # Pooled rows are a contiguous suffix of the chunk (row_chunks orders them so).
        first_pooled = r - int((g >= 0).sum())
        pooled_rows = slice(first_pooled, r)
        g_ids, g_len = torch.unique_consecutive(g[pooled_rows], return_counts=True)
        g_local = torch.repeat_interleave(torch.arange(len(g_ids), device=device), g_len)
        ptg = pool_targets[g_ids]  # [Gc, Tp]
        h32_pooled = h32[pooled_rows]
        pt_exact = _segment_max(exact_logits(h32_pooled, ptg[g_local], inputs), g_len)
        pt_q = round_down(pt_exact, dtype)

        states = [
            _SegmentState(
                max=torch.full((r,), NEG_INF, **f32),
                sumexp=torch.zeros(r, **f32),
                cand_vals=torch.empty((r, 0), dtype=dtype, device=device),
                cand_ids=torch.empty((r, 0), **i64),
                counts=torch.zeros(tg.shape, **i64),
                pooled_vals=torch.empty((len(g_ids), 0), dtype=dtype, device=device),
                pooled_ids=torch.empty((len(g_ids), 0), **i64),
                pooled_counts=torch.zeros(ptg.shape, **i64),
            )
            for _ in names
        ]
        for c0, c1, s in chunks:
            st = states[s]
            st.touched = True
            logits = h @ inputs.unembed[c0:c1].T
            if inputs.bias is not None:
                logits = logits + inputs.bias[c0:c1]
            if inputs.softcap is not None:
                logits = inputs.softcap * torch.tanh(logits / inputs.softcap)

            chunk_max, chunk_sum, above, block_max = chunk_stats(logits, t_q)
            safe_max = torch.where(torch.isfinite(chunk_max), chunk_max, 0)
            chunk_max32 = chunk_max.float()
            new_max = torch.maximum(st.max, chunk_max32)
            safe_new = torch.where(torch.isfinite(new_max), new_max, 0)
            st.sumexp = st.sumexp * torch.exp(st.max - safe_new) + chunk_sum * torch.exp(
                safe_max.float() - safe_new
            )
            st.max = new_max

            width = min(kk, c1 - c0)
            top_v, top_i = block_topk(logits, block_max, width)
            st.cand_vals, st.cand_ids = _merge_topk(
                st.cand_vals, st.cand_ids, top_v, top_i + c0, kk
            )
            st.counts += above - _own_correction(logits, t_q, tg, c0)

            if len(g_ids):
                pooled = _segment_max(logits[pooled_rows], g_len)
                _, _, above, block_max = chunk_stats(pooled, pt_q)
                top_v, top_i = block_topk(pooled, block_max, width)
                st.pooled_vals, st.pooled_ids = _merge_topk(
                    st.pooled_vals, st.pooled_ids, top_v, top_i + c0, kk
                )
                st.pooled_counts += above - _own_correction(pooled, pt_q, ptg, c0)

        # Refine in fp32: exact candidate logits, corrected log-sum-exp per segment.
        seg_lse = torch.full((n_seg, r), NEG_INF, **f32)
        all_vals, all_ids, all_pvals, all_pids = [], [], [], []
        seg_top_vals: dict[str, torch.Tensor] = {}
        for s, name in enumerate(names):
            st = states[s]
            if not st.touched or seg_sizes[s] == 0:
                continue
            exact = exact_logits(h32, st.cand_ids, inputs)
            safe = torch.where(torch.isfinite(st.max), st.max, 0)[:, None]
            approx_terms = torch.exp(st.cand_vals.float() - safe).sum(1)
            exact_terms = torch.exp(exact - safe).sum(1)
            rest = (st.sumexp - approx_terms).clamp(min=0)
            lse_s = safe.squeeze(1) + torch.log(rest + exact_terms)
            seg_lse[s] = torch.where(torch.isfinite(st.max), lse_s, NEG_INF)
            vals, where = exact.sort(dim=1, descending=True)
            ids = st.cand_ids.gather(1, where)
            take = min(k, vals.shape[1])
            out_seg_ids[name][rows, :take] = ids[:, :take]
            seg_top_vals[name] = vals[:, :take]
            all_vals.append(vals)
            all_ids.append(ids)
            out_seg_ranks[name][rows] = st.counts
            if len(g_ids):
                cand = st.pooled_ids[g_local]  # each pooled row scores its group's candidates
                pexact = _segment_max(exact_logits(h32_pooled, cand, inputs), g_len)
                pv, pw = pexact.sort(dim=1, descending=True)
                pid = st.pooled_ids.gather(1, pw)
                p_seg_ids[name][g_ids, :take] = pid[:, :take]
                p_seg_vals[name][g_ids, :take] = pv[:, :take]
                p_seg_ranks[name][g_ids] = st.pooled_counts
                all_pvals.append(pv)
                all_pids.append(pid)

        lse = torch.logsumexp(seg_lse, dim=0)
        out_lse[rows] = lse
        for s, name in enumerate(names):
            out_seg_lse[name][rows] = seg_lse[s] - lse
            if name in seg_top_vals:
                top_vals = seg_top_vals[name]
                out_seg_lp[name][rows, : top_vals.shape[1]] = top_vals - lse[:, None]
        vals, ids = torch.cat(all_vals, 1), torch.cat(all_ids, 1)
        top, where = vals.topk(k, dim=1)
        out_topk_ids[rows] = ids.gather(1, where)
        out_topk_lp[rows] = top - lse[:, None]
        out_target_lp[rows] = t_exact - lse[:, None]
        if len(g_ids):
            pvals, pids = torch.cat(all_pvals, 1), torch.cat(all_pids, 1)
            top, where = pvals.topk(k, dim=1)
            p_ids[g_ids] = pids.gather(1, where)
            p_vals[g_ids] = top

    pad = targets < 0
    out_target_lp[pad] = float("nan")
    ranks = sum(out_seg_ranks.values()) if names else torch.zeros(targets.shape, **i64)
    ranks = torch.where(pad, -1, ranks)
    out_seg_ranks = {name: torch.where(pad, -1, r) for name, r in out_seg_ranks.items()}
    ppad = pool_targets < 0
    p_ranks = torch.where(ppad, -1, sum(p_seg_ranks.values()))
    p_seg_ranks = {name: torch.where(ppad, -1, r) for name, r in p_seg_ranks.items()}
    return LensResult(
        topk_ids=out_topk_ids,
        topk_logprobs=out_topk_lp,
        segment_topk_ids=out_seg_ids,
        segment_topk_logprobs=out_seg_lp,
        logsumexp=out_lse,
        segment_logmass=out_seg_lse,
        target_logprobs=out_target_lp,
        target_ranks=ranks,
        target_segment_ranks=out_seg_ranks,
        pooled_topk_ids=p_ids,
        pooled_topk_logits=p_vals,
        pooled_segment_topk_ids=p_seg_ids,
        pooled_segment_topk_logits=p_seg_vals,
        pooled_target_ranks=p_ranks,
        pooled_target_segment_ranks=p_seg_ranks,
    )
