"""Hold a lens result against the float64 definition: exact where the contract says exact.

Ranks (whole vocabulary, per segment, pooled) and top-k ids must *equal* the
reference's; top-k values must be the exact logits (to one fp32 rounding).
Only log-sum-exp, log-probs and segment masses may differ, by a tolerance
derived from the error band of fp32 logits (docs/lens.md), never tuned.
"""

from __future__ import annotations

import torch

from extractor.lens import LensInputs, LensResult, VocabSegments, reference_lens, reference_logits
from extractor.lens.exact import logsumexp_error_bound


def _max(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def _same_ranks(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    bad = got != want
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} ranks differ; first: got "
        f"{got[bad][:5].tolist()} want {want[bad][:5].tolist()}"
    )


def _same_topk(ids, vals, want_ids, want_vals, what: str, value_tol: float) -> None:
    ids, want_ids = ids.cpu(), want_ids.cpu()
    bad = (ids != want_ids).any(1)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} rows with other ids; first: got {ids[bad][0].tolist()} "
        f"want {want_ids[bad][0].tolist()}"
    )
    vals, want_vals = vals.double().cpu(), want_vals.cpu()
    real = want_ids >= 0
    assert torch.equal(torch.isinf(vals[real]), torch.isinf(want_vals[real])), what
    fin = real & torch.isfinite(want_vals)
    err = (vals[fin] - want_vals[fin]).abs()
    # One fp32 rounding of the exact value (absolute below fp32's normal range: half
    # its smallest subnormal step, 2^-150), plus the log-sum-exp error for log-probs.
    allowed = want_vals[fin].abs() * 2**-23 + 2.0**-150 + value_tol
    assert bool((err <= allowed).all()), f"{what}: value off by {float(err.max())}"


def plant_ties(inputs: LensInputs, seed: int) -> LensInputs:
    """Duplicate unembedding rows (exact ties) and aim targets at the k-th place.

    Each row's k-th best entry gets copies elsewhere in the vocabulary, and some
    targets become those copies or the entries just around rank k: the cases where
    a rank or a top-k list is decided by one comparison.
    """
    gen = torch.Generator().manual_seed(seed)
    w = inputs.unembed.clone()
    v = len(w)
    logits = reference_logits(inputs)
    for row in range(min(inputs.n_rows, 6)):
        order = logits[row].argsort(descending=True)
        src = int(order[min(inputs.k, v) - 1])
        for dst in torch.randint(0, v, (2,), generator=gen).tolist():
            w[dst] = w[src]
    out = LensInputs(**{**inputs.__dict__, "unembed": w})
    if out.targets is not None and out.targets.shape[1]:
        tg = out.targets.clone()
        logits = reference_logits(out)
        near_k = logits.argsort(dim=1, descending=True)[:, max(0, out.k - 2) : out.k + 2]
        cols = min(tg.shape[1], near_k.shape[1])
        tg[:, :cols] = near_k[:, :cols].to(tg.device)
        out = LensInputs(**{**out.__dict__, "targets": tg})
    return out


def tiny_case(dtype: torch.dtype, scale: float, device: str = "cpu") -> LensInputs:
    """Hidden states and unembedding rows of magnitude ``scale``: below 2^-63 their
    products fall under fp32's normal range, where rounding is absolute, not relative."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 16, 64, 400
    return LensInputs(
        hidden=(torch.randn(n, d, generator=gen) * scale).to(device, dtype),
        unembed=(torch.randn(v, d, generator=gen) * scale).to(device, dtype),
        k=5,
        targets=torch.randint(0, v, (n, 6), generator=gen).to(device),
        pool_groups=(torch.arange(n) // 4).to(device),
        pool_targets=torch.randint(0, v, (n // 4, 2), generator=gen).to(device),
    )


def check_exact(
    inputs: LensInputs, got: LensResult, vocab_chunk: int = 8192, lse_bound: float | None = None
) -> None:
    """Every field of ``got`` against :func:`reference_lens`: equal ranks and ids.

    Log-sum-exp, log-probs and masses within ``lse_bound`` (default: the torch engine's
    bound at ``vocab_chunk``)."""
    ref = reference_lens(inputs)
    tol = logsumexp_error_bound(inputs, vocab_chunk) if lse_bound is None else lse_bound
    _same_ranks(got.target_ranks, ref.target_ranks, "target_ranks")
    for name in ref.target_segment_ranks:
        _same_ranks(got.target_segment_ranks[name], ref.target_segment_ranks[name], name)
    _same_topk(got.topk_ids, got.topk_logprobs, ref.topk_ids, ref.topk_logprobs, "topk", tol)
    for name in ref.segment_topk_ids:
        _same_topk(
            got.segment_topk_ids[name],
            got.segment_topk_logprobs[name],
            ref.segment_topk_ids[name],
            ref.segment_topk_logprobs[name],
            f"segment {name} topk",
            tol,
        )
    lse_err = (got.logsumexp.double().cpu() - ref.logsumexp).abs()
    assert _max(lse_err) <= tol, (float(lse_err.max()), tol)
    for name, want in ref.segment_logmass.items():
        have = got.segment_logmass[name].double().cpu()
        both_inf = torch.isinf(want) & torch.isinf(have) & (want == have)
        err = (have - want).abs()[~both_inf]
        assert _max(err) <= 2 * tol, (name, float(err.max()), tol)
    real = inputs.resolved_targets().cpu() >= 0
    have, want = got.target_logprobs.double().cpu(), ref.target_logprobs
    assert bool(torch.isnan(have[~real]).all())
    both_inf = torch.isinf(want) & (have == want)
    assert _max((have - want).abs()[real & ~both_inf]) <= tol
    if inputs.pool_groups is None or ref.pooled_topk_ids.shape[0] == 0:
        return
    present = torch.zeros(ref.pooled_topk_ids.shape[0], dtype=torch.bool)
    groups = inputs.pool_groups.cpu()
    present[groups[groups >= 0].unique()] = True
    p = present
    _same_topk(
        got.pooled_topk_ids[p],
        got.pooled_topk_logits[p],
        ref.pooled_topk_ids[p],
        ref.pooled_topk_logits[p],
        "pooled topk",
        0.0,
    )
    for name in ref.pooled_segment_topk_ids:
        _same_topk(
            got.pooled_segment_topk_ids[name][p],
            got.pooled_segment_topk_logits[name][p],
            ref.pooled_segment_topk_ids[name][p],
            ref.pooled_segment_topk_logits[name][p],
            f"pooled {name} topk",
            0.0,
        )
    _same_ranks(got.pooled_target_ranks[p], ref.pooled_target_ranks[p], "pooled ranks")
    for name in ref.pooled_target_segment_ranks:
        _same_ranks(
            got.pooled_target_segment_ranks[name][p],
            ref.pooled_target_segment_ranks[name][p],
            f"pooled {name} ranks",
        )


# Approximate checks, for engines that do not promise exactness.


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


def check_within_tolerance(
    inputs: LensInputs, got: LensResult, tol: float, rank_tol: float | None = None
) -> None:
    """For engines without exact refinement (the Triton kernel): values within ``tol``
    (logit units) of the float64 definition, ranks within what ``rank_tol`` allows.

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


def wide_case(dtype: torch.dtype) -> LensInputs:
    """Realistic widths (d=576): fp32 accumulation really rounds here."""
    gen = torch.Generator().manual_seed(11)
    n, d, v = 48, 576, 3000
    hidden = torch.randn(n, d, generator=gen) * 3
    unembed = torch.randn(v, d, generator=gen) / d**0.5 * 4
    targets = torch.randint(0, v, (n, 6), generator=gen)
    inputs = LensInputs(
        hidden=hidden.to(dtype),
        unembed=unembed.to(dtype),
        k=10,
        segments=VocabSegments.from_ranges(v, {"speech": [(2500, v)]}),
        targets=targets,
        pool_groups=torch.arange(n) // 4,
        pool_targets=torch.randint(0, v, (n // 4, 3), generator=gen),
    )
    return plant_ties(inputs, 3)


def runs_against_a_fixed_pivot(c: int, kk: int) -> torch.Tensor:
    """A review's row: kk - 1 huge values in the last columns, then (scanned from the last
    column back) runs of 3 kk + 1 values, each run above the one scanned before it and
    falling within itself. Every refill of the buffer then beats the kept values and comes
    in falling order, so a selection pivoting on a fixed slot met the least value each
    time: quadratic, 27x a random row's time at kk = 64."""
    row = torch.full((c,), -1e9)
    row[c - (kk - 1) :] = 1e9
    run, low = 3 * kk + 1, min(c - (kk - 1), (kk - 1) * 64)
    for n, stop in enumerate(range(low, 0, -run)):
        start = max(0, stop - run)
        row[start:stop] = n * 2 * run + torch.arange(stop - start, dtype=torch.float32)
    return row
