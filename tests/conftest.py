"""Shared fixtures: the real SmolLM2-135M and tiny random models of each architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
# flag is read when a kernel is decorated, so it must be set before any import.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct, converted to safetensors once per machine."""
    from extractor.models.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    import torch
    from transformers import AutoTokenizer

    from extractor.models import load_causal_lm

    model = load_causal_lm(smollm2_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(smollm2_path)
