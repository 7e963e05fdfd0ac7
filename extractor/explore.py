"""The logit-lens explorer: what each layer of a model predicts for a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lens import fused_logit_lens
from .models import capture_layers, model_parts


@dataclass(frozen=True)
class LayerPrediction:
    """Top-k next-token candidates read off one layer at one position."""

    layer: int
    position: int
    tokens: tuple[str, ...]
    probs: tuple[float, ...]


def explore_prompt(model, tokenizer, prompt: str, k: int = 5) -> list[LayerPrediction]:
    """Lens of every layer at the prompt's last position, top-``k`` tokens each."""
    parts = model_parts(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, -1] = True
    hidden = capture_layers(parts, ids, select)  # [L + 1, 1, d]
    layers = hidden.shape[0]
    result = fused_logit_lens(
        hidden.reshape(layers, -1),
        parts.final_norm,
        parts.unembed,
        k,
        bias=parts.bias,
        softcap=parts.softcap,
        # A few rows: the torch engine, exact on any device, with no kernel to compile and
        # no self-check to run (``auto`` would pick Triton on CUDA, unchecked here).
        backend="torch",
    )
    out = []
    for layer in range(layers):
        top_ids = result.topk_ids[layer].tolist()
        probs = result.topk_logprobs[layer].exp().tolist()
        tokens = tuple(tokenizer.decode([i]) for i in top_ids)
        out.append(LayerPrediction(layer, ids.shape[1] - 1, tokens, tuple(probs)))
    return out
