"""The compiled CPU loop for exact values: torch's arithmetic bit for bit, or torch itself."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from extractor.lens import cpu_exact, exact, native
from extractor.lens.contract import LensInputs

from .clone_variants import variant
from .forked import in_a_forked_child

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _has_compiler() -> bool:
    try:
        cpu_exact.compiler()
    except cpu_exact.KernelUnavailable:
        return False
    return True


#: Tests of the compiled loop itself need a C compiler (CI has one: torch.compile needs it
#: too); without one the lens uses torch's ops, which the fallback tests below cover.
needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="no C compiler on this machine")


def _operands(dtype, d, gen, rows=7, vocab=300):
    """Rows and unembedding rows that reach every corner of the arithmetic: signed zeros,
    subnormals of each dtype, huge and tiny magnitudes side by side (sums that round in
    float64), and cancellation."""
    h = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    h[0] = -0.0  # products -0.0 and +0.0: ordered_sum's "+ 0.0" decides the zero's sign
    w[1, : max(1, d // 2)] = 0.0
    h[1] *= 2.0 ** torch.randint(-40, 40, (d,), generator=gen).double()
    w[2] *= 2.0 ** torch.randint(-60, 60, (d,), generator=gen).double()
    w[3] = -w[4]  # cancelling rows
    tiny = torch.finfo(dtype).smallest_normal
    h[2] = tiny * torch.randn(d, generator=gen, dtype=torch.float64) / 3  # subnormals
    return h.to(dtype), w.to(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3, 5, 6, 64, 576, 577])
def test_the_loop_equals_torchs_ordered_sum_bit_for_bit(dtype, d):
    gen = torch.Generator().manual_seed(d)
    h, w = _operands(dtype, d, gen)
    rows = torch.randint(0, len(h), (999,), generator=gen)  # unsorted: the row cache misses
    cols = torch.randint(0, len(w), (999,), generator=gen)
    rows[:25] = torch.arange(25) // 5  # every pair of the special rows
    cols[:25] = torch.arange(25) % 5
    want = exact.entry_dots_torch(h, w, rows, cols)
    got = cpu_exact.entry_dots(h, w, rows, cols)
    # Bit for bit, signs of zero included.
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [0, 1, 2, 3, 5, 576, 577])
def test_the_references_dense_logits_are_ordered_sums_bit_for_bit(dtype, d):
    """The float64 reference makes ordered_sum's first halving as it multiplies (odd
    widths: the last product plus 0.0): the same bits as the sum of the products,
    signs of zero included."""
    from extractor.lens.exact import dense_logits, ordered_sum

    gen = torch.Generator().manual_seed(d)
    h, w = _operands(dtype, max(d, 1), gen)
    h, w = h[:, :d], w[:, :d]
    got = dense_logits(h, LensInputs(hidden=h, unembed=w, k=1))
    want = ordered_sum(h.double()[:, None, :] * w.double()[None])
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))


@needs_compiler
@pytest.mark.parametrize("target", ["avx2", "default"])
def test_every_clone_equals_torchs_ordered_sum(target, monkeypatch):
    """The loader picks a clone per CPU: the AVX2 and baseline ones are held to torch's
    bits too, not only the one this CPU runs."""
    monkeypatch.setattr(cpu_exact.LIBRARY, "_lib", variant(cpu_exact, target))
    monkeypatch.setattr(cpu_exact.LIBRARY, "_team_pid", None)
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(7)
        h, w = _operands(dtype, 577, gen)
        rows = torch.randint(0, len(h), (999,), generator=gen)
        cols = torch.randint(0, len(w), (999,), generator=gen)
        want = exact.entry_dots_torch(h, w, rows, cols)
        got = cpu_exact.entry_dots(h, w, rows, cols)
        assert torch.equal(got.view(torch.int64), want.view(torch.int64))


@needs_compiler
def test_strided_operands_and_split_calls_give_the_same_bits():
    """A W with a row stride (a slice of a wider one) and h with an offset, over enough
    entries that the call is split between threads."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(500, 80, generator=gen).bfloat16()
    w = wide[:, :64]
    h = torch.randn(20, 64, generator=gen).bfloat16()[3:]
    e = 4 * cpu_exact.SPLIT_ENTRIES + 3
    rows = torch.randint(0, len(h), (e,), generator=gen).sort().values
    cols = torch.randint(0, len(w), (e,), generator=gen)
    want = exact.entry_dots_torch(h, w.contiguous(), rows, cols)
    with torch.inference_mode():
        got = cpu_exact.entry_dots(h, w, rows, cols)
    assert torch.equal(got, want)


@needs_compiler
def test_indices_out_of_range_are_refused_not_read():
    h = torch.randn(4, 8).bfloat16()
    w = torch.randn(10, 8).bfloat16()
    with pytest.raises(IndexError, match=r"column index 10 out of range \[0, 10\)"):
        cpu_exact.entry_dots(h, w, torch.tensor([0]), torch.tensor([10]))
    with pytest.raises(IndexError, match="row index -1"):
        cpu_exact.entry_dots(h, w, torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="one dtype"):
        cpu_exact.entry_dots(h, w.float(), torch.tensor([0]), torch.tensor([0]))
    # Shapes the loop would read past: refused, never run (a wider h read beyond W's rows).
    zero = torch.tensor([0])
    with pytest.raises(ValueError, match=r"h \[R, d\] and unembed \[V, d\]"):
        cpu_exact.entry_dots(torch.ones(1, 1 << 20).bfloat16(), w, zero, zero)
    with pytest.raises(ValueError, match="rows must be a 1-D integer tensor"):
        cpu_exact.entry_dots(h, w, torch.zeros(2, 2, dtype=torch.long), zero)
    with pytest.raises(ValueError, match="cols must be a 1-D integer tensor"):
        cpu_exact.entry_dots(h, w, zero, torch.tensor([0.7]))
    with pytest.raises(ValueError, match="2 rows against 1 cols"):
        cpu_exact.entry_dots(h, w, torch.tensor([0, 1]), zero)


def test_without_a_compiler_the_lens_warns_once_and_uses_torch(monkeypatch, tmp_path):
    """No C compiler: the same values from torch's ops, one warning a process."""
    monkeypatch.setattr(cpu_exact.LIBRARY, "_lib", None)
    monkeypatch.setattr(exact, "_FAILED_KERNELS", set())
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find
    monkeypatch.delenv("CC", raising=False)
    gen = torch.Generator().manual_seed(2)
    inputs = LensInputs(
        hidden=torch.randn(3, 16, generator=gen), unembed=torch.randn(50, 16, generator=gen), k=3
    )
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    with pytest.warns(UserWarning, match="C loop for exact lens values failed.*no C compiler"):
        first = exact.entry_logits(inputs.hidden, rows, cols, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = exact.entry_logits(inputs.hidden, rows, cols, inputs)
    want = exact.entry_dots_torch(inputs.hidden, inputs.unembed, rows, cols)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert not list(tmp_path.rglob("*.so"))


def test_a_failing_compiler_says_what_it_printed(monkeypatch, tmp_path):
    """What the compiler printed is the error, and is remembered: the next process does
    not compile again (each compile costs about half a second) until the marker ages out."""
    script = tmp_path / "broken-cc"
    runs = tmp_path / "runs"
    script.write_text(
        f'#!/bin/sh\ncase "$1" in --version) ;; *) echo x >> {runs};; esac\n'
        "echo 'cc1: out of disk' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_exact.KernelUnavailable, match="out of disk"):
        cpu_exact.build()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written is kept
    with pytest.raises(cpu_exact.KernelUnavailable, match=r"out of disk(.|\n)*remembered"):
        cpu_exact.build()
    assert runs.read_text().count("x") == 1, "compiled again"
    (marker,) = (tmp_path / "cache").rglob("*.failed")
    os.utime(marker, (0, 0))  # a day old: tried again
    with pytest.raises(cpu_exact.KernelUnavailable, match="out of disk"):
        cpu_exact.build()
    assert runs.read_text().count("x") == 2


def test_a_compiler_killed_by_a_signal_is_not_remembered(monkeypatch, tmp_path):
    """An out-of-memory kill is not the compiler's verdict on the source: the next process
    compiles again (found by a review)."""
    script = tmp_path / "killed-cc"
    script.write_text('#!/bin/sh\ncase "$1" in --version) exit 0;; esac\nkill -9 $$\n')
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_exact.KernelUnavailable):
        cpu_exact.build()
    assert not list((tmp_path / "cache").rglob("*.failed"))


def _dots_in_a_forked_child(queue, h, rows, want) -> None:
    # Only the loop runs here: torch's own OpenMP ops can hang in a child forked after the
    # parent used them (a libgomp limit, not this code's).
    queue.put(bool(torch.equal(cpu_exact.entry_dots(h, h, rows, rows), want)))


@needs_compiler
@pytest.mark.parametrize("parent_loaded", [True, False], ids=["parent-loaded", "child-loads"])
def test_a_forked_child_gets_threads_of_its_own(parent_loaded, monkeypatch):
    """A child forked after the parent split a call inherits the pool object but not its
    threads: work sent there would never run. The child makes its own pool, and never
    splits on an OpenMP team: a child that loaded the loop itself, after the parent had
    used torch's team, hung on its first parallel region (found by a review)."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(8, 32, generator=gen).bfloat16()
    rows = torch.randint(0, 8, (4 * cpu_exact.SPLIT_ENTRIES,), generator=gen)
    want = cpu_exact.entry_dots(h, h, rows, rows)  # split: the parent's pool now exists
    assert torch.get_num_threads() > 1 or pytest.skip("one thread: no pool to inherit")
    if not parent_loaded:  # torch's team has run in the parent; the child loads the loop
        torch.randn(1 << 20).exp().sum()
        monkeypatch.setattr(cpu_exact.LIBRARY, "_lib", None)
        monkeypatch.setattr(cpu_exact.LIBRARY, "_team_pid", None)
    assert in_a_forked_child(_dots_in_a_forked_child, h, rows, want)


@needs_compiler
def test_a_library_that_will_not_load_is_not_rebuilt_in_every_process(tmp_path, monkeypatch):
    """A build that loads neither cached nor rebuilt is marked: the next process goes
    straight to the other variant instead of compiling again (found by a review)."""
    bad = tmp_path / "entry_dots-bad.so"
    builds = []

    def build(rebuild=False, openmp=True):
        builds.append(rebuild)
        bad.write_bytes(b"not a library")
        return bad

    monkeypatch.setattr(cpu_exact.LIBRARY, "build", build)
    with pytest.raises(OSError):
        cpu_exact.LIBRARY.load_variant(openmp=True)
    assert builds == [False, True]
    with pytest.raises(cpu_exact.KernelUnavailable, match="would not load"):
        cpu_exact.LIBRARY.load_variant(openmp=True)
    assert builds == [False, True, False], "compiled again"


@needs_compiler
def test_splits_run_on_torchs_openmp_team_where_it_is_the_only_runtime():
    """torch's OpenMP threads spin after each op and took the second core from the pool's
    thread (0.65 against 0.38 us an entry inside the lens on AMD EPYC, bench/README.md):
    where the loop is built with OpenMP and binds to torch's libgomp, a split runs on
    torch's team, with the same values."""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(16, 96, generator=gen).bfloat16()
    rows = torch.randint(0, 16, (8 * cpu_exact.SPLIT_ENTRIES,), generator=gen)
    got = cpu_exact.entry_dots(h, h, rows, rows.flip(0))
    assert torch.equal(got, exact.entry_dots_torch(h, h, rows, rows.flip(0)))
    lib = cpu_exact.library()
    if sys.platform == "linux" and lib.built_with_openmp():
        assert cpu_exact.LIBRARY.on_team(), "torch's libgomp was not recognised"
    lib_dir = Path("/venv/torch/lib")
    torchs = "7f00-7f01 r-xp 0 08:01 1 /venv/torch/lib/libgomp.so.1"
    vendored = "7f02-7f03 r-xp 0 08:01 2 /venv/sentencepiece.libs/libgomp-6a29c32d.so.1.0.0"
    system = "7f04-7f05 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"
    assert native.shares_torchs_team(f"{torchs}\n{torchs}\n{vendored}\n", lib_dir)
    # A system copy opened after torch's does not change what the library binds to.
    assert native.shares_torchs_team(f"{torchs}\n{system}\n", lib_dir)
    assert not native.shares_torchs_team(f"{system}\n", lib_dir), "torch's is not gomp"
    assert not native.shares_torchs_team("", lib_dir)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_subnormals_are_exact_when_the_caller_flushes_them(dtype):
    """A thread that flushes subnormals (``torch.set_flush_denormal``, or any library
    built with -ffast-math) read an fp16 subnormal as 0 in the loop, and small calls (on
    the caller's thread) disagreed with split ones (on the pool's). The loop now runs with
    subnormals on, so every call gives the exact value."""
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal of the dtype
    h = torch.full((1, 4), tiny, dtype=dtype)
    w = torch.ones(1, 4, dtype=dtype)
    want = exact.entry_dots_torch(h, w, torch.tensor([0]), torch.tensor([0]))
    assert float(want) == 4 * float(torch.tensor(tiny, dtype=dtype))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        one = cpu_exact.entry_dots(h, w, torch.tensor([0]), torch.tensor([0]))
        many = torch.zeros(4 * cpu_exact.SPLIT_ENTRIES, dtype=torch.long)
        split = cpu_exact.entry_dots(h, w, many, many)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(one, want) and bool((split == want).all())


def test_cc_may_be_a_command_with_words(monkeypatch, tmp_path):
    """``CC="ccache gcc"``-style values are split like a shell would; a $CC that is not
    found says so instead of quietly using another compiler."""
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here -O1")
    with pytest.raises(cpu_exact.KernelUnavailable, match="'no-such-compiler-here' is not found"):
        cpu_exact.compiler()
    if not _has_compiler_on_path():
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", "env cc")
    assert cpu_exact.compiler() == ["env", "cc"]
    assert cpu_exact.build().exists()


def _has_compiler_on_path() -> bool:
    import shutil

    return shutil.which("cc") is not None and shutil.which("env") is not None


@needs_compiler
def test_a_cached_library_that_does_not_load_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_exact.LIBRARY, "_lib", None)
    built = cpu_exact.build()
    built.write_bytes(b"\x7fELF truncated")
    h = torch.randn(2, 8).bfloat16()
    rows = torch.tensor([0, 1])
    got = cpu_exact.entry_dots(h, h, rows, rows)
    assert torch.equal(got, exact.entry_dots_torch(h, h, rows, rows))
    assert built.stat().st_size > 1000
