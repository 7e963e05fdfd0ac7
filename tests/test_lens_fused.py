"""The chunked fused lens against the float64 definition: exact ranks and ids in every dtype."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractor.lens import (
    LensInputs,
    LensKError,
    LensRangeError,
    LensShapeError,
    NonFiniteHiddenError,
    VocabSegments,
    chunked,
    exact,
    fused_logit_lens,
)
from extractor.lens.chunked import chunked_lens, row_chunks
from extractor.lens.exact import (
    CHUNKS,
    cuda_row_chunk,
    default_chunks,
    round_down_f32,
    round_up_f32,
)

from .lens_checks import check_exact, plant_ties, tiny_case, wide_case


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


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _in_dtype(inputs: LensInputs, dtype: torch.dtype) -> LensInputs:
    return LensInputs(
        **{
            **inputs.__dict__,
            "hidden": inputs.hidden.to(dtype),
            "unembed": inputs.unembed.to(dtype),
        }
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases(), st.sampled_from(DTYPES), st.data())
def test_exact_in_every_dtype(case, dtype, data):
    """Each GEMM the call can take, whichever this CPU would choose."""
    inputs, row_chunk, vocab_chunk = case
    inputs = _in_dtype(inputs, dtype)
    gemm = data.draw(st.sampled_from(chunked.gemm_choices(inputs)), label="gemm")
    got = chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk, gemm=gemm)
    check_exact(inputs, got, vocab_chunk)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases(), st.sampled_from(DTYPES), st.integers(0, 2**31 - 1), st.data())
def test_exact_with_planted_ties_and_targets_at_rank_k(case, dtype, seed, data):
    inputs, row_chunk, vocab_chunk = case
    inputs = plant_ties(_in_dtype(inputs, dtype), seed)
    gemm = data.draw(st.sampled_from(chunked.gemm_choices(inputs)), label="gemm")
    got = chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk, gemm=gemm)
    check_exact(inputs, got, vocab_chunk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens_cases(integer_valued=True))
def test_exact_ties_everywhere(case):
    inputs, row_chunk, vocab_chunk = case
    got = chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    check_exact(inputs, got, vocab_chunk)


#: Every dtype with each fp32-output GEMM: torch's BLAS and, where torch has it, oneDNN;
#: bf16 also with VDPBF16PS where the CPU has it.
needs_onednn = pytest.mark.skipif(
    not chunked.onednn_available(torch.zeros(1, 1)), reason="this torch has no oneDNN"
)
needs_avx512_bf16 = pytest.mark.skipif(
    not chunked.avx512_bf16_available(torch.zeros(1, 1, dtype=torch.bfloat16)),
    reason="this CPU has no AVX-512 BF16",
)
NEEDS = {chunked.ONEDNN: [needs_onednn], chunked.AVX512_BF16: [needs_avx512_bf16]}


def _gemm_params():
    return [
        pytest.param(dtype, gemm, marks=NEEDS.get(gemm, []))
        for dtype in DTYPES
        for gemm in (chunked.IEEE, chunked.ONEDNN, chunked.AVX512_BF16)
        if gemm != chunked.AVX512_BF16 or dtype == torch.bfloat16
    ]


@pytest.mark.parametrize("dtype,gemm", _gemm_params())
def test_exact_at_model_width(dtype, gemm):
    inputs = wide_case(dtype)
    got = chunked_lens(inputs, row_chunk=16, vocab_chunk=512, gemm=gemm)
    check_exact(inputs, got, 512)


@pytest.mark.parametrize("dtype,gemm", _gemm_params())
@pytest.mark.parametrize("d", [64, 576, 896, 3584])
def test_the_fast_gemm_stays_inside_its_band(d, dtype, gemm):
    """|fast - exact| <= band for every entry, on rows built to make fp32 accumulation err:
    a few massive activations (as real residual streams have) over many small terms, and
    unembedding rows that cancel them. oneDNN keeps the same band; VDPBF16PS its own."""
    gen = torch.Generator().manual_seed(d)
    h = torch.randn(32, d, generator=gen)
    h[:, :3] *= 300
    w = torch.randn(2048, d, generator=gen) / d**0.5
    w[:1024, :3] = -h[torch.arange(1024) % 32, :3].sign() * w[:1024, :3].abs() * 0.02
    h, w = h.to(dtype), w.to(dtype)
    inputs = LensInputs(hidden=h, unembed=w, k=1)
    with chunked.ieee_fp32_matmul():
        fast = chunked.chunk_logits(h.float(), 0, len(w), inputs, gemm=gemm)
    want = h.double() @ w.double().T
    norms = h.double().norm(dim=1)
    w_max = float(w.double().norm(dim=1).max())
    band = exact.error_band(norms, w_max, d, 0.0, None, factor=chunked.fast_gemm_factor(gemm, d))
    err = (fast.double() - want).abs()
    assert bool((err <= band[:, None]).all()), float((err / band[:, None]).max())


def test_without_refinement_ranks_are_wrong():
    """The refinement is what makes ranks exact: switched off, planted ties break them."""
    inputs = wide_case(torch.bfloat16)
    got = chunked_lens(inputs, row_chunk=16, vocab_chunk=512, refine=False)
    with pytest.raises(AssertionError, match="differ"):
        check_exact(inputs, got, 512)


def test_directed_rounding_brackets_the_value():
    values = torch.randn(10_000, dtype=torch.float64) * 50
    up, down = round_up_f32(values), round_down_f32(values)
    assert torch.all(up.double() >= values) and torch.all(down.double() <= values)
    assert torch.all(torch.nextafter(down, up) >= up)  # adjacent (or equal) fp32 values


def test_row_chunks_never_split_a_group():
    groups = torch.tensor([3, -1, 0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 2, 3, -1])
    order, spans = row_chunks(groups, row_chunk=3)
    covered = torch.cat([order[a:b] for a, b in spans])
    assert sorted(covered.tolist()) == list(range(len(groups)))
    for g in range(4):
        holders = {i for i, (a, b) in enumerate(spans) if (groups[order[a:b]] == g).any()}
        assert len(holders) == 1


@pytest.mark.parametrize(
    "gib,rows", [(141, 16384), (79.6, 16384), (39.4, 8192), (23.6, 4096), (15.8, 4096), (4, 4096)]
)
def test_gpu_row_chunk_follows_the_devices_memory(gib, rows):
    """An H200 measured 16,384-row blocks 2.2x faster than 4,096 (H100-sized cards get
    them by the same rule, unmeasured); a 24 GB card, whose model and hidden states need
    the room, keeps 4,096 (the totals as the cards report them)."""
    vocab = CHUNKS["cuda"][1]
    assert cuda_row_chunk(int(gib * 2**30), vocab) == rows


def test_default_chunks_size_a_gpus_rows_by_its_memory_and_the_vocab_chunk(monkeypatch):
    """The CUDA branch, run on a CPU: the device's reported memory sets the rows, for the
    caller's vocabulary chunk when it gives one (a wide chunk must not get wide rows too)."""
    props = type("Props", (), {"total_memory": 80 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert default_chunks("cuda") == (16384, 16384)
    assert default_chunks("cuda:0", 151_936) == (4096, 151_936)
    assert default_chunks("cpu") == CHUNKS["cpu"] == (512, 8192)


def test_rows_whose_whole_block_is_in_band_are_resolved_in_batches(monkeypatch):
    """Zero rows tie every entry with their targets, and rows of magnitude 2^-70 sit under
    fp32's normal range where the band is absolute: the whole block is in band. Batches of
    500 of its 16 x 400 entries give the exact ranks."""
    inputs = tiny_case(torch.bfloat16, 2.0**-70)
    hidden = inputs.hidden.clone()
    hidden[::2] = 0
    inputs = replace(inputs, hidden=hidden)
    batches = []
    monkeypatch.setattr(chunked, "BAND_BATCH", 500)
    real = chunked.entry_logits
    monkeypatch.setattr(
        chunked, "entry_logits", lambda h, r, *a: batches.append(len(r)) or real(h, r, *a)
    )
    got = chunked_lens(inputs, row_chunk=16, vocab_chunk=400)
    assert batches.count(500) >= 12  # the block's 6,400 in-band entries, 500 at a time
    check_exact(inputs, got, 400)
    assert torch.equal(got.target_ranks[::2], torch.zeros_like(got.target_ranks[::2]))


def test_rows_the_model_dtype_cannot_hold_are_a_named_error():
    """fp32 rows beyond fp16's 65,504 become inf in an fp16 head: named, not NaN ranks."""
    h = torch.randn(5, 8)
    h[2] *= 1e6
    with pytest.raises(NonFiniteHiddenError, match=r"float16 .* row 2"):
        fused_logit_lens(h, None, torch.randn(30, 8).half(), 3)


def test_a_nan_unembedding_is_a_named_error():
    w = torch.randn(30, 8)
    w[4, 2] = math.nan
    with pytest.raises(LensRangeError, match="NaN or inf"):
        chunked_lens(LensInputs(hidden=torch.randn(3, 8), unembed=w, k=2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_positive_inf_bias_is_a_named_error(bad):
    bias = torch.zeros(20)
    bias[[3, 7]] = bad
    inputs = LensInputs(hidden=torch.randn(3, 4), unembed=torch.randn(20, 4), k=2, bias=bias)
    with pytest.raises(LensRangeError, match="bias holds NaN or \\+inf at 2 entries"):
        chunked_lens(inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_values_multiply_beyond_fp32s_range(dtype):
    """Exact values multiply in float64: products that overflow fp32 (2^200) or fall below
    its range (2^-160) stay exact (fp32 products would give inf and 0). fp16 products
    cannot leave fp32's range; there the test checks exactness only."""
    big, tiny = (2.0**100, 2.0**-80) if dtype != torch.float16 else (2.0**15, 2.0**-14)
    h = torch.tensor([[big, 1.0], [tiny, 0.0], [1.0, 3.0]]).to(dtype)
    w = torch.tensor([[big, 0.0], [tiny, 0.0], [2.0, 5.0]]).to(dtype)
    inputs = LensInputs(hidden=h, unembed=w, k=1)
    rows, cols = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0])
    got = exact.entry_logits(h, rows, cols, inputs)
    want = torch.tensor([big * big, tiny * tiny, 17.0, big], dtype=torch.float64)
    assert torch.equal(got, want)


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
        ({"softcap": 0.0}, LensShapeError),
        ({"softcap": math.inf}, LensShapeError),
        ({"softcap": math.nan}, LensShapeError),
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rank_free_calls_use_model_dtype_logits_and_stay_exact(dtype, monkeypatch):
    """Top-k only (the explorer): cheap low-precision logits, certified exact ids."""
    import extractor.lens.chunked as chunked

    calls = []
    real = chunked.low_precision_logits
    monkeypatch.setattr(
        chunked, "low_precision_logits", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    wide = wide_case(dtype)
    inputs = LensInputs(
        **{**wide.__dict__, "targets": None, "pool_targets": None, "pool_groups": None}
    )
    got = chunked_lens(inputs, row_chunk=16, vocab_chunk=512, gemm=chunked.MODEL_DTYPE)
    assert calls, "the rank-free path did not run"
    check_exact(inputs, got, 512)


@pytest.mark.parametrize("ranked", [True, False], ids=["ranked", "rank-free"])
@pytest.mark.parametrize(
    "fastest",
    [
        chunked.IEEE,
        pytest.param(chunked.ONEDNN, marks=needs_onednn),
        pytest.param(chunked.AVX512_BF16, marks=needs_avx512_bf16),
        chunked.MODEL_DTYPE,
    ],
)
def test_each_call_takes_the_fastest_gemm_it_can(fastest, ranked, monkeypatch):
    """Which GEMM is fastest depends on the CPU's matrix units (a bf16 GEMM is 7x faster
    than fp32 with AMX, 4.8x on AMD Zen 5, slower held to AVX-512 BF16 on an Intel CPU):
    left to itself the engine takes the one measured fastest among those the call's
    contract allows (ranks rule out the model-dtype GEMM), exact either way."""
    wide = wide_case(torch.bfloat16)
    inputs = wide if ranked else replace(wide, targets=None, pool_targets=None)
    d = inputs.unembed.shape[1]
    seconds = {chunked.IEEE: 2.0, chunked.ONEDNN: 3.0, chunked.AVX512_BF16: 3.5}
    seconds |= {chunked.MODEL_DTYPE: 4.0, fastest: 1.0}
    for gemm, s in seconds.items():
        monkeypatch.setitem(chunked._GEMM_SECONDS, (gemm, torch.bfloat16, d), s)
    ran = []
    real_fp32, real_low = chunked.chunk_logits, chunked.low_precision_logits

    def fp32(*args, **kwargs):
        ran.append(args[6] if len(args) > 6 else kwargs.get("gemm", chunked.IEEE))
        return real_fp32(*args, **kwargs)

    def low(*args, **kwargs):
        ran.append(chunked.MODEL_DTYPE)
        return real_low(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunk_logits", fp32)
    monkeypatch.setattr(chunked, "low_precision_logits", low)
    got = chunked_lens(inputs, row_chunk=16, vocab_chunk=512)
    want = chunked.IEEE if ranked and fastest == chunked.MODEL_DTYPE else fastest
    assert set(ran) == {want}
    check_exact(inputs, got, 512)


def test_the_gemm_choice_is_measured_once_per_gemm_dtype_and_width(monkeypatch):
    monkeypatch.setattr(chunked, "_GEMM_SECONDS", {})
    w = torch.randn(100, 96).bfloat16()
    rank_free = LensInputs(hidden=torch.randn(3, 96), unembed=w, k=2)
    first = chunked.fastest_gemm(rank_free)
    choices = chunked.gemm_choices(rank_free)
    assert first in choices and chunked.MODEL_DTYPE in choices
    assert set(chunked._GEMM_SECONDS) == {(g, torch.bfloat16, 96) for g in choices}
    real = chunked._best_times
    monkeypatch.setattr(chunked, "_best_times", lambda runs: pytest.fail("measured twice"))
    assert chunked.fastest_gemm(replace(rank_free, unembed=torch.randn(7, 96).bfloat16())) == first
    fp32 = LensInputs(hidden=torch.randn(3, 96), unembed=w.float(), k=2)
    assert chunked.MODEL_DTYPE not in chunked.gemm_choices(fp32)  # no cheaper dtype
    monkeypatch.setattr(exact, "_FAILED_KERNELS", {exact.ONEDNN_GEMM})
    assert chunked.fastest_gemm(fp32) == chunked.IEEE  # the only one left: nothing timed
    monkeypatch.setattr(chunked, "_best_times", real)
    monkeypatch.setattr(chunked, "_GEMM_SECONDS", {})
    ranked = replace(rank_free, targets=torch.tensor([[1]] * 3))
    chunked_lens(ranked)
    assert all(g != chunked.MODEL_DTYPE for g, _, _ in chunked._GEMM_SECONDS), (
        "a call that asks ranks timed a GEMM it cannot take"
    )


def test_a_gemm_the_call_cannot_take_is_a_named_error():
    ranked = wide_case(torch.float32)
    with pytest.raises(ValueError, match="model-dtype"):
        chunked_lens(ranked, gemm=chunked.MODEL_DTYPE)
    with pytest.raises(ValueError, match="cannot give"):
        chunked_lens(ranked, gemm="tf32")


# Found by an independent review (each failed before its fix).


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tiny_unembedding_rows_keep_a_band(dtype):
    """Row norms of 2^-80 underflowed in fp32: the band became 0 while the GEMM rounded."""
    d, s = 384, 2.0**-80
    h = torch.zeros(1, d)
    h[0, 0], h[0, 128], h[0, 256] = 2.0**24, 1.0, -(2.0**24)
    w = torch.zeros(2, d)
    w[0, 0] = w[0, 128] = w[0, 256] = s  # exact logit 2^-80; a fast fp32 sum gives 0
    w[1, 128] = s / 2  # the target, 2^-81
    inputs = LensInputs(hidden=h.to(dtype), unembed=w.to(dtype), k=1, targets=torch.tensor([[1]]))
    check_exact(inputs, chunked_lens(inputs))


@pytest.mark.parametrize("scale", [2.0**-60, 2.0**-70, 2.0**-75])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_hidden_states_below_fp32s_normal_range_stay_exact(dtype, scale):
    """Products under 2^-126 round absolutely (or flush to zero): the band takes that in,
    and exact values multiply them in float64 (both were missing: 4 to 96 ranks of 96
    wrong at 2^-70 and 2^-75)."""
    inputs = tiny_case(dtype, scale)
    check_exact(inputs, chunked_lens(inputs))


def test_users_of_torchs_per_backend_precision_switches_keep_them(monkeypatch):
    """A user who had set precision through ``torch.backends.*.matmul.fp32_precision``
    made every lens call raise (torch's legacy getter refuses mixed settings; found by a
    review). The call now runs its GEMMs in IEEE fp32 and gives the settings back."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    if not hasattr(mkldnn, "fp32_precision"):
        pytest.skip("this torch has no per-backend precision switches")
    seen = []
    real = chunked.chunk_logits
    monkeypatch.setattr(
        chunked,
        "chunk_logits",
        lambda *a, **kw: (
            seen.append((cuda.fp32_precision, mkldnn.fp32_precision)) or real(*a, **kw)
        ),
    )
    try:
        cuda.fp32_precision, mkldnn.fp32_precision = "tf32", "bf16"
        inputs = wide_case(torch.float32)
        check_exact(inputs, chunked_lens(inputs, row_chunk=16, vocab_chunk=512), 512)
        assert (cuda.fp32_precision, mkldnn.fp32_precision) == ("tf32", "bf16")
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = "none", "none"
    assert seen and set(seen) == {("ieee", "ieee")}


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("scale", [488.0, 100.0, 10.0])
def test_a_chunk_with_no_finite_logit_after_very_negative_ones_adds_nothing(scale, compile):
    """A row whose finite logits lie below -88 followed by a chunk masked by -inf bias: the
    online log-sum-exp took 0 * exp(325) = NaN (found by a review)."""
    inputs = LensInputs(
        hidden=torch.tensor([[scale]]).bfloat16(),
        unembed=torch.tensor([[-0.66796875], [0.921875]]).bfloat16(),
        k=2,
        bias=torch.tensor([0.625, float("-inf")]).bfloat16(),
    )
    got = chunked_lens(inputs, vocab_chunk=1, compile=compile)
    assert torch.isfinite(got.logsumexp).all(), got.logsumexp
    check_exact(inputs, got, 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rank_free_fp16_never_certifies_an_overflowed_gemm(sign):
    """A logit beyond fp16's range must not come out of the fp16 GEMM as +-inf."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, generator=gen)
    h[:, 0] = 256.0
    w = torch.randn(64, 16, generator=gen) * 0.1
    w[0, 0] = 256.0 * sign  # a logit of about +-65536
    w[50, 0] = 252.0 * sign
    inputs = LensInputs(hidden=h.half(), unembed=w.half(), k=2)
    check_exact(inputs, chunked_lens(inputs, gemm=chunked.MODEL_DTYPE))


def test_norm_runs_on_the_model_dtype_and_once_for_all_rows():
    """Rows given in fp32 to a bf16 model are cast first (as the model would hold them),
    and a norm with a projection (OPT-350m) sees all rows in one batch, as the reference."""
    gen = torch.Generator().manual_seed(1)
    d, v = 64, 300
    norm = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 32, bias=False))
    norm = norm.to(torch.bfloat16)
    inputs = LensInputs(
        hidden=torch.randn(70, d, generator=gen) * 3,  # fp32 rows, bf16 model
        unembed=torch.randn(v, 32, generator=gen).bfloat16(),
        k=5,
        final_norm=norm,
        targets=torch.randint(0, v, (70, 3), generator=gen),
    )
    check_exact(inputs, chunked_lens(inputs, row_chunk=16, vocab_chunk=64), 64)


def test_logits_beyond_fp32_are_a_named_error():
    h = torch.full((1, 4), 1e30)
    w = torch.full((3, 4), 1e10)
    with pytest.raises(LensRangeError, match="fp32"):
        chunked_lens(LensInputs(hidden=h, unembed=w, k=1))


@pytest.mark.parametrize("targets", [0, 1, 3, 5, 8])
def test_compiled_reduction_classifies_like_eager_with_padded_targets(targets):
    """Targets are padded to a power of two for the compiler; the padding counts nothing."""
    from extractor.lens.chunked import _chunk_stats_eager, _pad_targets, chunk_stats

    gen = torch.Generator().manual_seed(targets)
    logits = torch.randn(6, 192, generator=gen)
    logits[0, :5] = float("-inf")
    lo = torch.randn(6, targets, generator=gen)
    hi = lo + 0.5
    padded = _pad_targets(lo)
    assert padded.shape[1] in (0, 1, 2, 4, 8) and padded.shape[1] >= targets
    want = _chunk_stats_eager(logits, lo, hi)
    got = chunk_stats(logits, lo, hi, compile=True)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape
        assert (
            torch.allclose(g, w, rtol=1e-6, atol=0) if g.is_floating_point() else torch.equal(g, w)
        )


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_pass_sums_in_fp32_over_low_precision_logits(dtype, compile):
    """Rank-free calls hand the pass the GEMM output in the model's dtype. Its exp-sum must
    still be fp32: a sum in bf16 made SmolLM2's log-sum-exp errors 3.8x larger (0.0038
    against 0.0010 over 1,024 real rows), inside the suite's wide bound. Against the same
    values in fp32: equal eager; compiled, two fp32 sums of 1,024 terms in any order, so
    within 2 gamma_1024 of each other."""
    from extractor.lens.chunked import chunk_stats
    from extractor.lens.exact import gamma

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(8, 1024, generator=gen) * 4).to(dtype)
    none = torch.empty(8, 0)
    low = chunk_stats(logits, none, none, compile=compile)[2]
    full = chunk_stats(logits.float(), none, none, compile=compile)[2]
    assert low.dtype == torch.float32
    if compile:
        assert torch.allclose(low, full, rtol=2 * gamma(1024), atol=0)
    else:
        assert torch.equal(low, full)


def test_exact_values_do_not_depend_on_how_many_are_asked():
    """One fixed summation order (exact.ordered_sum): an entry's float64 value is the same
    in a call of one entry as in a call of thousands, as a tie between a target and its
    duplicate needs. (CUDA chose the order by the call's size before.)"""
    from extractor.lens.exact import entry_logits

    gen = torch.Generator().manual_seed(5)
    inputs = LensInputs(
        hidden=torch.randn(12, 256, generator=gen),
        unembed=torch.randn(1500, 256, generator=gen),
        k=5,
    )
    rows = torch.randint(0, 12, (3000,), generator=gen)
    cols = torch.randint(0, 1500, (3000,), generator=gen)
    together = entry_logits(inputs.hidden, rows, cols, inputs)
    one_by_one = torch.cat(
        [entry_logits(inputs.hidden, rows[i : i + 1], cols[i : i + 1], inputs) for i in range(40)]
    )
    assert torch.equal(together[:40], one_by_one)


def test_a_candidate_two_bands_below_the_kth_is_still_resolved_exactly():
    """The pruning rule at its edge: fast logits anywhere inside the band.

    Exact logits 10, 8 and 8.5 (h = [1], W = [[10], [8], [8.5]]: exact in fp32), seen as
    fast logits 10, 9 (8 + band) and 7.5 (8.5 - band) with a band of 1. The k = 2 best
    are 10 and 8.5, though 8.5's fast logit is 1.5 bands below the 2nd fast one: a rule of
    one band would have left it unresolved and ranked it below 8.
    """
    from extractor.lens.chunked import _candidate_exact, _row_scope, _SegmentState
    from extractor.lens.exact import exact_order

    h = torch.tensor([[1.0]])
    inputs = LensInputs(hidden=h, unembed=torch.tensor([[10.0], [8.0], [8.5]]), k=2)
    scope = _row_scope(inputs, h, torch.empty((1, 0), dtype=torch.float64))
    state = _SegmentState(
        counts=torch.zeros((1, 0), dtype=torch.long),
        cand_vals=torch.tensor([[10.0, 9.0, 7.5]]),
        cand_ids=torch.tensor([[0, 1, 2]]),
        band=torch.tensor([1.0], dtype=torch.float64),
    )
    values = _candidate_exact(scope, state)
    assert values.tolist() == [[10.0, 8.0, 8.5]]
    best = state.cand_ids.gather(1, exact_order(values, state.cand_ids)[:, :2])
    assert best.tolist() == [[0, 2]]

    # At exactly two bands below, an exact tie for the k-th place: the candidate must be
    # resolved (the rule is >=), and the lower id wins the tie.
    w = torch.tensor([[10.0], [8.0], [8.0]])
    tie = replace(inputs, unembed=w)
    scope = _row_scope(tie, h, torch.empty((1, 0), dtype=torch.float64))
    state = replace(state, cand_vals=torch.tensor([[10.0, 7.0, 9.0]]), cand_exact=None)
    values = _candidate_exact(scope, state)
    best = state.cand_ids.gather(1, exact_order(values, state.cand_ids)[:, :2])
    assert best.tolist() == [[0, 1]]


def test_candidates_far_below_the_kth_skip_float64(monkeypatch):
    """Well-separated logits: only the k best of the k + 4 candidates get float64 values,
    and the result is still the float64 reference's."""
    gen = torch.Generator().manual_seed(11)
    n, d, v, k = 16, 8, 512, 3
    # Logits spread over hundreds of units, bands of ~1e-4: no candidate near the k-th.
    inputs = LensInputs(
        hidden=torch.randn(n, d, generator=gen) * 10,
        unembed=torch.randn(v, d, generator=gen) * 10,
        k=k,
    )
    resolved = []
    real = chunked.entry_logits

    def counting(h_rows, rows, cols, *args, **kwargs):
        resolved.append(len(rows))
        return real(h_rows, rows, cols, *args, **kwargs)

    monkeypatch.setattr(chunked, "entry_logits", counting)
    check_exact(inputs, chunked_lens(inputs, compile=False))
    candidates = n * (k + 4)
    assert n * k <= sum(resolved) < candidates


@pytest.mark.parametrize("width,k", [(8192, 18), (640, 3), (1280, 10), (640, 10), (100, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_block_topk_finds_the_k_largest_values(width, k, dtype):
    """Only the k blocks with the largest maxima are searched: the values found are still
    the k largest of each row (bf16 draws tie often), and each column holds its value.
    (640, 10) and (100, 4) take the plain top-k: k blocks cover the row, or no whole block."""
    from extractor.lens.chunked import TOPK_BLOCK, block_topk

    gen = torch.Generator().manual_seed(width + k)
    logits = torch.randn(37, width, generator=gen).to(dtype)
    n_blocks = width // TOPK_BLOCK if width % TOPK_BLOCK == 0 else 0
    block_max = logits.view(37, n_blocks, -1).amax(-1) if n_blocks else logits[:, :0]
    top, cols = block_topk(logits, block_max, k)
    want = logits.topk(k, dim=1).values
    assert torch.equal(top.sort(dim=1, descending=True).values, want)
    assert torch.equal(logits.gather(1, cols), top)
    assert bool((cols.sort(dim=1).values.diff(dim=1) > 0).all())  # k distinct entries


def test_rank_calls_chunk_the_vocabulary_by_row_norm(monkeypatch):
    """Calls that ask ranks walk each segment run in order of ||W[j]||: a chunk's band
    scales with its largest row norm, so fewer entries fall in band (451 against 728 here,
    where every other row is 16x shorter; deterministic) and every result stays exact."""
    gen = torch.Generator().manual_seed(5)
    n, d, v = 24, 256, 4096
    w = torch.randn(v, d, generator=gen) / d**0.5 * 4
    w[1::2] /= 16
    inputs = LensInputs(
        hidden=(torch.randn(n, d, generator=gen) * 3).bfloat16(),
        unembed=w.bfloat16(),
        k=10,
        segments=VocabSegments.from_ranges(v, {"speech": [(3000, v)]}),
        targets=torch.randint(0, v, (n, 12), generator=gen),
        pool_groups=torch.arange(n) // 4,
        pool_targets=torch.randint(0, v, (n // 4, 3), generator=gen),
    )
    columns = chunked.norm_sorted_columns(inputs)
    norms = exact.unembed_row_norms(inputs.unembed)
    for start, stop, _ in inputs.resolved_segments().runs():
        ids = columns.ids[start:stop]
        assert torch.equal(ids.sort().values, torch.arange(start, stop))
        assert bool((norms[ids].diff() >= 0).all())
    assert torch.equal(columns.at[columns.ids], torch.arange(v))

    in_band = []
    real = chunked._resolve_band
    monkeypatch.setattr(
        chunked,
        "_resolve_band",
        lambda scope, st, near, *a: in_band.append(int(near.sum())) or real(scope, st, near, *a),
    )
    sorted_run = chunked_lens(inputs, row_chunk=8, vocab_chunk=512)
    check_exact(inputs, sorted_run, 512)
    sorted_in_band, in_band[:] = sum(in_band), []
    monkeypatch.setattr(chunked, "norm_sorted_columns", lambda _: chunked.ColumnOrder())
    plain_run = chunked_lens(inputs, row_chunk=8, vocab_chunk=512)
    check_exact(inputs, plain_run, 512)
    assert sorted_in_band < 0.75 * sum(in_band), (sorted_in_band, sum(in_band))


def test_the_memo_forgets_unembeddings_that_are_gone():
    """Facts remembered per W (norms, the sorted column order: [V]-sized, on W's device)
    leave with their W, not only when the memo fills up."""
    import gc

    w = torch.randn(300, 8)
    exact.unembed_row_norms(w)
    slot = next(s for s in exact._MEMO if s[0] == id(w) and s[1] == "row norms")
    del w
    gc.collect()
    exact.unembed_row_norms(torch.randn(5, 8))
    assert slot not in exact._MEMO


def test_row_norms_are_upper_bounds_in_blocks():
    """Computed a block of rows at a time, still an upper bound of every row's norm, for
    tiny and huge rows alike."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(1000, 16, generator=gen) * torch.logspace(-30, 30, 1000)[:, None]
    norms = exact._row_norms(w, block=64)
    want = w.double().norm(dim=1)
    # Above: the 1 + 2^-10 inflation covers fp32's error on 16 scaled terms, (16 + 2)u.
    # Below: that inflation times the same error, under 1 + 2^-9.
    assert bool((norms >= want).all()) and bool((norms <= want * (1 + 2**-9)).all())
