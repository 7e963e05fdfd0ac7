"""The chunked fused lens against the float64 definition, on random and adversarial inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractor.lens import (
    LensInputs,
    LensKError,
    LensShapeError,
    NonFiniteHiddenError,
    VocabSegments,
    fused_logit_lens,
    reference_logits,
)
from extractor.lens.chunked import chunked_lens, round_down, row_chunks

from .lens_checks import check_against_reference


@st.composite
def lens_cases(draw, integer_valued: bool = False):
    """Random lens problems: odd vocabularies, tiny chunks, k above a chunk, pads, ties."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 12))
    v = draw(st.integers(1, 300))
    k = draw(st.integers(1, min(v, 40)))
    if integer_valued:
        # Small integers: fp32 arithmetic is exact, and exact ties are everywhere.
        hidden = torch.randint(-2, 3, (n, d), generator=gen).float()
        unembed = torch.randint(-2, 3, (v, d), generator=gen).float()
    else:
        hidden = torch.randn(n, d, generator=gen) * draw(st.sampled_from([0.1, 1.0, 4.0]))
        unembed = torch.randn(v, d, generator=gen)
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(v, generator=gen) if not integer_valued else torch.zeros(v)
        n_masked = draw(st.integers(0, v - 1))
        bias[torch.randperm(v, generator=gen)[:n_masked]] = float("-inf")
    softcap = draw(st.sampled_from([None, None, 2.0, 30.0]))
    cut1 = draw(st.integers(0, v))
    cut2 = draw(st.integers(cut1, v))
    segments = VocabSegments.from_ranges(v, {"speech": [(cut1, cut2)], "marker": [(cut2, v)]})
    t = draw(st.integers(0, 5))
    targets = torch.randint(-1, v, (n, t), generator=gen)
    n_groups = draw(st.integers(0, 6))
    groups = torch.randint(-1, n_groups, (n,), generator=gen) if n_groups else None
    pool_targets = torch.randint(-1, v, (n_groups, draw(st.integers(0, 4))), generator=gen)
    inputs = LensInputs(
        hidden=hidden,
        unembed=unembed,
        k=k,
        bias=bias,
        softcap=softcap,
        segments=segments,
        targets=targets,
        pool_groups=groups,
        pool_targets=pool_targets if n_groups else None,
    )
    row_chunk = draw(st.integers(1, 32))
    vocab_chunk = draw(st.integers(1, 64))
    return inputs, row_chunk, vocab_chunk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases())
def test_fp32_matches_reference(case):
    inputs, row_chunk, vocab_chunk = case
    got = chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    check_against_reference(inputs, got, tol=1e-4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases(integer_valued=True))
def test_exact_ties_give_exact_ranks(case):
    inputs, row_chunk, vocab_chunk = case
    got = chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    # Integer logits are exact in fp32: any tolerance below 1 demands exact ranks.
    check_against_reference(inputs, got, tol=1e-4, rank_tol=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases())
def test_bf16_within_rounding(case):
    inputs, row_chunk, vocab_chunk = case
    bf16 = LensInputs(
        **{
            **inputs.__dict__,
            "hidden": inputs.hidden.bfloat16(),
            "unembed": inputs.unembed.bfloat16(),
        }
    )
    got = chunked_lens(bf16, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    # Ranks compare bf16 logits: entries closer than the bf16 rounding of the largest
    # logit (2**-8 relative, with margin) may honestly swap. Values are refined in fp32.
    scale = float(reference_logits(bf16).abs().nan_to_num(posinf=0).max())
    check_against_reference(bf16, got, tol=2e-2, rank_tol=max(0.1, scale * 2**-7))


def test_round_down_is_the_same_predicate():
    values = torch.randn(10_000) * 50
    q = round_down(values, torch.bfloat16)
    assert torch.all(q.float() <= values)
    probe = torch.randn(10_000).mul(50).bfloat16()
    assert torch.equal(probe.float() > values, probe > q)


def test_row_chunks_never_split_a_group():
    groups = torch.tensor([3, -1, 0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 2, 3, -1])
    order, spans = row_chunks(groups, row_chunk=3)
    covered = torch.cat([order[a:b] for a, b in spans])
    assert sorted(covered.tolist()) == list(range(len(groups)))
    for g in range(4):
        holders = {i for i, (a, b) in enumerate(spans) if (groups[order[a:b]] == g).any()}
        assert len(holders) == 1


def test_pooled_is_max_over_the_group():
    torch.manual_seed(0)
    h, w = torch.randn(6, 8), torch.randn(50, 8)
    groups = torch.tensor([0, 0, 1, -1, 1, 1])
    res = fused_logit_lens(h, None, w, 3, pool_groups=groups, pool_targets=torch.tensor([[5], [7]]))
    logits = h @ w.T
    want = logits[[2, 4, 5]].amax(0)
    assert torch.allclose(res.pooled_topk_logits[1], want.topk(3).values, atol=1e-5)
    assert int(res.pooled_target_ranks[1, 0]) == int((want > want[7]).sum())


def test_norm_is_applied_once():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    h, w = torch.randn(4, 8) * 10, torch.randn(30, 8)
    res = fused_logit_lens(h, norm, w, 2)
    want = torch.log_softmax(norm(h) @ w.T, -1).topk(2)
    assert torch.allclose(res.topk_logprobs, want.values, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"hidden": torch.randn(3, 5)}, LensShapeError),
        ({"k": 21}, LensKError),
        ({"k": 0}, LensKError),
        ({"hidden": torch.full((3, 4), math.nan)}, NonFiniteHiddenError),
        ({"targets": torch.tensor([[25], [0], [1]])}, LensShapeError),
        ({"targets": torch.zeros(2, 1, dtype=torch.long)}, LensShapeError),
        ({"bias": torch.zeros(19)}, LensShapeError),
        (
            {"pool_groups": torch.tensor([0, 1, 2]), "pool_targets": torch.zeros(1, 1).long()},
            LensShapeError,
        ),
    ],
)
def test_bad_input_raises_named_error(kwargs, error):
    args = {"hidden": torch.randn(3, 4), "final_norm": None, "unembed": torch.randn(20, 4), "k": 3}
    args.update(kwargs)
    with pytest.raises(error):
        fused_logit_lens(**args)


def test_nan_error_names_the_row():
    h = torch.randn(5, 4)
    h[3, 1] = math.inf
    with pytest.raises(NonFiniteHiddenError, match="row 3"):
        fused_logit_lens(h, None, torch.randn(20, 4), 3)
