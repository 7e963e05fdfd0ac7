"""Tokenizers and speech models for the front-end tests, all built offline."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer, HubertModel, PreTrainedTokenizerFast

from extractor.speech.units import small_hubert_config

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def tiny_hubert(hidden: int = 32, layers: int = 2, seed: int = 0) -> HubertModel:
    """A random HuBERT with the real 25 Hz geometry: total conv stride 640 samples."""
    torch.manual_seed(seed)
    config = small_hubert_config(hidden=hidden, layers=layers, heads=2, conv=16)
    return HubertModel(config).eval()


def random_centroids(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def sims_tokenizer(smollm2_path, n_units: int = 500):
    """The SmolLM2 tokenizer extended the SIMS way: <Un0>..<Un{n-1}>, <speech>, <text>."""
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.add_tokens([f"<Un{i}>" for i in range(n_units)] + ["<speech>", "<text>"])
    return tok


def spirit_tokenizer():
    """A Spirit-LM-shaped tokenizer: 32,000 text entries, [Text], [Speech], [Hu0]..[Hu500]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "The", "a"]
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), 32000):
        vocab[f"<w{i}>"] = i
    for j, t in enumerate(["[Text]", "[Speech]", *[f"[Hu{i}]" for i in range(501)]]):
        vocab[t] = 32000 + j
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>")
