"""The band loop: the compiled pass's classification of each fast logit, entry for entry."""

from __future__ import annotations

import pytest
import torch

from extractor.lens import chunked, cpu_bands, exact
from extractor.lens.chunked import chunked_lens

from .lens_checks import check_exact, plant_ties, wide_case


def _has_loop() -> bool:
    try:
        cpu_bands.LIBRARY.get()
    except (cpu_bands.native.KernelUnavailable, OSError):
        return False
    return True


needs_loop = pytest.mark.skipif(not _has_loop(), reason="no C compiler on this machine")


def _pass(values, lo, hi):
    """What the compiled pass and a scan of its mask find (eager: the same comparisons)."""
    _, _, _, above, near, _ = chunked._chunk_stats_eager(values, lo, hi)
    rows, cols = near.bool().nonzero(as_tuple=True)
    return above, rows, cols


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
    values[0, :3] = float("-inf")  # entries masked by a -inf bias
    return values, lo, hi


@needs_loop
@pytest.mark.parametrize(
    "r,c,t", [(7, 200, 12), (1, 64, 1), (33, 65, 3), (5, 8192, 16), (3, 1, 20)]
)
def test_the_loop_classifies_every_entry_as_the_pass_does(r, c, t):
    values, lo, hi = _case(r, c, t, seed=r * c + t)
    above, rows, cols = cpu_bands.classify(values, lo, hi)
    want_above, want_rows, want_cols = _pass(values, lo, hi)
    assert torch.equal(above, want_above)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)


@needs_loop
def test_strided_rows_and_python_threads_classify_alike(monkeypatch):
    values, lo, hi = _case(40, 300, 5, seed=9)
    view = torch.cat([values, values], 1)[:, :300]  # a row stride of 600
    team = cpu_bands.classify(view, lo, hi)
    monkeypatch.setattr(cpu_bands.LIBRARY, "_team_pid", None)
    threads = cpu_bands.classify(view, lo, hi)
    want = _pass(values, lo, hi)
    for got in (team, threads):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@needs_loop
def test_the_lens_is_exact_with_and_without_the_loop(monkeypatch):
    """Ranks and top-k with planted ties, the loop on and turned off (the self-check's
    remedy: the compiled pass and its mask take over)."""
    inputs = plant_ties(wide_case(torch.bfloat16), 5)
    with_loop = chunked_lens(inputs, row_chunk=16, vocab_chunk=512)
    check_exact(inputs, with_loop, 512)
    monkeypatch.setattr(exact, "_FAILED_KERNELS", {exact.C_BANDS})
    without = chunked_lens(inputs, row_chunk=16, vocab_chunk=512)
    check_exact(inputs, without, 512)
    assert torch.equal(with_loop.target_ranks, without.target_ranks)


def test_without_a_compiler_the_pass_classifies_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_bands.LIBRARY, "_lib", None)
    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    values, lo, hi = _case(6, 100, 4, seed=3)
    with pytest.warns(UserWarning, match="band classification failed.*no C compiler"):
        got = chunked._classify(values, lo, hi, compile=False)
    assert not exact.kernel_enabled(exact.C_BANDS)
    above, rows, cols = _pass(values, lo, hi)
    assert torch.equal(got[4], above) and torch.equal(got[5], rows) and torch.equal(got[6], cols)


def test_only_fp32_cpu_logits_are_taken():
    assert not cpu_bands.supports(torch.zeros(2, 2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="fp32 CPU logits"):
        cpu_bands.classify(torch.zeros(2, 2).double(), torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="lo and hi"):
        cpu_bands.classify(torch.zeros(2, 2), torch.zeros(3, 1), torch.zeros(3, 1))


@needs_loop
@pytest.mark.parametrize("team", [True, False], ids=["torchs-team", "python-threads"])
def test_subnormals_are_compared_as_they_are_whatever_each_threads_mode(team, monkeypatch):
    """A thread that flushes subnormals (``torch.set_flush_denormal``) saw 1e-40 as 0, and
    a worker keeps the mode it was created with: the loop compares in IEEE mode on every
    thread (found by a review)."""
    values = torch.full((4, 64), 1e-40)
    lo, hi = torch.full((4, 1), -1.0), torch.zeros(4, 1)
    if not team:
        monkeypatch.setattr(cpu_bands.LIBRARY, "_team_pid", None)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        above, rows, _ = cpu_bands.classify(values, lo, hi)
    finally:
        torch.set_flush_denormal(False)
    assert bool((above == 64).all()) and len(rows) == 0
