"""The Triton kernel against the float64 definition: exact, like the torch engine.

On CPU-only machines (CI) it runs in Triton's interpreter at small shapes in
fp32 and fp16 (the interpreter garbles bf16); on a CUDA machine the same tests
run the compiled kernel, plus bf16 checks. Ranks and top-k ids must equal the
reference's; only log-sum-exp and masses have a tolerance, the kernel's own
bound (:func:`extractor.lens.selfcheck.lse_bound`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from extractor.lens import LensInputs, VocabSegments, fused_logit_lens
from extractor.lens.contract import LensRangeError
from extractor.lens.selfcheck import lse_bound
from extractor.lens.triton_lens import KERNEL_MODES as MODES
from extractor.lens.triton_lens import triton_lens

from .lens_checks import check_exact, plant_ties, tiny_case

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _case(seed, n, d, v, k, t, *, cuts, softcap=None, masked=0, groups=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    unembed = torch.randn(v, d, generator=gen) / d**0.5 * 3
    bias = None
    if masked:
        bias = torch.randn(v, generator=gen)
        bias[torch.randperm(v, generator=gen)[:masked]] = float("-inf")
    segments = VocabSegments.from_ranges(
        v, {"speech": [(cuts[0], cuts[1])], "marker": [(cuts[1], v)]}
    )
    return LensInputs(
        hidden=hidden.to(DEVICE, dtype),
        unembed=unembed.to(DEVICE, dtype),
        k=k,
        final_norm=torch.nn.LayerNorm(d).to(DEVICE, dtype),
        bias=None if bias is None else bias.to(DEVICE),
        softcap=softcap,
        segments=segments,
        targets=torch.randint(-1, v, (n, t), generator=gen).to(DEVICE),
        pool_groups=torch.randint(-1, groups, (n,), generator=gen).to(DEVICE) if groups else None,
        pool_targets=torch.randint(0, v, (groups, 2), generator=gen).to(DEVICE) if groups else None,
    )


def _check(inputs: LensInputs, got) -> None:
    check_exact(inputs, got.to("cpu"), lse_bound=lse_bound("triton", inputs))


CASES = {
    "odd-vocab-segments": dict(seed=0, n=19, d=24, v=173, k=5, t=3, cuts=(120, 160), groups=4),
    "vocab-below-one-tile": dict(seed=1, n=5, d=8, v=20, k=3, t=2, cuts=(10, 18)),
    "k-above-a-tile-and-segment": dict(seed=2, n=9, d=16, v=90, k=40, t=1, cuts=(60, 62)),
    "softcap-and-masked-vocab": dict(
        seed=3, n=17, d=20, v=130, k=6, t=4, cuts=(100, 104), softcap=4.0, masked=30
    ),
    "no-targets": dict(seed=4, n=8, d=16, v=64, k=4, t=0, cuts=(32, 64)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_fp32_is_exact(name, mode):
    inputs = _case(**CASES[name])
    _check(inputs, triton_lens(inputs, **MODES[mode]))


def test_triton_fp16_is_exact():
    inputs = _case(**CASES["odd-vocab-segments"], dtype=torch.float16)
    _check(inputs, fused_logit_lens(**inputs.__dict__, backend="triton"))


def _tied(dtype, n=24, d=256, v=1500, seed=7) -> LensInputs:
    """Model-like width, so fp32 accumulation really rounds; exact ties and targets at
    rank k planted (tests.lens_checks.plant_ties)."""
    inputs = _case(seed=seed, n=n, d=d, v=v, k=10, t=6, cuts=(1200, 1490), groups=5)
    hidden = (inputs.hidden.float() * 3).to(dtype)
    inputs = replace(inputs, hidden=hidden, unembed=inputs.unembed.to(dtype), final_norm=None)
    return plant_ties(inputs, 3)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_exact_with_planted_ties(dtype, mode):
    inputs = _tied(dtype)
    _check(inputs, triton_lens(inputs, **MODES[mode]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_segments_of_several_runs_and_zero_rows(mode):
    """Segments scattered over the vocabulary (the kernel's tiles follow their runs; group
    candidates read each run of maxima separately) and a call without rows."""
    inputs = _case(**CASES["odd-vocab-segments"])
    v = inputs.unembed.shape[0]
    runs = {"speech": [(5, 20), (60, 61), (120, 160)], "marker": [(30, 50), (170, v)]}
    inputs = replace(inputs, segments=VocabSegments.from_ranges(v, runs))
    _check(inputs, triton_lens(inputs, **MODES[mode]))
    empty = triton_lens(inputs.rows(torch.arange(0, device=DEVICE)), **MODES[mode])
    assert empty.topk_ids.shape == (0, inputs.k)


def test_column_groups_with_a_masked_segment_and_a_scattered_one(monkeypatch):
    """Groups past a tile's end are empty (max -inf). A segment masked whole by a -inf bias
    ties its real groups with empty ones, and an empty group's first column may lie past the
    vocabulary: still exact, no out-of-range read. A two-entry segment spread over two
    tiles (more groups than k + 4, nearly all empty) is certified by taking every non-empty
    group: no row redone."""
    import extractor.lens.triton_lens as tl

    inputs = _case(**{**CASES["odd-vocab-segments"], "k": 3})
    v = inputs.unembed.shape[0]
    bias = torch.zeros(v, device=DEVICE)
    bias[160:] = float("-inf")
    runs = {"speech": [(120, 160)], "marker": [(160, v)], "scattered": [(40, 41), (150, 151)]}
    masked = replace(inputs, bias=bias, segments=VocabSegments.from_ranges(v, runs))
    _check(masked, triton_lens(masked, candidates="groups"))

    redone = []
    real = tl.chunked_lens
    monkeypatch.setattr(
        tl, "chunked_lens", lambda sub, **kw: redone.append(sub.n_rows) or real(sub, **kw)
    )
    scattered = replace(masked, bias=None)
    _check(scattered, triton_lens(scattered, candidates="groups"))
    assert redone == [int((scattered.pool_groups >= 0).sum())]  # the pooled rows only


def test_column_groups_certify_without_the_torch_engine(monkeypatch):
    """Group candidates must settle well-separated rows themselves: were every list left
    uncertified, results would still be exact (the torch engine redoes such rows), only
    slow. Here no row is redone, and the lists still equal the reference's."""
    import extractor.lens.triton_lens as tl

    redone = []
    real = tl.chunked_lens
    monkeypatch.setattr(
        tl, "chunked_lens", lambda sub, **kw: redone.append(sub.n_rows) or real(sub, **kw)
    )
    inputs = _case(**CASES["odd-vocab-segments"])
    _check(inputs, triton_lens(inputs, candidates="groups"))
    assert redone == [int((inputs.pool_groups >= 0).sum())]  # the pooled rows only


def test_without_refinement_triton_ranks_are_wrong():
    """What the band refinement is for. The competitor's exact logit is 1 + 2^-30, the
    target's 1: in fp32 (any summation order) both are 1.0, so only the float64 decision
    of in-band entries counts the competitor above the target."""
    hidden = torch.tensor([[1.0, 2.0**-30, 0.0, 0.0]], device=DEVICE)
    unembed = torch.tensor(
        [[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0.5, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, -1.0]],
        device=DEVICE,
    )
    inputs = LensInputs(
        hidden=hidden, unembed=unembed, k=2, targets=torch.tensor([[0]], device=DEVICE)
    )
    _check(inputs, triton_lens(inputs))
    assert triton_lens(inputs).target_ranks.tolist() == [[1]]
    assert triton_lens(inputs, refine=False).target_ranks.tolist() == [[0]]


def test_uncertified_rows_are_redone_exactly(monkeypatch):
    """A band too wide to certify any top-k list (and putting every entry in band): every
    row is redone by the torch engine, every entry decided in float64, still exact."""
    import extractor.lens.triton_lens as tl

    real_band, redone = tl._band, []
    monkeypatch.setattr(tl, "_band", lambda *a: real_band(*a) * 1e6)
    real_chunked = tl.chunked_lens
    monkeypatch.setattr(
        tl, "chunked_lens", lambda sub, **kw: redone.append(sub.n_rows) or real_chunked(sub, **kw)
    )
    inputs = _tied(torch.float32, n=12, seed=8)
    _check(inputs, fused_logit_lens(**inputs.__dict__, backend="triton"))
    assert redone[0] == inputs.n_rows  # then the pooled rows


def test_an_overflowing_in_band_buffer_relaunches(monkeypatch):
    import extractor.lens.triton_lens as tl

    launches = []
    real = tl._lens_tiles_kernel
    monkeypatch.setattr(tl, "IN_BAND_PER_ROW", 0)

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(tl, "_lens_tiles_kernel", Spy())
    inputs = _tied(torch.float32, n=12, seed=9)
    _check(inputs, fused_logit_lens(**inputs.__dict__, backend="triton"))
    assert len(launches) == 2


@pytest.mark.parametrize("scale", [2.0**-70, 2.0**-75])
def test_triton_stays_exact_below_fp32s_normal_range(scale):
    """Products under 2^-126: absolute rounding (or flushing) is inside the band."""
    inputs = tiny_case(torch.float32, scale, DEVICE)
    _check(inputs, fused_logit_lens(**inputs.__dict__, backend="triton"))


@pytest.mark.parametrize("bad", ["beyond fp32", "nan unembedding"])
def test_logits_fp32_cannot_hold_are_a_named_error_here_too(bad):
    """The kernel accumulates in fp32, like the torch engine's GEMM: rows or W whose
    logits may pass 2^120, or a W holding NaN, are refused by name, not turned into NaN
    ranks (a review found only the torch engine checked)."""
    h = torch.full((2, 4), 1e30 if bad == "beyond fp32" else 1.0)
    w = torch.full((3, 4), 1e10 if bad == "beyond fp32" else 1.0)
    if bad == "nan unembedding":
        w[1, 2] = float("nan")
    inputs = LensInputs(hidden=h.to(DEVICE), unembed=w.to(DEVICE), k=1)
    with pytest.raises(LensRangeError, match="fp32" if bad == "beyond fp32" else "NaN or inf"):
        triton_lens(inputs)


class _BatchDependentNorm(torch.nn.Module):
    """A final "norm" whose output depends on how many rows it sees, as a projecting norm's
    GEMM may in its last bits (exaggerated here, so that ranks move)."""

    def __init__(self, d: int):
        super().__init__()
        self.direction = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.05 * h.shape[0] * self.direction.to(h)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pooled_rows_are_normed_with_all_the_others(mode):
    """The reference norms every row in one batch, and so must the engine for its pooled
    rows: the Triton engine once normed them apart (found by a review)."""
    inputs = _case(**CASES["odd-vocab-segments"])
    inputs = replace(inputs, final_norm=_BatchDependentNorm(inputs.unembed.shape[1]))
    assert 0 < int((inputs.pool_groups >= 0).sum()) < inputs.n_rows  # two batch sizes
    _check(inputs, triton_lens(inputs, **MODES[mode]))


_GPU_ONLY = pytest.mark.skipif(not CUDA, reason="the interpreter garbles bf16")


@pytest.mark.parametrize("d", [1, 3, 7, 64, 129, 576])
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=_GPU_ONLY)],
    ids=str,
)
def test_exact_dots_kernel_sums_in_ordered_sums_order(d, dtype):
    """The CUDA kernel for exact values gives torch's values bit for bit (a target and its
    duplicate must tie whichever computes them). Magnitudes over six decades make the
    float64 sums round, so another order differs (31 of 33 at d = 576)."""
    from extractor.lens.exact import entry_dots_torch
    from extractor.lens.triton_exact import entry_dots

    gen = torch.Generator().manual_seed(d)
    h = (torch.randn(7, d, generator=gen) * torch.logspace(-3, 3, d)).to(DEVICE, dtype)
    w = (torch.randn(50, d, generator=gen) * 3).to(DEVICE, dtype)
    rows = torch.randint(0, 7, (333,), generator=gen).to(DEVICE)
    cols = torch.randint(0, 50, (333,), generator=gen).to(DEVICE)
    want = entry_dots_torch(h, w, rows, cols)
    assert torch.equal(entry_dots(h, w, rows, cols), want)


def test_triton_and_torch_engines_agree():
    inputs = _case(**CASES["softcap-and-masked-vocab"])
    a = fused_logit_lens(**inputs.__dict__, backend="triton").to("cpu")
    b = fused_logit_lens(**inputs.__dict__, backend="torch", vocab_chunk=32).to("cpu")
    assert torch.equal(a.target_ranks, b.target_ranks)
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.equal(a.pooled_target_ranks, b.pooled_target_ranks)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 Triton needs a real GPU (the interpreter garbles bf16)")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_triton_bf16_on_gpu_is_exact(mode):
    inputs = _case(
        seed=5, n=300, d=576, v=4099, k=10, t=6, cuts=(3500, 4001), groups=40, dtype=torch.bfloat16
    )
    _check(inputs, triton_lens(inputs, **MODES[mode]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 Triton needs a real GPU (the interpreter garbles bf16)")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_triton_bf16_on_gpu_exact_with_planted_ties(mode):
    inputs = _tied(torch.bfloat16, n=64, d=576, v=8192)
    _check(inputs, triton_lens(inputs, **MODES[mode]))


@pytest.mark.parametrize("compile", [True, False])
def test_the_compile_switch_reaches_the_pooled_rows(compile, monkeypatch):
    """Pooled rows go through the torch engine: it gets the caller's ``compile``."""
    import extractor.lens.triton_lens as tl

    seen = []
    real = tl.chunked_lens

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tl, "chunked_lens", spy)
    inputs = _case(**CASES["odd-vocab-segments"])
    n = inputs.n_rows
    inputs = LensInputs(
        **{
            **inputs.__dict__,
            "pool_groups": torch.arange(n, device=DEVICE) // 2,
            "pool_targets": torch.zeros((n + 1) // 2, 1, dtype=torch.long, device=DEVICE),
        }
    )
    fused_logit_lens(**inputs.__dict__, backend="triton", compile=compile)
    assert seen == [compile]
