"""Comparisons of a lens result with the float64 reference that tolerate honest rounding.

Exact equality is wrong for low-precision engines: two logits closer than the
dtype's rounding may swap. These helpers compare *values* exactly up to a
tolerance and ids/ranks only where the reference separates them clearly.
"""

from __future__ import annotations

import torch

from extractor.lens import LensInputs, LensResult, reference_logits


def _max(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def assert_topk_matches(ids, values, ref_scores, tol: float, size: int | None = None) -> None:
    """``ids``/``values`` [N, k] vs reference scores [N, V] (same scale as values).

    ``size``: how many entries are eligible (a segment's size); the rest must be padding.
    """
    k = ids.shape[1]
    ref_sorted = ref_scores.sort(dim=1, descending=True).values[:, :k]
    valid = ids >= 0
    n_valid = min(k, ref_scores.shape[1] if size is None else size)
    assert bool(valid[:, :n_valid].all()) and not bool(valid[:, n_valid:].any())
    got = ref_scores.gather(1, ids.clamp(min=0))
    assert torch.equal(torch.isinf(got[valid]), torch.isinf(values[valid]))
    # Each returned id really has the returned value...
    diff = (got - values.double()).abs()
    fin = valid & torch.isfinite(got)
    assert _max(diff[fin]) <= tol, _max(diff[fin])
    # ...and the values are the true top-k values.
    fin = valid & torch.isfinite(ref_sorted)
    d2 = (ref_sorted - values.double()).abs()
    assert _max(d2[fin]) <= tol, _max(d2[fin])


def rank_bounds(scores: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, tol: float):
    """Smallest and largest rank each target could honestly get under +-tol rounding."""
    safe = ids.clamp(min=0)
    t = scores.gather(1, safe).unsqueeze(2)
    s = scores.unsqueeze(1)
    own = torch.arange(scores.shape[1]).view(1, 1, -1) == safe.unsqueeze(2)
    lo = (s > t + tol) & ~own
    hi = (s > t - tol) & ~own
    if mask is not None:
        lo, hi = lo & mask, hi & mask
    return lo.sum(-1), hi.sum(-1)


def assert_ranks_within(ranks, scores, ids, mask, tol: float) -> None:
    lo, hi = rank_bounds(scores, ids, mask, tol)
    real = ids >= 0
    assert torch.all(ranks[~real] == -1)
    ok = (ranks >= lo) & (ranks <= hi)
    assert bool(ok[real].all()), (ranks[real & ~ok], lo[real & ~ok], hi[real & ~ok])


def check_against_reference(
    inputs: LensInputs, got: LensResult, tol: float, rank_tol: float | None = None
) -> None:
    """Every field of ``got`` against the float64 definition, within ``tol`` (logit units).

    ``rank_tol``: how close two logits may be for their order to be honestly
    ambiguous (default ``tol``); ranks must lie within the bounds it allows.
    """
    rank_tol = tol if rank_tol is None else rank_tol
    logits = reference_logits(inputs).cpu()
    lse = torch.logsumexp(logits, 1)
    logprobs = logits - lse[:, None]
    assert torch.allclose(got.logsumexp.double().cpu(), lse, atol=tol, rtol=0)
    assert_topk_matches(got.topk_ids.cpu(), got.topk_logprobs.cpu(), logprobs, tol)
    segments = inputs.resolved_segments()
    for s, name in enumerate(segments.names):
        mask = segments.index == s
        masked = torch.where(mask, logprobs, float("-inf"))
        assert_topk_matches(
            got.segment_topk_ids[name].cpu(),
            got.segment_topk_logprobs[name].cpu(),
            masked,
            tol,
            size=int(mask.sum()),
        )
        want = torch.logsumexp(masked, 1)
        have = got.segment_logmass[name].double().cpu()
        both_inf = torch.isinf(want) & torch.isinf(have)
        assert torch.allclose(have[~both_inf], want[~both_inf], atol=tol, rtol=0)
    targets = inputs.resolved_targets().cpu().long()
    if targets.shape[1]:
        want = logprobs.gather(1, targets.clamp(min=0))
        have = got.target_logprobs.double().cpu()
        real = targets >= 0
        assert torch.all(torch.isnan(have[~real]))
        assert torch.allclose(have[real], want[real], atol=tol, rtol=0)
        assert_ranks_within(got.target_ranks.cpu(), logits, targets, None, rank_tol)
        for s, name in enumerate(segments.names):
            assert_ranks_within(
                got.target_segment_ranks[name].cpu(), logits, targets, segments.index == s, rank_tol
            )
    pool_targets = inputs.resolved_pool_targets().cpu().long()
    if inputs.pool_groups is not None and len(pool_targets):
        groups = inputs.pool_groups.cpu()
        pooled = torch.full((len(pool_targets), logits.shape[1]), float("-inf"), dtype=logits.dtype)
        for g in range(len(pool_targets)):
            if (groups == g).any():
                pooled[g] = logits[groups == g].amax(0)
        present = torch.isfinite(pooled).any(1)
        assert_topk_matches(
            got.pooled_topk_ids.cpu()[present],
            got.pooled_topk_logits.cpu()[present],
            pooled[present],
            tol,
        )
        if pool_targets.shape[1]:
            assert_ranks_within(
                got.pooled_target_ranks.cpu()[present],
                pooled[present],
                pool_targets[present],
                None,
                rank_tol,
            )
            text = segments.index == 0
            assert_ranks_within(
                got.pooled_target_segment_ranks[segments.names[0]].cpu()[present],
                pooled[present],
                pool_targets[present],
                text,
                rank_tol,
            )
