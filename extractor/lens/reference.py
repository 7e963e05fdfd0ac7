"""Float64 reference lens: the definition, written plainly, for tests to trust.

It materialises the whole [N, V] logit matrix on purpose; never use it on real
sizes.
"""

from __future__ import annotations

import torch

from .contract import LensInputs, LensResult, check_width, validate
from .exact import dense_logits, exact_order


@torch.no_grad()
def reference_logits(inputs: LensInputs) -> torch.Tensor:
    """Lens logits [N, V] in float64: ``softcap(W_U @ final_norm(h) + b)``.

    The final norm runs as the model runs it, in the model's dtype (its output is
    what the model's head really sees); the products and sums are those of
    :func:`~.exact.dense_logits`, the one exact arithmetic every engine shares.
    """
    h = inputs.hidden
    if inputs.final_norm is not None:
        h = inputs.final_norm(h.to(inputs.unembed.dtype))
        check_width(h, inputs.unembed)
    return dense_logits(h.to(inputs.unembed.dtype), inputs)


def strict_rank(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Count entries (restricted to ``mask`` [V]) strictly above each id's logit; -1 on pads."""
    if ids.shape[1] == 0:
        return torch.empty_like(ids)
    values = logits.gather(1, ids.clamp(min=0))
    # Counting by sorted search, not by an [N, T, V] comparison: the same count
    # (entries strictly greater), at a cost the per-actor self-check can afford.
    # Entries outside the mask become -inf, which no finite logit is below.
    if mask is not None:
        logits = torch.where(mask, logits, torch.full_like(logits, float("-inf")))
    ascending = logits.sort(dim=1).values
    above = logits.shape[1] - torch.searchsorted(ascending, values.contiguous(), right=True)
    return torch.where(ids >= 0, above, torch.full_like(ids, -1))


def _topk(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries inside ``mask``: value descending, ties by the lower id."""
    n_in = int(mask.sum())
    kk = min(k, n_in)
    allowed = torch.nonzero(mask).flatten()
    sub = scores[:, allowed]
    ids = allowed.expand(len(scores), -1)
    order = exact_order(sub, ids)[:, :kk]
    vals, ids = sub.gather(1, order), ids.gather(1, order)
    pad = k - kk
    if pad:
        vals = torch.cat([vals, torch.full((len(vals), pad), float("-inf"), dtype=vals.dtype)], 1)
        ids = torch.cat([ids, torch.full((len(ids), pad), -1, dtype=torch.long)], 1)
    return ids, vals


@torch.no_grad()
def reference_lens(inputs: LensInputs) -> LensResult:
    """The lens by its definition (docs/lens.md), in float64 on the CPU."""
    validate(inputs)
    k = inputs.k
    logits = reference_logits(inputs).cpu()
    segments = inputs.resolved_segments()
    seg_index = segments.index.cpu()
    full = torch.ones(logits.shape[1], dtype=torch.bool)
    lse = torch.logsumexp(logits, dim=1)
    logprobs = logits - lse[:, None]

    # Order by the logits themselves: subtracting the log-sum-exp can merge two
    # logits one float64 ulp apart into one log-prob.
    topk_ids, topk_vals = _topk(logits, full, k)
    topk_lp = topk_vals - lse[:, None]
    seg_ids, seg_lp, seg_mass = {}, {}, {}
    for s, name in enumerate(segments.names):
        mask = seg_index == s
        seg_ids[name], seg_vals = _topk(logits, mask, k)
        seg_lp[name] = seg_vals - lse[:, None]
        masked = torch.where(mask, logprobs, torch.full_like(logprobs, float("-inf")))
        seg_mass[name] = torch.logsumexp(masked, dim=1)

    targets = inputs.resolved_targets().cpu().long()
    target_lp = logprobs.gather(1, targets.clamp(min=0))
    target_lp = torch.where(targets >= 0, target_lp, torch.full_like(target_lp, float("nan")))
    ranks = strict_rank(logits, targets, None)
    seg_ranks = {
        name: strict_rank(logits, targets, seg_index == s) for s, name in enumerate(segments.names)
    }

    pool_targets = inputs.resolved_pool_targets().cpu().long()
    n_groups = pool_targets.shape[0]
    groups = (
        inputs.pool_groups.cpu().long()
        if inputs.pool_groups is not None
        else torch.full((logits.shape[0],), -1, dtype=torch.long)
    )
    pooled = torch.full((n_groups, logits.shape[1]), float("-inf"), dtype=torch.float64)
    for g in range(n_groups):
        rows = groups == g
        if rows.any():
            pooled[g] = logits[rows].amax(dim=0)
    p_ids, p_vals = _topk(pooled, full, k)
    p_seg_ids, p_seg_vals = {}, {}
    for s, name in enumerate(segments.names):
        p_seg_ids[name], p_seg_vals[name] = _topk(pooled, seg_index == s, k)
    p_ranks = strict_rank(pooled, pool_targets, None)
    p_seg_ranks = {
        name: strict_rank(pooled, pool_targets, seg_index == s)
        for s, name in enumerate(segments.names)
    }
    return LensResult(
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        segment_topk_ids=seg_ids,
        segment_topk_logprobs=seg_lp,
        logsumexp=lse,
        segment_logmass=seg_mass,
        target_logprobs=target_lp,
        target_ranks=ranks,
        target_segment_ranks=seg_ranks,
        pooled_topk_ids=p_ids,
        pooled_topk_logits=p_vals,
        pooled_segment_topk_ids=p_seg_ids,
        pooled_segment_topk_logits=p_seg_vals,
        pooled_target_ranks=p_ranks,
        pooled_target_segment_ranks=p_seg_ranks,
    )
