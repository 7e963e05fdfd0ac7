"""Where each architecture keeps its blocks, final norm and head: the one place that knows.

Every other module asks :func:`model_parts` and gets a :class:`ModelParts`; an
architecture not listed here fails loudly, naming the class, instead of being
guessed at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class SurgeryError(Exception):
    """The model's structure is not what the lens needs."""


class UnsupportedArchitectureError(SurgeryError, TypeError):
    """No recipe for this model class."""


class MissingFinalNormError(SurgeryError):
    """The model has no final norm, so the logit lens of a block output is undefined."""


@dataclass(frozen=True)
class _Recipe:
    base: str  # attribute path of the base (headless) model
    blocks: str  # attribute path of the decoder blocks, from the CausalLM
    final_norm: str
    head: str
    softcap_attr: str | None = None
    after_norm: str | None = None  # an extra projection after the norm (OPT-350m)
    # A config flag that, when False, says the blocks are post-LN: each block's output
    # is already normed, the model has no final norm, and the head reads it as is
    # (through ``after_norm`` where present).
    pre_norm_flag: str | None = None


_LLAMA_LIKE = _Recipe("model", "model.layers", "model.norm", "lm_head")
RECIPES: dict[str, _Recipe] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _Recipe("model", "model.layers", "model.norm", "lm_head", "final_logit_softcapping"),
    "gpt2": _Recipe("transformer", "transformer.h", "transformer.ln_f", "lm_head"),
    # transformers renamed GPT-NeoX's head from embed_out to lm_head in v5.
    "gpt_neox": _Recipe(
        "gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head|embed_out"
    ),
    "opt": _Recipe(
        "model.decoder",
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "lm_head",
        after_norm="model.decoder.project_out",
        pre_norm_flag="do_layer_norm_before",
    ),
}


@dataclass
class ModelParts:
    """The pieces of a causal LM that the logit lens reads.

    ``unembed`` is [V, d_model] as the head applies it (the input embedding when
    tied); ``final_norm`` maps a block output [.., d] to what the head reads
    (norm, plus OPT's output projection where present).
    """

    model: nn.Module
    architecture: str
    base: nn.Module
    blocks: nn.ModuleList
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    unembed: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    tied: bool

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks; the lens has ``n_layers + 1`` layers (0 = embeddings)."""
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.dtype

    @property
    def device(self) -> torch.device:
        return self.unembed.device


def _get(root: nn.Module, path: str) -> nn.Module | None:
    """Attribute at a dotted path; ``a|b`` tries alternatives in order."""
    if "|" in path:
        return next((m for p in path.split("|") if (m := _get(root, p)) is not None), None)
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class _NormThenProject(nn.Module):
    def __init__(self, norm: nn.Module, project: nn.Module) -> None:
        super().__init__()
        self.norm, self.project = norm, project

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(h))


def model_parts(model: nn.Module) -> ModelParts:
    """Locate blocks, final norm, head and soft-capping of a Hugging Face causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    recipe = RECIPES.get(model_type or "")
    if recipe is None:
        known = ", ".join(sorted(RECIPES))
        raise UnsupportedArchitectureError(
            f"slm-lens has no recipe for {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {known}"
        )
    base = _get(model, recipe.base)
    blocks = _get(model, recipe.blocks)
    head = _get(model, recipe.head)
    if base is None or blocks is None or head is None:
        raise SurgeryError(
            f"{type(model).__name__} does not have the expected layout "
            f"({recipe.base}, {recipe.blocks}, {recipe.head})"
        )
    norm = _get(model, recipe.final_norm)
    post_ln = recipe.pre_norm_flag is not None and not getattr(config, recipe.pre_norm_flag, True)
    if norm is None and post_ln:
        norm = torch.nn.Identity()  # OPT-350m: post-LN blocks, no final norm
    if norm is None:
        raise MissingFinalNormError(
            f"{type(model).__name__} has no final norm at {recipe.final_norm}: "
            "its block outputs are not what the head reads, so the logit lens is undefined"
        )
    if recipe.after_norm and (project := _get(model, recipe.after_norm)) is not None:
        norm = _NormThenProject(norm, project)
    weight = head.weight
    bias = getattr(head, "bias", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embed is not None and embed.weight.data_ptr() == weight.data_ptr()
    softcap = getattr(config, recipe.softcap_attr, None) if recipe.softcap_attr else None
    return ModelParts(
        model=model,
        architecture=model_type,
        base=base,
        blocks=blocks,
        final_norm=norm,
        unembed=weight.detach(),
        bias=None if bias is None else bias.detach(),
        softcap=float(softcap) if softcap else None,
        tied=tied,
    )
