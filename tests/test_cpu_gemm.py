"""The AVX-512 BF16 GEMM: the IEEE path's K-sliced fp32 sums bit for bit, or not used."""

from __future__ import annotations

import pytest
import torch

from extractor.lens import LensInputs, chunked, cpu_gemm
from extractor.lens.chunked import chunked_lens

from .forked import in_a_forked_child

needs_kernel = pytest.mark.skipif(
    not cpu_gemm.available(), reason=f"the kernel cannot run here: {cpu_gemm.why_unavailable()}"
)


def _builds() -> bool:
    try:
        cpu_gemm.library()
    except (cpu_gemm.KernelUnavailable, OSError):
        return False
    return True


#: Packing is plain C: it runs wherever the library builds, VDPBF16PS or not.
needs_library = pytest.mark.skipif(not _builds(), reason="no C compiler on this machine")


def k_sliced_sums(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel must compute, in torch's fp32 ops: each SLICE-wide slice summed from
    zero one product at a time (pairs: the odd element's product first, as Intel's manual
    defines VDPBF16PS), slices added in order. Products of bf16 values are exact in fp32."""
    hf, wf = h.float(), w.float()
    d = h.shape[1]
    total = None
    for k0 in range(0, d, cpu_gemm.SLICE):
        acc = torch.zeros(len(h), len(w))
        for i in range(k0, min(d, k0 + cpu_gemm.SLICE), 2):
            if i + 1 < d:
                acc = acc + hf[:, i + 1, None] * wf[None, :, i + 1]
            acc = acc + hf[:, i, None] * wf[None, :, i]
        total = acc if total is None else total + acc
    return total


def _operands(r: int, c: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(r, d, generator=gen)
    h[:, :2] *= 200  # massive activations: the order of the additions shows in the bits
    return h.bfloat16(), torch.randn(c, d, generator=gen).bfloat16()


@needs_kernel
@pytest.mark.parametrize(
    "r,c,d",
    [(13, 100, 300), (8, 48, 256), (1, 1, 1), (37, 33, 131), (64, 200, 576)],
    ids=["remainders", "one-tile", "single", "odd-width", "model-width"],
)
def test_bit_for_bit_the_k_sliced_fp32_sums(r, c, d):
    """Every tile shape (8, 4, 2, 1 rows x 1-3 blocks of 16, a masked last block), an odd
    width (a zero pads the last pair), slices of 128 and a short last one."""
    h, w = _operands(r, c, d, seed=r + c + d)
    got = cpu_gemm.logits(h, cpu_gemm.pack(w), torch.empty(r, c))
    assert torch.equal(got, k_sliced_sums(h, w))


@needs_kernel
def test_python_threads_and_torchs_team_split_alike(monkeypatch):
    h, w = _operands(40, 700, 192, seed=1)
    packed = cpu_gemm.pack(w)
    team = cpu_gemm.logits(h, packed, torch.empty(40, 700))
    monkeypatch.setattr(cpu_gemm.LIBRARY, "_team_pid", None)
    threads = cpu_gemm.logits(h, packed, torch.empty(40, 700))
    assert torch.equal(team, threads) and torch.equal(team, k_sliced_sums(h, w))


def _logits_in_a_forked_child(queue, h, packed, want) -> None:
    got = cpu_gemm.logits(h, packed, torch.empty(want.shape))
    queue.put(bool(torch.equal(got, want)))


@needs_kernel
def test_a_forked_child_splits_over_threads_of_its_own():
    """A child forked after the parent split on torch's OpenMP team must not use that team
    (libgomp's is not rebuilt after a fork): it gets Python threads, and the same bits."""
    h, w = _operands(16, 400, 128, seed=2)
    packed = cpu_gemm.pack(w)
    want = cpu_gemm.logits(h, packed, torch.empty(16, 400))
    assert in_a_forked_child(_logits_in_a_forked_child, h, packed, want)


@needs_kernel
def test_the_probe_tells_the_manuals_order_from_another():
    """The probe finds this CPU's VDPBF16PS to be the manual's arithmetic, and would have
    noticed the other order of the two products (on normal-range operands)."""
    lib = cpu_gemm.library()
    assert lib.probe_mismatches(cpu_gemm.PROBE_TRIALS, cpu_gemm.PROBE_SEED, 0) == 0
    assert lib.probe_mismatches(cpu_gemm.PROBE_TRIALS, cpu_gemm.PROBE_SEED, 1) > 1000


def test_a_cpu_whose_instruction_differs_never_runs_it(monkeypatch):
    """A probe that finds any difference keeps the kernel off: the engine takes another
    GEMM, and asking for this one says why."""
    try:
        lib = cpu_gemm.library()
    except (cpu_gemm.KernelUnavailable, OSError):
        pytest.skip("no C compiler")
    if not lib.has_avx512_bf16():
        assert not cpu_gemm._check()[0]
        assert "no AVX-512 BF16" in cpu_gemm._check()[1]
        return
    monkeypatch.setattr(lib, "probe_mismatches", lambda *args: 7)
    monkeypatch.setattr(cpu_gemm, "_available", None)
    assert not cpu_gemm.available()
    assert "on 7 of" in cpu_gemm.why_unavailable()
    h, w = _operands(4, 50, 64, seed=3)
    inputs = LensInputs(hidden=h, unembed=w, k=3, targets=torch.tensor([[1]] * 4))
    assert chunked.AVX512_BF16 not in chunked.gemm_choices(inputs)
    with pytest.raises(ValueError, match="avx512-bf16"):
        chunked_lens(inputs, gemm=chunked.AVX512_BF16)
    with pytest.raises(cpu_gemm.KernelUnavailable, match="on 7 of"):
        cpu_gemm.logits(h, cpu_gemm.pack(w), torch.empty(4, 50))


def test_only_bf16_models_on_a_cpu_are_offered_the_kernel():
    w = torch.randn(30, 16)
    for dtype in (torch.float32, torch.float16):
        assert not chunked.avx512_bf16_available(w.to(dtype))
    with pytest.raises(TypeError, match="bf16"):
        cpu_gemm.pack(w)


@needs_kernel
def test_operands_of_the_wrong_shape_are_refused_before_the_kernel_reads_them():
    h, w = _operands(4, 20, 32, seed=4)
    packed = cpu_gemm.pack(w)
    with pytest.raises(ValueError, match="bf16"):
        cpu_gemm.logits(h[:, :31], packed, torch.empty(4, 20))
    with pytest.raises(ValueError, match="fp32"):
        cpu_gemm.logits(h, packed, torch.empty(4, 19))
    with pytest.raises(ValueError, match="fp32"):
        cpu_gemm.logits(h, packed, torch.empty(20, 4).T)
    odd = torch.empty(4, 21).bfloat16()[:, 1:]  # strided, and at an odd offset: copied
    odd.copy_(h[:, :20])
    got = cpu_gemm.logits(odd, cpu_gemm.pack(w[:, :20]), torch.empty(4, 20))
    assert torch.equal(got, k_sliced_sums(h[:, :20], w[:, :20]))


@needs_library
def test_packing_chosen_rows_is_packing_their_gather(monkeypatch):
    """``pack(w, ids)`` packs the gather ``w[ids]`` without making it: odd and even widths,
    a last block of fewer than 16 columns, torch's team and Python threads alike."""
    for c, d in ((37, 5), (64, 32), (100, 577)):
        w = torch.randn(300, d).bfloat16()
        ids = torch.randperm(300, generator=torch.Generator().manual_seed(c))[:c]
        want = cpu_gemm.pack(w[ids])
        assert torch.equal(cpu_gemm.pack(w, ids).data, want.data)
        monkeypatch.setattr(cpu_gemm.LIBRARY, "_team_pid", None)
        assert torch.equal(cpu_gemm.pack(w, ids).data, want.data)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="index the 300 rows"):
        cpu_gemm.pack(w, torch.tensor([0, 300]))
    with pytest.raises(ValueError, match="index the 300 rows"):
        cpu_gemm.pack(w, torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer index"):
        cpu_gemm.pack(w, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="integer index"):
        cpu_gemm.pack(w, torch.tensor([1.5]))
    columns_major = w.T.contiguous().T  # rows 2 bytes apart: the chosen ones are copied
    assert torch.equal(cpu_gemm.pack(columns_major, ids).data, cpu_gemm.pack(w, ids).data)


@needs_kernel
def test_rows_that_are_not_bf16_values_are_refused():
    """The band is for the rows the kernel multiplies: fp32 rows rounded to bf16 on the
    way in would not be inside it."""
    h, w = _operands(4, 20, 32, seed=5)
    inputs = LensInputs(hidden=h, unembed=w, k=1)
    h32 = h.float()
    h32[0, 0] += h32[0, 0].abs() * 2**-12  # between two bf16 values
    with pytest.raises(ValueError, match="bf16 values"):
        chunked.chunk_logits(h32, 0, 20, inputs, gemm=chunked.AVX512_BF16)


@needs_kernel
def test_packed_chunks_are_kept_only_for_a_later_row_chunk(monkeypatch):
    """A call's last row chunk (or its only one) frees each packed chunk after use; a W
    above PACK_KEEP_BYTES is packed again for each row chunk, never held twice."""
    _, w = _operands(1, 64, 32, seed=6)
    scratch, columns = chunked.Scratch(), chunked.ColumnOrder()
    scratch.keep_packed = True
    first = scratch.packed(w, 0, 64, columns)
    assert scratch.packed(w, 0, 64, columns) is first  # kept: packed once
    scratch.keep_packed = False
    assert scratch.packed(w, 0, 64, columns) is first and not scratch._packed  # freed
    monkeypatch.setattr(chunked, "PACK_KEEP_BYTES", w.numel())  # half W's bytes
    scratch.keep_packed = True
    scratch.packed(w, 0, 64, columns)
    assert not scratch._packed


@needs_kernel
def test_an_empty_width_gives_zero_sums():
    out = torch.full((3, 5), 7.0)
    cpu_gemm.logits(torch.empty(3, 0).bfloat16(), cpu_gemm.pack(torch.empty(5, 0).bfloat16()), out)
    assert torch.equal(out, torch.zeros(3, 5))
