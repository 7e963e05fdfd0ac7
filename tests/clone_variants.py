"""Build a C kernel with its clones replaced by one fixed target, to hold every clone the
loader might pick on another CPU to the bits of the one this CPU runs."""

from __future__ import annotations

import ctypes
from types import ModuleType

import pytest
import torch

from extractor.lens import native

CLONES = '__attribute__((target_clones("avx512f", "avx2", "default")))'
#: Each target the clones are made for: its attribute, and whether this CPU can run it.
TARGETS = {
    "avx2": ('__attribute__((target("avx2")))', "AVX2"),
    "default": ("", None),
}


def cpu_runs(feature: str | None) -> bool:
    """Whether this CPU has ``feature`` (torch's capability: AVX512 includes AVX2)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return feature is None or feature == capability or (feature, capability) == ("AVX2", "AVX512")


def variant(module: ModuleType, target: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """``module``'s library (its ``SOURCE`` and ``_declare``) built for ``target`` alone."""
    attribute, feature = TARGETS[target]
    if CLONES not in native.CLONES_C or not cpu_runs(feature):
        pytest.skip(f"this CPU or compiler has no {target} clone to check")
    source = module.SOURCE.replace(CLONES, attribute) + native.OPENMP_PROBE
    try:
        path = native.build(
            f"{module.__name__.rsplit('.', 1)[-1]}-{target}", source, (*native.CFLAGS, *flags)
        )
    except native.KernelUnavailable as exc:
        pytest.skip(f"no C compiler: {exc}")
    lib = ctypes.CDLL(str(path))
    module._declare(lib)
    lib.built_with_openmp.restype = ctypes.c_int
    return lib
