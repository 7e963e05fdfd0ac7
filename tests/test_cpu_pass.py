"""The C pass over a block of fast logits: the compiled pass's results, entry for entry
(the exp-sum within its derived bound)."""

from __future__ import annotations

import math

import pytest
import torch

from extractor.lens import chunked, cpu_pass, exact
from extractor.lens.chunked import chunked_lens

from .clone_variants import variant
from .lens_checks import check_exact, plant_ties, runs_against_a_fixed_pivot, wide_case

U = 2.0**-24  # fp32 unit roundoff


def _has_loop() -> bool:
    try:
        cpu_pass.LIBRARY.get()
    except (cpu_pass.native.KernelUnavailable, OSError):
        return False
    return True


needs_loop = pytest.mark.skipif(not _has_loop(), reason="no C compiler on this machine")


def _pass(values, lo, hi, kk: int = 0):
    """What the compiled pass, a scan of its mask and ``block_topk`` find (eager: the same
    comparisons), in :func:`cpu_pass.block_pass`'s order."""
    row_max, row_min, sumexp, above, near, blocks = chunked._chunk_stats_eager(values, lo, hi)
    none = torch.empty(0, dtype=torch.long)
    rows, cols = near.bool().nonzero(as_tuple=True) if near.shape[1] else (none, none)
    top_v, top_c = chunked.block_topk(values, blocks, kk)
    return row_max, row_min, sumexp, blocks, above, rows, cols, top_v, top_c


def _case(r: int, c: int, t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(r, c, generator=gen) * 3).round(decimals=1)  # many exact ties
    centre = values[torch.arange(r)[:, None], torch.randint(0, c, (r, t), generator=gen)]
    width = torch.rand(r, t, generator=gen) * 0.3
    lo, hi = centre - width, centre + width
    lo[:, :1] = hi[:, :1] = centre[:, :1]  # a zero-width band: equality counts as inside
    if t > 2:
        lo[0, 2] = hi[0, 2] = float("inf")  # a pad: nothing above or inside
        lo[-1, 1] = hi[-1, 1] = float("-inf")  # a target of -inf: every finite entry above
    if c > 3:
        values[0, :3] = float("-inf")  # entries masked by a -inf bias
    return values, lo, hi


def _sumexp_bound(values: torch.Tensor) -> float:
    """Largest relative error of the loop's exp-sum against float64 sums of exp of the same
    fp32 differences: each term within ``EXP_MAX_ULPS`` ulps (2u each), then at most
    ``ceil(C / 64)`` additions in its lane and 6 in the fold of 64 lanes (one rounding each,
    first order, all terms positive)."""
    c = values.shape[1]
    return (2 * cpu_pass.EXP_MAX_ULPS + math.ceil(c / 64) + 6) * U * 1.001


def _assert_same(got, want, values):
    """Equal, but the exp-sums (within their bound) and the top entries (the same values,
    at columns that hold them: ties may pick other columns)."""
    names = ["row_max", "row_min", "sumexp", "blocks", "above", "rows", "cols", "top_v", "top_c"]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name not in ("sumexp", "top_v", "top_c"):
            assert torch.equal(g, w), name
    top_v, top_c = got[7], got[8]
    assert torch.equal(top_v.sort(1).values, want[7].sort(1).values)
    assert torch.equal(values.gather(1, top_c), top_v)
    assert all(len(set(row)) == len(row) for row in top_c.tolist())
    safe = torch.where(torch.isfinite(got[0]), got[0], 0).float()
    terms = (values.float() - safe[:, None]).double().exp()  # the same fp32 differences
    want_sum = terms.sum(1)
    err = (got[2].double() - want_sum).abs()
    assert bool((err <= _sumexp_bound(values) * want_sum).all()), float(err.max())


@needs_loop
@pytest.mark.parametrize(
    "r,c,t",
    [(7, 200, 12), (1, 64, 1), (33, 65, 3), (5, 8192, 16), (3, 1, 20), (40, 300, 0), (4, 128, 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_loop_finds_what_the_pass_finds(r, c, t, dtype):
    """fp32 logits (ranks), and the bf16 or fp16 ones of rank-free calls (widened exactly;
    maxima come back in their own type, as the pass gives them)."""
    values, lo, hi = _case(r, c, t, seed=r * c + t)
    values = values.to(dtype)
    kk = min(14, c)
    _assert_same(cpu_pass.block_pass(values, lo, hi, kk), _pass(values, lo, hi, kk), values)


def _ties_case():
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(7, 300, generator=gen) * 2).round()  # few distinct values
    values[0] = 3.0
    values[1] = float("-inf")
    values[2, 100:] = float("-inf")
    values[3, ::7] = 9.0  # 43 ties at the top
    values[4] = torch.arange(300.0)  # rising: many candidates, selected, not inserted
    values[5] = -torch.arange(300.0)
    return values, torch.zeros(7, 0), torch.zeros(7, 0)


@needs_loop
@pytest.mark.parametrize("kk", [0, 1, 5, 14, 64])
def test_the_top_entries_are_the_largest_whatever_the_ties(kk):
    """Rows of one repeated value, of -inf, of ties across the k-th place, rising and
    falling: the values kept are the kk largest, at distinct columns holding them."""
    values, lo, hi = _ties_case()
    got = cpu_pass.block_pass(values, lo, hi, kk)
    assert got[7].shape == got[8].shape == (7, kk)
    _assert_same(got, _pass(values, lo, hi, kk), values)


def _shaped_rows(c: int, kk: int) -> torch.Tensor:
    """Rows whose candidates overflow their buffer many times, each another way: rising,
    falling, sawtooth, a few repeated values, infinities among ties, a shuffled ramp, runs
    built against a fixed pivot, and bars one ulp apart (the least subnormal just above
    zeros, zeros just above its negative: scanned last, at the lowest columns)."""
    gen = torch.Generator().manual_seed(c)
    ramp = torch.arange(c, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # the least subnormal
    rows = [
        ramp,
        -ramp,
        ramp % 97,
        -(ramp % 64),
        torch.randint(0, 3, (c,), generator=gen).float(),
        torch.where(ramp % 5 == 0, float("inf"), 1.0),
        torch.full((c,), float("inf")),
        torch.where(ramp < c // 2, float("-inf"), ramp % 7),
        ramp[torch.randperm(c, generator=gen)],
        torch.full((c,), -0.0).index_fill(0, torch.tensor([c - 1]), 0.0),
        torch.zeros(c).index_fill(0, torch.arange(3), tiny),
        torch.full((c,), -tiny).index_fill(0, torch.arange(3), 0.0),
        runs_against_a_fixed_pivot(c, kk),
    ]
    return torch.stack(rows)


@needs_loop
@pytest.mark.parametrize("c", [1000, 4096])
@pytest.mark.parametrize("kk", [1, 2, 8, 64])
def test_rows_of_every_shape_keep_their_largest(c, kk):
    """Whenever 4 kk candidates have come, the loop keeps the kk largest and raises its bar
    above the least of them: what it returns are still the row's kk largest values, at
    distinct columns holding them."""
    values = _shaped_rows(c, kk)
    none = torch.zeros(len(values), 0)
    got_v, got_c = cpu_pass.block_pass(values, none, none, kk)[7:]
    want = values.topk(kk, dim=1).values
    assert torch.equal(got_v.sort(1, descending=True).values, want)
    assert torch.equal(values.gather(1, got_c), got_v)
    assert all(len(set(row)) == kk for row in got_c.tolist())


@needs_loop
@pytest.mark.parametrize("kk", [65, 200, 300])
def test_beyond_max_kk_torch_keeps_the_top_entries(kk):
    """Insertion into sorted lists grows with kk squared (a review measured 0.56 s a block
    at kk = 8,192): above MAX_KK the loop keeps none and torch's top-k searches its block
    maxima, as before."""
    values, lo, hi = _ties_case()
    with pytest.raises(ValueError, match="kk must be within"):
        cpu_pass.block_pass(values, lo, hi, kk)
    got = chunked._classify(values, lo, hi, compile=False, kk=kk)
    _assert_same(got, _pass(values, lo, hi, kk), values)


@needs_loop
def test_rows_of_minus_infinity_and_an_infinite_logit():
    values = torch.randn(3, 128)
    values[0] = float("-inf")  # every entry masked: max -inf, sum 0
    values[1, 5] = float("inf")
    lo = hi = torch.zeros(3, 1)
    got = cpu_pass.block_pass(values, lo, hi)
    want = _pass(values, lo, hi)
    for i in (0, 1, 3, 4, 5, 6):  # all but the exp-sums (and the top entries: none asked)
        assert torch.equal(got[i], want[i])
    assert got[2][:2].tolist() == want[2][:2].tolist() == [0.0, float("inf")]
    terms = (values[2] - got[0][2]).double().exp()
    assert abs(float(got[2][2]) - float(terms.sum())) <= _sumexp_bound(values) * terms.sum()


@needs_loop
def test_strided_rows_and_python_threads_find_alike(monkeypatch):
    values, lo, hi = _case(40, 300, 5, seed=9)
    view = torch.cat([values, values], 1)[:, :300]  # a row stride of 600
    team = cpu_pass.block_pass(view, lo, hi)
    monkeypatch.setattr(cpu_pass.LIBRARY, "_team_pid", None)
    threads = cpu_pass.block_pass(view, lo, hi)
    _assert_same(team, _pass(values, lo, hi), values)
    assert all(torch.equal(a, b) for a, b in zip(team, threads, strict=True))


@needs_loop
def test_its_exp_is_within_its_stated_ulps():
    """Over 6.3 million fp32 values of [-87, 88] (1.21 ulps at most on AMD EPYC), and the
    ends: 0 below -87, infinity above 88, NaN kept."""
    x = torch.cat(
        [
            torch.linspace(-87, 88, 1 << 22),
            torch.rand(1 << 21, generator=torch.Generator().manual_seed(0)) * 175 - 87,
        ]
    )
    got = cpu_pass.exp(x).double()
    true = x.double().exp()
    ulp = torch.exp2(torch.floor(torch.log2(true)) - 23)
    assert float(((got - true).abs() / ulp).max()) <= cpu_pass.EXP_MAX_ULPS
    edges = torch.tensor([-87.5, 88.5, float("-inf"), float("inf"), 0.0, -0.0, 1e-40])
    assert cpu_pass.exp(edges).tolist() == [0.0, float("inf"), 0.0, float("inf"), 1.0, 1.0, 1.0]
    assert math.isnan(cpu_pass.exp(torch.tensor([float("nan")])).item())


@needs_loop
def test_the_lens_is_exact_with_and_without_the_loop(monkeypatch):
    """Ranks and top-k with planted ties, the loop on and turned off (the self-check's
    remedy: the compiled pass and its mask take over)."""
    inputs = plant_ties(wide_case(torch.bfloat16), 5)
    with_loop = chunked_lens(inputs, row_chunk=16, vocab_chunk=512)
    check_exact(inputs, with_loop, 512)
    monkeypatch.setattr(exact, "_FAILED_KERNELS", {exact.C_PASS})
    without = chunked_lens(inputs, row_chunk=16, vocab_chunk=512)
    check_exact(inputs, without, 512)
    assert torch.equal(with_loop.target_ranks, without.target_ranks)
    assert torch.equal(with_loop.topk_ids, without.topk_ids)


def test_without_a_compiler_the_pass_runs_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_pass.LIBRARY, "_lib", None)
    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    values, lo, hi = _case(6, 100, 4, seed=3)
    with pytest.warns(UserWarning, match="lens pass over fast logits failed.*no C compiler"):
        got = chunked._classify(values, lo, hi, compile=False, kk=5)
    assert not exact.kernel_enabled(exact.C_PASS)
    want = _pass(values, lo, hi, kk=5)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@needs_loop
def test_fp16_and_bf16_logits_are_widened_exactly():
    """Every fp16 value (subnormals, infinities) and a sweep of bf16 ones read as the same
    fp32 values torch's cast gives: the maxima of one-entry blocks are the values."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, values in [
        (torch.float16, bits.view(torch.float16)),
        (torch.bfloat16, bits.view(torch.bfloat16)),
    ]:
        values = values[~torch.isnan(values.float())].reshape(-1, 1)  # NaN is refused
        none = torch.zeros(len(values), 0)
        got = cpu_pass.block_pass(values, none, none, 1)
        assert torch.equal(got[0].float(), values.float()[:, 0])
        assert got[0].dtype == dtype


@needs_loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_no_rows_come_back_in_the_passs_types(dtype):
    """Zero rows: the fallback's types too (found by a review)."""
    values, none = torch.empty(0, 128, dtype=dtype), torch.empty(0, 0)
    got = cpu_pass.block_pass(values, none, none, 5)
    want = _pass(values, none, none, 5)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    assert [g.shape for g in got] == [w.shape for w in want]


@needs_loop
def test_logits_holding_nan_are_refused_with_their_row():
    """Maxima and top-k are not defined with NaN (a review found unfilled top-k columns):
    the lens never sends them, and the loop refuses them."""
    values = torch.zeros(3, 70)
    values[2, 65] = float("nan")
    with pytest.raises(ValueError, match="NaN \\(row 2 of 3\\)"):
        cpu_pass.block_pass(values, torch.zeros(3, 1), torch.zeros(3, 1), 4)


def test_only_cpu_logits_it_reads_and_ordered_bands_are_taken():
    assert not cpu_pass.supports(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16 CPU logits"):
        cpu_pass.block_pass(torch.zeros(2, 2).double(), torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="lo and hi"):
        cpu_pass.block_pass(torch.zeros(2, 2), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="lo <= hi"):
        cpu_pass.block_pass(torch.zeros(2, 2), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="lo <= hi"):
        cpu_pass.block_pass(torch.zeros(2, 2), torch.full((2, 1), float("nan")), torch.ones(2, 1))
    with pytest.raises(TypeError, match="fp32"):  # float64 bands would be rounded, not compared
        cpu_pass.block_pass(torch.zeros(2, 2), torch.zeros(2, 1).double(), torch.ones(2, 1))


@needs_loop
@pytest.mark.parametrize("team", [True, False], ids=["torchs-team", "python-threads"])
def test_subnormals_are_compared_as_they_are_whatever_each_threads_mode(team, monkeypatch):
    """A thread that flushes subnormals (``torch.set_flush_denormal``) saw 1e-40 as 0, and
    a worker keeps the mode it was created with: the loop compares in IEEE mode on every
    thread (found by a review)."""
    values = torch.full((4, 64), 1e-40)
    lo, hi = torch.full((4, 1), -1.0), torch.zeros(4, 1)
    if not team:
        monkeypatch.setattr(cpu_pass.LIBRARY, "_team_pid", None)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        got = cpu_pass.block_pass(values, lo, hi)
    finally:
        torch.set_flush_denormal(False)
    above, rows = got[4], got[5]
    assert bool((above == 64).all()) and len(rows) == 0
    assert bool((got[0] == 1e-40).all()) and bool((got[1] == 1e-40).all())


@needs_loop
@pytest.mark.parametrize("target", ["avx2", "default"])
def test_every_clone_gives_the_same_bits(target, monkeypatch):
    """The loader picks a clone per CPU: the AVX2 and baseline ones compute what this CPU's
    does, bit for bit, exp-sums included (their lanes are the source's)."""
    values, lo, hi = _case(37, 1000, 12, seed=5)
    half = values.half()  # the widening of rank-free calls' logits too
    x = torch.linspace(-90, 90, 100_001)
    here = (
        cpu_pass.block_pass(values, lo, hi, 14),
        cpu_pass.exp(x),
        cpu_pass.block_pass(half, lo, hi, 14),
    )
    lib = variant(cpu_pass, target, cpu_pass.LIBRARY.flags)
    monkeypatch.setattr(cpu_pass.LIBRARY, "_lib", lib)
    monkeypatch.setattr(cpu_pass.LIBRARY, "_team_pid", None)
    there = (
        cpu_pass.block_pass(values, lo, hi, 14),
        cpu_pass.exp(x),
        cpu_pass.block_pass(half, lo, hi, 14),
    )
    assert all(torch.equal(a, b) for a, b in zip(here[0], there[0], strict=True))
    assert torch.equal(here[1], there[1])
    assert all(torch.equal(a, b) for a, b in zip(here[2], there[2], strict=True))
