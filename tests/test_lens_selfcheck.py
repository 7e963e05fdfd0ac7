"""The per-device self-check: an engine is kept only if it reproduces float64 here."""

from __future__ import annotations

import pytest
import torch

from extractor.lens import LensInputs, VocabSegments, fused_logit_lens
from extractor.lens.contract import LensRangeError
from extractor.lens.selfcheck import choose_engine


def _inputs() -> LensInputs:
    gen = torch.Generator().manual_seed(5)
    n, d, v = 40, 32, 500
    return LensInputs(
        hidden=torch.randn(n, d, generator=gen).bfloat16(),
        unembed=torch.randn(v, d, generator=gen).bfloat16(),
        k=5,
        segments=VocabSegments.from_ranges(v, {"speech": [(400, v)]}),
        targets=torch.randint(0, v, (n, 3), generator=gen),
        pool_groups=torch.arange(n) // 4,
        pool_targets=torch.randint(0, v, (n // 4, 2), generator=gen),
    )


def _torch(inputs):
    return fused_logit_lens(**inputs.__dict__, backend="torch")


def test_the_exact_engine_passes_on_this_device():
    check = choose_engine(_inputs(), "torch", {"torch": _torch})
    assert check.passed and check.engine == "torch"
    assert check.telemetry()["self_check"] == "passed"


@pytest.mark.parametrize(
    "fault",
    ["rank", "topk", "pooled segment rank", "pooled segment topk", "missing field", "crash"],
)
def test_a_disagreeing_engine_falls_back_with_a_warning(fault):
    """Any field the contract makes exact is compared: the pooled words' text ranks and
    text top-k too (``*_word_text_rank``, ``pooled_text_topk_ids``; a review found them
    unchecked)."""

    def broken(inputs):
        if fault == "crash":
            raise RuntimeError("no kernel for this device")
        res = _torch(inputs)
        if fault == "rank":
            res.pooled_target_ranks = res.pooled_target_ranks + 1
        elif fault == "topk":
            res.topk_ids = res.topk_ids.flip(1)
        elif fault == "pooled segment rank":
            ranks = res.pooled_target_segment_ranks
            ranks["text"] = ranks["text"] + 1
        elif fault == "missing field":  # a malformed result fails the check, not the actor
            del res.pooled_target_segment_ranks["text"]
        else:
            ids = res.pooled_segment_topk_ids
            ids["text"] = ids["text"].flip(1)
        return res

    with pytest.warns(UserWarning, match="using the 'torch' engine"):
        check = choose_engine(_inputs(), "triton", {"torch": _torch, "triton": broken})
    assert check.engine == "torch" and check.tried == "triton" and not check.passed
    assert check.telemetry()["self_check"] == "failed"


@pytest.mark.filterwarnings("ignore:lens engine .triton. disagrees")
@pytest.mark.parametrize("preferred", ["torch", "triton"])
def test_a_disagreeing_exact_values_kernel_is_turned_off(monkeypatch, preferred):
    """The torch engine's exact values come from the C loop on a CPU (a Triton kernel on
    CUDA). Made to disagree, the self-check turns that kernel off for the process and keeps
    the torch engine on torch's ops, which it checks again first."""
    from extractor.lens import cpu_exact, exact
    from extractor.lens.reference import reference_lens

    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    loop = cpu_exact.entry_dots
    monkeypatch.setattr(cpu_exact, "entry_dots", lambda *a: -loop(*a))

    def broken_triton(inputs):
        raise RuntimeError("no kernel for this device")

    engines = {"torch": _torch, "triton": broken_triton}
    with pytest.warns(UserWarning, match="kernel off, torch's ops agree"):
        check = choose_engine(_inputs(), preferred, engines)
    assert check.engine == "torch" and check.tried == preferred and not check.passed
    assert "C loop for exact lens values" in check.detail
    assert not exact.kernel_enabled(exact.C_DOTS)
    inputs = _inputs()
    got, want = _torch(inputs), reference_lens(inputs)
    assert torch.equal(got.target_ranks, want.target_ranks)
    assert torch.equal(got.topk_ids, want.topk_ids)


@pytest.mark.parametrize("bad", ["onednn", "avx512-bf16"])
def test_a_disagreeing_fast_gemm_is_turned_off_and_the_c_loop_kept(bad, monkeypatch):
    """oneDNN's fp32 GEMM and the VDPBF16PS kernel are trusted to be IEEE fp32, like
    torch's BLAS. One that erred far outside the band (made to here) is turned off by the
    self-check, which keeps the C loop and the other GEMM: they still agree."""
    from extractor.lens import chunked, exact
    from extractor.lens.reference import reference_lens

    kernel = {chunked.ONEDNN: exact.ONEDNN_GEMM, chunked.AVX512_BF16: exact.BF16_GEMM}[bad]
    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    inputs = _inputs()
    if bad not in chunked.gemm_choices(inputs):
        pytest.skip(f"{bad} cannot run here")
    real = chunked.chunk_logits

    def skewed(h32, c0, c1, inputs, scratch=None, columns=None, gemm=chunked.IEEE):
        logits = real(h32, c0, c1, inputs, scratch, columns, gemm)
        if gemm == bad:  # an error far outside the band: the top entries swap places
            logits.copy_(torch.where(logits > logits.median(), -logits, logits))
        return logits

    monkeypatch.setattr(chunked, "chunk_logits", skewed)
    d = inputs.unembed.shape[1]
    for other in (chunked.IEEE, chunked.ONEDNN, chunked.AVX512_BF16):
        monkeypatch.setitem(chunked._GEMM_SECONDS, (other, torch.bfloat16, d), 1.0)
    monkeypatch.setitem(chunked._GEMM_SECONDS, (bad, torch.bfloat16, d), 0.5)
    with pytest.warns(UserWarning, match="kernel off, torch's ops agree"):
        check = choose_engine(inputs, "torch", {"torch": _torch})
    assert check.engine == "torch" and not check.passed
    others = [k for k in exact.device_kernels("cpu") if k != kernel]
    assert kernel in check.detail and not any(k in check.detail for k in others)
    assert not exact.kernel_enabled(kernel) and all(exact.kernel_enabled(k) for k in others)
    assert bad not in chunked.gemm_choices(inputs)
    got, want = _torch(inputs), reference_lens(inputs)
    assert torch.equal(got.target_ranks, want.target_ranks)
    assert torch.equal(got.topk_ids, want.topk_ids)


def test_a_kernel_that_is_not_the_cause_stays_on(monkeypatch):
    """The fallback wrong on torch's ops too, or unable to run at all: the kernel is not
    to blame and stays on; the disagreement is warned about and recorded."""
    from extractor.lens import exact

    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())

    def wrong(inputs):
        res = _torch(inputs)
        res.topk_ids = res.topk_ids.flip(1)
        return res

    def cannot(inputs):
        raise LensRangeError("logits may reach 1e40")

    for engine, says in ((wrong, "on torch's ops too"), (cannot, "LensRangeError")):
        with pytest.warns(UserWarning, match=f"'torch' disagrees .*{says}"):
            check = choose_engine(_inputs(), "torch", {"torch": engine})
        assert check.engine == "torch" and not check.passed and says in check.detail
        assert exact.kernel_enabled(exact.C_DOTS)


def test_the_sample_keeps_only_the_pool_groups_its_rows_touch():
    from extractor.lens.reference import reference_lens
    from extractor.lens.selfcheck import sample

    full = _inputs()  # 40 rows in 10 groups of 4
    probe = sample(full, rows=10, runs=1)  # groups 0, 1 whole and group 2 cut after 2 rows
    assert probe.n_rows == 10 and probe.n_groups == 3
    assert probe.pool_groups.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert torch.equal(probe.pool_targets, full.pool_targets[:3])
    whole, cut = reference_lens(full), reference_lens(probe)
    assert torch.equal(cut.pooled_target_ranks[:2], whole.pooled_target_ranks[:2])
    assert torch.equal(cut.pooled_topk_ids[:2], whole.pooled_topk_ids[:2])


def test_the_sample_spans_the_call_from_its_first_row_to_its_last():
    """A worker's call stacks its rows layer by layer: the sample's runs reach from the
    first layer's rows to the last's, and its groups keep their order."""
    from extractor.lens.selfcheck import SAMPLE_ROWS, SAMPLE_RUNS, sample

    full = _inputs()
    n = 31 * 16  # 31 layers of 16 positions, 4 words of 4 positions a layer
    full = LensInputs(
        **{
            **full.__dict__,
            "hidden": full.hidden.repeat(13, 1)[:n],
            "targets": full.targets.repeat(13, 1)[:n],
            "pool_groups": torch.arange(n) // 4,
            "pool_targets": full.pool_targets.repeat(13, 1)[: n // 4],
        }
    )
    probe = sample(full)
    numbered = torch.arange(n).float()[:, None].expand(n, 32)  # each row holds its index
    picked = sample(LensInputs(**{**full.__dict__, "hidden": numbered})).hidden[:, 0]
    picked = picked.long().tolist()
    length = SAMPLE_ROWS // SAMPLE_RUNS
    assert probe.n_rows == len(picked) == SAMPLE_ROWS
    assert picked[0] == 0 and picked[-1] == n - 1
    runs = [picked[i : i + length] for i in range(0, SAMPLE_ROWS, length)]
    assert all(run == list(range(run[0], run[0] + length)) for run in runs)
    assert probe.pool_groups.tolist() == sorted(probe.pool_groups.tolist())
    assert probe.n_groups == len(set(probe.pool_groups.tolist()))


def test_auto_runs_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    """What ``lens.engine: auto`` asks the self-check to try (bench/README.md has the
    H200 measurement behind Triton on CUDA); a machine without Triton gets torch."""
    import importlib.util

    from extractor.lens import auto_engine

    assert auto_engine("cpu") == "torch"
    assert auto_engine(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert auto_engine("cuda") == "torch"


def test_a_band_loop_that_loses_in_band_entries_is_caught(monkeypatch):
    """A loop that listed no in-band entry passed a check whose targets all sat where no
    entry was in band (found by a review): the probe now adds a target a row with another
    entry just above it, and the loop is turned off."""
    from extractor.lens import cpu_pass, exact

    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    inputs = _inputs()
    real = cpu_pass.block_pass

    def lossy(values, lo, hi, kk):
        found = list(real(values, lo, hi, kk))
        found[5], found[6] = found[5][:0], found[6][:0]  # the in-band positions
        return tuple(found)

    monkeypatch.setattr(cpu_pass, "block_pass", lossy)
    with pytest.warns(UserWarning, match="kernel off, torch's ops agree"):
        check = choose_engine(inputs, "torch", {"torch": _torch})
    assert not check.passed and exact.C_PASS in check.detail
    assert not exact.kernel_enabled(exact.C_PASS)
    assert all(exact.kernel_enabled(k) for k in exact.device_kernels("cpu") if k != exact.C_PASS)


def test_a_pass_wrong_only_on_a_bf16_models_rank_free_logits_is_caught(monkeypatch):
    """Calls that ask no ranks take the GEMM in the model's dtype and the pass over its bf16
    logits, a path the ranked probe never reaches (found by a review): the check runs the
    same rows without targets too, and turns the pass off."""
    from extractor.lens import cpu_pass, exact

    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    real = cpu_pass.block_pass

    def wrong_on_bf16(values, lo, hi, kk):
        found = list(real(values, lo, hi, kk))
        if values.dtype == torch.bfloat16 and kk:  # each candidate's neighbour, consistently
            found[8] = (found[8] + 1) % values.shape[1]
            found[7] = values.gather(1, found[8])
        return tuple(found)

    monkeypatch.setattr(cpu_pass, "block_pass", wrong_on_bf16)
    with pytest.warns(UserWarning, match="kernel off, torch's ops agree"):
        check = choose_engine(_inputs(), "torch", {"torch": _torch})
    assert not check.passed and "without targets" in check.detail
    assert not exact.kernel_enabled(exact.C_PASS)
