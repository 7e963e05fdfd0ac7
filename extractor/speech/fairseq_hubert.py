"""Convert a fairseq HuBERT checkpoint (Spirit LM's release) to a transformers ``HubertModel``.

Spirit LM ships its HuBERT in fairseq's key layout, in one of two containers:

- the release's own ``{"model_cfg", "task_cfg", "model_weight", ...}``, plain tensors and
  dicts that load with ``torch.load(weights_only=True)``;
- fairseq's training checkpoint ``{"cfg": {"model", "task"}, "model", ...}`` (or
  ``{"args": Namespace}``), whose config objects only unpickle, which runs code from the
  file: it loads only with ``allow_pickle=True``.

The weights are renamed to transformers' ``HubertModel`` and saved as safetensors, with a
``preprocessor_config.json`` carrying the task's ``normalize`` as ``do_normalize``. The
pretraining heads (``final_proj``, ``label_embs_concat``) are dropped; any other key that
has no place in the model is an error, not silently lost.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

#: fairseq's HubertConfig defaults, for keys a checkpoint leaves out.
FAIRSEQ_DEFAULTS = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
}
PRETRAINING_ONLY = ("label_embs_concat", "final_proj.weight", "final_proj.bias")


class HubertCheckpointError(ValueError):
    """A HuBERT checkpoint this converter cannot map faithfully; says what and why."""


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "items"):  # omegaconf DictConfig
        return {k: obj[k] for k in obj}
    return dict(vars(obj))  # argparse.Namespace


def conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``conv_feature_layers`` (``"[(512,10,5)] + [(512,3,2)] * 4"``) safely."""

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Tuple | ast.List):
            items = [value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise HubertCheckpointError(f"conv_feature_layers {spec!r}: unexpected {ast.dump(node)}")

    layers = value(ast.parse(spec, mode="eval"))
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 for t in layers
    ):
        raise HubertCheckpointError(f"conv_feature_layers {spec!r} is not a list of (dim, k, s)")
    return layers


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict, dict, dict]:
    """(model config, task config, fairseq-named weights) from either container."""
    import torch

    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise PermissionError(
                f"{path} holds Python objects (a fairseq training checkpoint): loading it runs "
                "code from the file. Pass allow_pickle=True (--allow-pickle) if you trust it; "
                "the converted folder loads without pickle"
            ) from exc
        states = torch.load(path, map_location="cpu", weights_only=False)
    if "model_weight" in states:
        model_cfg, task_cfg = _as_dict(states.get("model_cfg")), _as_dict(states.get("task_cfg"))
        weights = states["model_weight"]
    elif "model" in states:
        if states.get("cfg") is not None:
            cfg = states["cfg"]
            model_cfg, task_cfg = _as_dict(cfg["model"]), _as_dict(cfg["task"])
        else:
            model_cfg = task_cfg = _as_dict(states.get("args"))
        weights = states["model"]
    else:
        raise HubertCheckpointError(
            f"{path}: neither a fairseq checkpoint ('model' and 'cfg'/'args') nor Spirit LM's "
            f"converted one ('model_weight', 'model_cfg'); keys: {sorted(states)[:10]}"
        )
    return {**FAIRSEQ_DEFAULTS, **model_cfg}, task_cfg, dict(weights)


def hf_config(model_cfg: dict):
    from transformers import HubertConfig

    if model_cfg["extractor_mode"] not in ("default", "layer_norm"):
        raise HubertCheckpointError(f"extractor_mode {model_cfg['extractor_mode']!r} unknown")
    if int(model_cfg.get("pos_conv_depth", 1)) != 1:
        raise HubertCheckpointError("pos_conv_depth > 1 has no transformers HubertModel equivalent")
    if model_cfg["activation_fn"] != "gelu":
        raise HubertCheckpointError(f"activation_fn {model_cfg['activation_fn']!r}: only gelu")
    conv = conv_layers(model_cfg["conv_feature_layers"])
    return HubertConfig(
        hidden_size=int(model_cfg["encoder_embed_dim"]),
        num_hidden_layers=int(model_cfg["encoder_layers"]),
        num_attention_heads=int(model_cfg["encoder_attention_heads"]),
        intermediate_size=int(model_cfg["encoder_ffn_embed_dim"]),
        hidden_act="gelu",
        feat_extract_norm="group" if model_cfg["extractor_mode"] == "default" else "layer",
        do_stable_layer_norm=bool(model_cfg["layer_norm_first"]),
        conv_dim=tuple(c[0] for c in conv),
        conv_kernel=tuple(c[1] for c in conv),
        conv_stride=tuple(c[2] for c in conv),
        conv_bias=bool(model_cfg["conv_bias"]),
        num_conv_pos_embeddings=int(model_cfg["conv_pos"]),
        num_conv_pos_embedding_groups=int(model_cfg["conv_pos_groups"]),
        feat_proj_layer_norm=True,
        layer_norm_eps=1e-5,
    )


def _renames(config) -> dict[str, str]:
    """fairseq name -> transformers name, for every tensor the model has."""
    weight_norm = "encoder.pos_conv_embed.conv.parametrizations.weight"
    names = {
        "mask_emb": "masked_spec_embed",
        "layer_norm.weight": "feature_projection.layer_norm.weight",
        "layer_norm.bias": "feature_projection.layer_norm.bias",
        "post_extract_proj.weight": "feature_projection.projection.weight",
        "post_extract_proj.bias": "feature_projection.projection.bias",
        "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias",
        "encoder.pos_conv.0.weight_g": f"{weight_norm}.original0",
        "encoder.pos_conv.0.weight_v": f"{weight_norm}.original1",
        "encoder.layer_norm.weight": "encoder.layer_norm.weight",
        "encoder.layer_norm.bias": "encoder.layer_norm.bias",
    }
    for i in range(len(config.conv_dim)):
        src, dst = f"feature_extractor.conv_layers.{i}", f"feature_extractor.conv_layers.{i}"
        names[f"{src}.0.weight"] = f"{dst}.conv.weight"
        names[f"{src}.0.bias"] = f"{dst}.conv.bias"
        if config.feat_extract_norm == "layer":
            for p in ("weight", "bias"):
                names[f"{src}.2.1.{p}"] = f"{dst}.layer_norm.{p}"
        elif i == 0:
            for p in ("weight", "bias"):
                names[f"{src}.2.{p}"] = f"{dst}.layer_norm.{p}"
    parts = {
        "self_attn.k_proj": "attention.k_proj",
        "self_attn.v_proj": "attention.v_proj",
        "self_attn.q_proj": "attention.q_proj",
        "self_attn.out_proj": "attention.out_proj",
        "self_attn_layer_norm": "layer_norm",
        "fc1": "feed_forward.intermediate_dense",
        "fc2": "feed_forward.output_dense",
        "final_layer_norm": "final_layer_norm",
    }
    for i in range(config.num_hidden_layers):
        for src, dst in parts.items():
            for p in ("weight", "bias"):
                names[f"encoder.layers.{i}.{src}.{p}"] = f"encoder.layers.{i}.{dst}.{p}"
    return names


def hf_state_dict(weights: dict, config) -> dict:
    """The weights under transformers' names; every fairseq tensor must find a place."""
    import torch

    renames = _renames(config)
    out, unused = {}, []
    for name, tensor in weights.items():
        if name in PRETRAINING_ONLY:
            continue
        if name not in renames:
            unused.append(name)
            continue
        out[renames[name]] = tensor.float()
    if unused:
        raise HubertCheckpointError(f"fairseq tensors with no place in HubertModel: {unused[:8]}")
    proj = "feature_projection.projection.weight"
    if proj not in out:  # fairseq skips the projection when widths already match
        width = config.conv_dim[-1]
        if width != config.hidden_size:
            raise HubertCheckpointError("no post_extract_proj, but the widths differ")
        out[proj] = torch.eye(width)
        out["feature_projection.projection.bias"] = torch.zeros(width)
    return out


def convert_hubert(src: str | Path, dst: str | Path, *, allow_pickle: bool = False) -> Path:
    """Write ``dst``: a transformers HubertModel folder (safetensors) equal to ``src``."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    model_cfg, task_cfg, weights = read_checkpoint(src, allow_pickle=allow_pickle)
    config = hf_config(model_cfg)
    model = HubertModel(config)
    state = hf_state_dict(weights, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HubertCheckpointError(
            f"{src}: tensors missing for HubertModel: {missing[:8]}; unexpected: {unexpected[:8]}"
        )
    dst = Path(dst)
    model.eval().save_pretrained(dst, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        sampling_rate=int(task_cfg.get("sample_rate", 16_000)),
        do_normalize=bool(task_cfg.get("normalize", False)),
        return_attention_mask=config.feat_extract_norm == "layer",
    ).save_pretrained(dst)
    (dst / "slm_lens_conversion.json").write_text(
        json.dumps({"source": str(src), "fairseq_model_cfg": sorted(model_cfg)}, indent=1)
    )
    return dst
