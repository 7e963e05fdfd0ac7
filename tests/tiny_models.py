"""Tiny random models of every supported architecture, built from configs offline."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 97
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_DECODER),
    "qwen2": lambda: Qwen2Config(**_DECODER, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=8),
    "gemma": lambda: GemmaConfig(**_DECODER, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=3.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=16,
    ),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at identity; perturb them so "applied once" is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model
