"""The fused logit lens: final norm + unembedding + top-k/ranks/masses, never [N x V].

Pure computation: tensors in, tensors out. Imports neither Ray nor the store.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from .chunked import chunked_lens
from .contract import (
    SPEECH,
    TEXT,
    LensError,
    LensInputs,
    LensKError,
    LensRangeError,
    LensResult,
    LensShapeError,
    NonFiniteHiddenError,
    Norm,
    VocabSegments,
    validate,
)
from .reference import reference_lens, reference_logits

Backend = Literal["auto", "torch", "triton", "reference"]


def auto_engine(device: torch.device | str) -> str:
    """The engine ``auto`` runs on ``device``: the Triton engine on CUDA, where at the
    worker's real call (every layer's rows of 8 x 512 positions, 4 targets, pooled words)
    it measured 1.2-1.3x faster than the torch engine on an H200 with every rank and top-k
    id equal (bench/README.md); the torch engine on CPUs or without Triton installed. The
    worker still checks the engine on its own device before trusting it (selfcheck)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


__all__ = [
    "SPEECH",
    "TEXT",
    "Backend",
    "LensError",
    "LensInputs",
    "LensKError",
    "LensRangeError",
    "LensResult",
    "LensShapeError",
    "NonFiniteHiddenError",
    "VocabSegments",
    "auto_engine",
    "fused_logit_lens",
    "reference_lens",
    "reference_logits",
    "validate",
]


def fused_logit_lens(
    hidden: torch.Tensor,
    final_norm: Norm | None,
    unembed: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    segments: VocabSegments | None = None,
    targets: torch.Tensor | None = None,
    pool_groups: torch.Tensor | None = None,
    pool_targets: torch.Tensor | None = None,
    backend: Backend = "auto",
    row_chunk: int | None = None,
    vocab_chunk: int | None = None,
    compile: bool = True,
) -> LensResult:
    """Decode residual-stream rows with the model's own head, without [N x V] logits.

    ``hidden`` [N, d] rows (any layers/positions), ``final_norm`` the model's final
    norm (applied exactly once, here), ``unembed`` [V, d] in the compute dtype,
    ``targets`` [N, T] ids to rank (-1 pads), ``pool_groups`` [N] group of each row
    (-1: none) whose element-wise max logits are ranked against ``pool_targets``
    [G, Tp]. See :class:`LensResult` for what comes back.

    ``backend``: ``"torch"`` (chunked, exact in every dtype, any device),
    ``"triton"`` (CUDA, or the Triton interpreter when ``TRITON_INTERPRET=1``; exact
    through the same band refinement, decided on the host),
    ``"reference"`` (float64, materialises everything: for tests and the self-check's
    sample) or ``"auto"``
    (:func:`auto_engine`: Triton on CUDA, torch elsewhere; see docs/lens.md).
    ``compile``: fuse the torch engine's per-chunk reduction with torch.compile.
    """
    inputs = LensInputs(
        hidden=hidden,
        unembed=unembed,
        k=k,
        final_norm=final_norm,
        bias=bias,
        softcap=softcap,
        segments=segments,
        targets=targets,
        pool_groups=pool_groups,
        pool_targets=pool_targets,
    )
    if backend == "auto":
        backend = auto_engine(inputs.unembed.device)
    if backend == "torch":
        return chunked_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk, compile=compile)
    if backend == "reference":
        return reference_lens(inputs)
    if backend == "triton":
        from .triton_lens import triton_lens

        return triton_lens(inputs, row_chunk=row_chunk, vocab_chunk=vocab_chunk, compile=compile)
    raise LensError(f"unknown lens backend {backend!r}: use auto, torch, triton or reference")
