"""Load causal LMs safely: safetensors by default, pickles and remote code only when asked.

Also loads slamkit ``UnitLM`` checkpoints (SIMS) with plain transformers, by
rebuilding the base model from the nested ``base_config`` with the top-level
vocabulary size and stripping the ``lm.`` prefix from the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")


class ModelLoadError(Exception):
    """The checkpoint cannot be loaded as asked."""


class PickleWeightsError(ModelLoadError):
    """Only pickle weights exist and unpickling was not allowed."""


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) directly inside a checkpoint folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safe = [p for p in files if p.name.endswith(SAFE_SUFFIXES)]
    pickled = [
        p for p in files if p.name.endswith(PICKLE_SUFFIXES) and not p.name.startswith(NOT_WEIGHTS)
    ]
    return safe, pickled


def is_unit_lm(config: dict) -> bool:
    return config.get("architectures") == ["UnitLM"] or (
        config.get("model_type") == "speech_language_model"
    )


def _read_state_dict(files: list[Path], allow_pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.name.endswith(SAFE_SUFFIXES):
            from safetensors.torch import load_file

            state.update(load_file(str(path)))
        else:
            if not allow_pickle:
                raise PickleWeightsError(f"{path} is a pickle; pass allow_pickle=True to load it")
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _load_unit_lm(folder: Path, config: dict, dtype: torch.dtype, allow_pickle: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(config.get("base_config") or {})
    if "model_type" not in base:
        raise ModelLoadError(f"{folder}/config.json: UnitLM without base_config.model_type")
    if "vocab_size" not in config:
        raise ModelLoadError(f"{folder}/config.json: UnitLM without a top-level vocab_size")
    model_type = base.pop("model_type")
    base["vocab_size"] = config["vocab_size"]
    base_config = AutoConfig.for_model(model_type, **base)
    model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    safe, pickled = weight_files(folder)
    state = _read_state_dict(safe or pickled, allow_pickle)
    stripped = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    if not stripped:
        raise ModelLoadError(f"{folder}: UnitLM weights carry no 'lm.' prefix")
    missing, unexpected = model.load_state_dict(stripped, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: UnitLM weights do not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    return model.to(dtype)


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM folder for inference, in ``dtype`` on ``device``, in eval mode.

    Safetensors only unless ``allow_pickle``; remote code only with
    ``trust_remote_code``. UnitLM (slamkit/SIMS) folders are recognised from
    their config.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} is not a model folder: no config.json")
    config = json.loads(config_path.read_text())
    safe, pickled = weight_files(folder)
    if not safe and not pickled:
        raise ModelLoadError(f"{folder} holds no weight files")
    if not safe and not allow_pickle:
        raise PickleWeightsError(
            f"{folder} has only pickle weights ({pickled[0].name}); loading them executes "
            "code from the file: pass allow_pickle=True (--allow-pickle) if you trust it"
        )
    if is_unit_lm(config):
        model = _load_unit_lm(folder, config, dtype, allow_pickle)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=bool(safe),
            trust_remote_code=trust_remote_code,
        )
    return model.to(device).eval()
