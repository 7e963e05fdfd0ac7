"""The head the lens decodes with: the model's own, or another checkpoint's (``lens.head``).

A speech-only model initialised from a text LM (Slam from Qwen) has no text tokens in
its own head, so the paper's question (does a middle layer rank the spoken word's
text token?) cannot be asked of it. Its hidden states can still be decoded by the
final norm and unembedding of the text LM it started from: a *foreign* head. Ranks
are then over that head's vocabulary, and the model's own next token has no meaning
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .loading import load_causal_lm
from .surgery import ModelParts, SurgeryError, model_parts


class HeadMismatchError(SurgeryError):
    """A foreign head that cannot read the model's hidden states."""


@dataclass(frozen=True)
class LensHead:
    """Final norm, unembedding [V, d], bias and soft-cap, and whose they are."""

    final_norm: Callable[[torch.Tensor], torch.Tensor]
    unembed: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    foreign: bool

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.shape[0])


def own_head(parts: ModelParts) -> LensHead:
    return LensHead(parts.final_norm, parts.unembed, parts.bias, parts.softcap, foreign=False)


def hidden_size(model: nn.Module) -> int | None:
    """Width of the block outputs (what the final norm reads), from the config."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    return int(size) if size else None


def foreign_head(
    folder: str | Path,
    *,
    model_hidden_size: int | None,
    dtype: torch.dtype,
    device: str | torch.device,
    allow_pickle: bool = False,
) -> LensHead:
    """The final norm and unembedding of the causal LM at ``folder``, in ``dtype``.

    Only those are kept: the head model's blocks are freed when this returns. A head
    whose final norm reads another width than the model's blocks write is refused.
    """
    model = load_causal_lm(folder, dtype=dtype, device=device, allow_pickle=allow_pickle)
    width = hidden_size(model)
    if model_hidden_size is not None and width is not None and width != model_hidden_size:
        raise HeadMismatchError(
            f"lens.head {folder} reads hidden states of width {width}, but the model's "
            f"blocks write width {model_hidden_size}: a foreign head must come from a "
            "model of the same width (the text LM the speech model started from)"
        )
    parts = model_parts(model)
    return LensHead(parts.final_norm, parts.unembed, parts.bias, parts.softcap, foreign=True)
