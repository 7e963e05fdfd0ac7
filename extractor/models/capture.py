"""Capture every layer's residual stream at selected positions, with hooks.

Hugging Face's ``output_hidden_states`` returns the last entry *after* the
final norm in many models, so the lens would apply it twice; it also keeps
every position of every layer. Here a forward pre-hook on block 0 records its
input (layer 0: the embeddings as the first block sees them, scaled/positioned
as the model does) and a forward hook on block i records its output (layer
i + 1); each keeps only the selected positions, in the model's compute dtype.
The base model runs without its head, so not even the final layer's [B x L x V]
logits are made.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .surgery import ModelParts


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def _hooks(parts: ModelParts, select: torch.Tensor, sink: list[torch.Tensor | None]):
    handles = []

    def pre_hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        sink[0] = h[select]

    def make_hook(layer: int):
        def hook(_module, _args, output):
            sink[layer] = _hidden_of(output)[select]

        return hook

    handles.append(parts.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for i, block in enumerate(parts.blocks):
        handles.append(block.register_forward_hook(make_hook(i + 1)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_layers(
    parts: ModelParts,
    input_ids: torch.Tensor,
    select: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual stream of every layer at the selected positions.

    ``input_ids`` [B, L]; ``select`` [B, L] bool, the positions to keep. Returns
    [n_layers + 1, n_selected, d] in the model's dtype, rows in row-major order of
    ``select``; layer 0 is the block-0 input, layer i the output of block i - 1.
    The final norm is *not* applied: the lens applies it, once.
    """
    if select.shape != input_ids.shape or select.dtype != torch.bool:
        raise ValueError(
            f"select must be a bool mask shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {select.dtype} {tuple(select.shape)}"
        )
    device = parts.device
    select = select.to(device)
    sink: list[torch.Tensor | None] = [None] * (parts.n_layers + 1)
    with _hooks(parts, select, sink):
        parts.base(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )
    missing = [i for i, h in enumerate(sink) if h is None]
    if missing:
        raise RuntimeError(f"layer capture missed layers {missing}: a block did not run")
    return torch.stack(sink)  # type: ignore[arg-type]
