"""Compiling, caching and loading the lens's C kernels, and the threads that run them.

Three kernels are C, compiled once per machine with the system's C compiler (``$CC``, else
``cc``) and loaded through :mod:`ctypes`, which releases the GIL: the exact-values loop
(:mod:`.cpu_exact`), the AVX-512 BF16 GEMM (:mod:`.cpu_gemm`) and the pass over a block
of fast logits (:mod:`.cpu_pass`). This module holds what
they share: the build cache (one library per source, flags, compiler version and machine,
written atomically), the marker that keeps a library that will not load from being
rebuilt in every process, and the choice between torch's own OpenMP team and Python
threads for a split.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: Flags that fix the arithmetic: no contraction into FMAs, no reassociation.
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
#: Added where the compiler has OpenMP, so that a split can run on torch's thread team.
OPENMP = ("-fopenmp",)


class KernelUnavailable(RuntimeError):
    """No C compiler, or the compile failed: the caller uses torch's ops instead."""


_lock = threading.Lock()
#: Set in a child forked after import: it never splits on an OpenMP team (libgomp's is
#: not rebuilt after a fork, and a child's first parallel region in a kernel hung).
_forked = False
#: The worker threads and the process that made them: a forked child inherits the pool
#: object but not its threads, and work sent to it would never run.
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _after_fork_in_child() -> None:
    """A forked child gets a free lock (the parent's may have been held by another thread)."""
    global _lock, _forked
    _lock = threading.Lock()
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lock() -> threading.Lock:
    """The lock that guards loading the kernels (a fresh one in a forked child)."""
    return _lock


def forked() -> bool:
    """Whether this process is a child forked after this module was imported."""
    return _forked


def compiler() -> list[str]:
    """The C compiler's command: ``$CC`` (split like a shell would: ``ccache gcc`` works),
    else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        command = shlex.split(chosen)
        if not shutil.which(command[0]):
            raise KernelUnavailable(f"$CC is {chosen!r}, and {command[0]!r} is not found")
        return command
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise KernelUnavailable("no C compiler found ($CC, cc, gcc or clang)")


def _version(command: list[str]) -> str:
    """The compiler's ``--version`` banner: an upgraded compiler builds afresh."""
    try:
        done = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"{shlex.join(command)} --version failed: {exc}") from exc
    return done.stdout


def cache_dir() -> Path:
    """``$SLM_LENS_CACHE/kernels`` (or ~/.cache/slm-lens/kernels); where that cannot be
    written, one private directory per user under the system's temporary directory."""
    root = os.environ.get("SLM_LENS_CACHE", "").strip()
    path = Path(root or Path.home() / ".cache" / "slm-lens") / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    path = Path(tempfile.gettempdir()) / f"slm-lens-kernels-{uid}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def build(name: str, source: str, flags: tuple[str, ...], rebuild: bool = False) -> Path:
    """Compile ``source`` into a shared library ``<name>-<key>.so``, once per source, flags,
    compiler (and its version) and machine: a cache shared over NFS by x86 and ARM nodes
    keeps one of each. ``rebuild``: replace a cached library that would not load. A compile
    that failed is remembered beside (``.failed``, with what the compiler said) and not
    tried again with the same compiler for :data:`FAILED_FOR` seconds (a full disk passes;
    missing intrinsics do not)."""
    command = compiler()
    key = hashlib.sha256(
        "\0".join(
            [source, *flags, *command, _version(command), platform.machine(), platform.system()]
        ).encode()
    ).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"{name}-{key}.so"
    failed = target.with_suffix(".failed")  # this compiler could not build this source
    if target.exists() and not rebuild:
        return target
    if _recent(failed):
        raise KernelUnavailable(f"{failed.read_text(errors='replace')} (remembered in {failed})")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        try:
            done = subprocess.run(
                [*command, *flags, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelUnavailable(f"{shlex.join(command)} could not run: {exc}") from exc
        if done.returncode != 0 or not out.exists():
            message = f"{shlex.join(command)} failed to compile the {name} kernel: {done.stderr}"
            if done.returncode > 0 and done.stderr.strip():
                # Remembered, so that each process does not compile again (a compiler without
                # AVX-512 BF16 intrinsics, or without OpenMP, fails the same way every time);
                # a compiler killed by a signal (out of memory) is not.
                with contextlib.suppress(OSError):
                    failed.write_text(message)
            raise KernelUnavailable(message)
        os.replace(out, target)  # atomic: a concurrent process sees all of it or none
        with contextlib.suppress(OSError):
            failed.unlink(missing_ok=True)
    return target


#: How long a failed compile is remembered.
FAILED_FOR = 24 * 3600


def _recent(marker: Path) -> bool:
    try:
        return time.time() - marker.stat().st_mtime < FAILED_FOR
    except OSError:
        return False


def load(build_one: Callable[[bool], Path]) -> ctypes.CDLL:
    """Load what ``build_one(rebuild)`` built; a cached library that does not load
    (truncated, or from an incompatible build) is rebuilt once. One whose rebuild will not
    load either is marked, so that later processes skip it without compiling again."""
    path = build_one(False)
    marker = path.with_name(path.name + ".unloadable")
    if marker.exists():
        raise KernelUnavailable(f"{path.name} would not load here before ({marker})")
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path = build_one(True)
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            with contextlib.suppress(OSError):
                marker.touch()
            raise


#: C helpers for kernels whose arithmetic must see subnormals as they are, whatever the
#: calling thread's mode: a thread that flushes them to zero (DAZ/FTZ:
#: ``torch.set_flush_denormal``, or any library built with -ffast-math) would read them as
#: 0, and worker threads (which keep the mode they were made with) could disagree with the
#: caller. ``ieee_mode()`` clears the flags and returns the old mode for ``restore_mode``.
IEEE_MODE_C = r"""
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned int fp_mode;
static fp_mode ieee_mode(void) {
    fp_mode saved = _mm_getcsr();
    _mm_setcsr(saved & ~(0x8040u));  /* FTZ (bit 15) and DAZ (bit 6) off */
    return saved;
}
static void restore_mode(fp_mode saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__)
typedef uint64_t fp_mode;
static fp_mode ieee_mode(void) {
    fp_mode saved;
    __asm__ volatile("mrs %0, fpcr" : "=r"(saved));
    __asm__ volatile("msr fpcr, %0" : : "r"(saved & ~(1ull << 24)));  /* FZ off */
    return saved;
}
static void restore_mode(fp_mode saved) { __asm__ volatile("msr fpcr, %0" : : "r"(saved)); }
#else
typedef int fp_mode;
static fp_mode ieee_mode(void) { return 0; }
static void restore_mode(fp_mode saved) { (void)saved; }
#endif
"""


#: C prelude: ``CLONES`` before a function makes the compiler emit it for AVX-512, AVX2 and
#: the baseline, the loader picking one per CPU (glibc's ifunc; elsewhere it is one plain
#: function). The libraries are built without ``-march``, so that one cache serves any
#: x86-64 CPU: without clones a loop is vectorised for SSE2 alone. Each clone does the same
#: IEEE operations (no contraction into FMAs: ``-ffp-contract=off``).
CLONES_C = r"""
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif
"""


#: Appended to every library's source: whether it was built with OpenMP.
OPENMP_PROBE = r"""
int built_with_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""


class Library:
    """One C library, built and loaded on first use (thread-safe): with OpenMP where the
    compiler has it and it loads, else without. Its splits run on torch's OpenMP team where
    it binds to that runtime (:func:`shares_torchs_team`), never in a child forked after
    import (:func:`forked`), else on Python threads (:meth:`split`)."""

    def __init__(
        self,
        name: str,
        source: str,
        declare: Callable[[ctypes.CDLL], None],
        flags: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.source = source + OPENMP_PROBE
        self._declare = declare  # sets each function's argtypes and restype
        self.flags = flags  # beyond CFLAGS
        self._lib: ctypes.CDLL | None = None
        #: The process whose splits run on its OpenMP team, or None.
        self._team_pid: int | None = None

    def build(self, rebuild: bool = False, openmp: bool = True) -> Path:
        """Compile (:func:`build`); ``openmp``: with :data:`OPENMP` (a compiler without it
        fails, and :meth:`get` builds without)."""
        flags = (*CFLAGS, *self.flags, *(OPENMP if openmp else ()))
        return build(self.name, self.source, flags, rebuild)

    def load_variant(self, openmp: bool) -> ctypes.CDLL:
        """One variant, built or found, and loaded (:func:`load`)."""
        return load(lambda rebuild: self.build(rebuild=rebuild, openmp=openmp))

    def get(self) -> ctypes.CDLL:
        """The loaded library. Raises :class:`KernelUnavailable` or OSError."""
        with lock():
            if self._lib is None:
                try:
                    lib = self.load_variant(openmp=True)
                except (KernelUnavailable, OSError):
                    lib = self.load_variant(openmp=False)
                self._declare(lib)
                lib.built_with_openmp.restype = ctypes.c_int
                lib.built_with_openmp.argtypes = []
                if lib.built_with_openmp() and not forked() and shares_torchs_team():
                    self._team_pid = os.getpid()
                self._lib = lib
        return self._lib

    def on_team(self) -> bool:
        """Whether this process splits on torch's OpenMP team."""
        return self._team_pid is not None and self._team_pid == os.getpid()

    def forget(self) -> None:
        """Load afresh on the next :meth:`get` (tests)."""
        self._lib, self._team_pid = None, None

    def split(
        self, parts: int, team: Callable[[int], int], part: Callable[[int], int]
    ) -> list[int]:
        """Status codes of work cut in ``parts``: ``team(parts)`` on torch's OpenMP team
        (whose threads spin after each torch op and would take a core from a thread of
        ours), else ``part(i)`` for each ``i`` on Python threads (inline for one part)."""
        if parts > 1 and self.on_team():
            return [team(parts)]
        if parts > 1:
            return list(thread_pool().map(part, range(parts)))
        return [part(0)]


def shares_torchs_team(maps: str | None = None, torch_lib: Path | None = None) -> bool:
    """Whether a library built with OpenMP binds to torch's runtime (``maps``:
    /proc/self/maps).

    The library asks for ``libgomp.so.1``, which the loader finds among the objects already
    loaded by that name: on torch's Linux wheels, ``torch/lib/libgomp.so.1``, mapped under
    that path. Then its splits run on torch's threads (a system copy opened later, mapped
    as ``libgomp.so.1.0.0``, does not change what the library binds to). Without torch's
    wheel copy (a torch built with Intel's or LLVM's runtime, beside which the library
    would bring the compiler's libgomp, each with its own spinning threads) the splits
    keep to Python threads. Copies under other names (sentencepiece vendors
    ``libgomp-<hash>.so.1.0.0``) are separate runtimes that neither uses."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    torch_lib = torch_lib or Path(torch.__file__).resolve().parent / "lib"
    loaded = {
        Path(line.split()[-1])
        for line in maps.splitlines()
        if line.split() and line.split()[-1].endswith("/libgomp.so.1")
    }
    return loaded == {torch_lib / "libgomp.so.1"}


def thread_pool() -> ThreadPoolExecutor:
    """This process's pool of Python threads, one a core (a new one after a fork)."""
    global _pool
    with lock():
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)))
    return _pool[1]
