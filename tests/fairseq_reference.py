"""Spirit LM's speech tokenizer written independently in fairseq's terms (tests only).

A HuBERT forward that reads fairseq-named tensors directly with torch.nn.functional,
and the released quantizer's forward (three linear layers, LeakyReLU, log-softmax,
argmax, then the release's ``torch.roll`` loop over blanks), so the converter and
slm-lens' tokenizer are checked against the released arithmetic, not against
themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from extractor.speech.fairseq_hubert import conv_layers


def random_fairseq_hubert(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in fairseq's key layout for ``cfg`` (fan-in scaled, norms near 1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def norm(prefix, dim):
        w[f"{prefix}.weight"] = 1 + rnd(dim, scale=0.1)
        w[f"{prefix}.bias"] = rnd(dim, scale=0.1)

    w: dict[str, torch.Tensor] = {}
    c_in = 1
    for i, (dim, k, _) in enumerate(conv_layers(cfg["conv_feature_layers"])):
        w[f"feature_extractor.conv_layers.{i}.0.weight"] = rnd(
            dim, c_in, k, scale=(c_in * k) ** -0.5
        )
        if cfg["extractor_mode"] == "layer_norm":
            norm(f"feature_extractor.conv_layers.{i}.2.1", dim)
        elif i == 0:
            norm(f"feature_extractor.conv_layers.{i}.2", dim)
        c_in = dim
    d, ffn = cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    norm("layer_norm", c_in)
    w["post_extract_proj.weight"] = rnd(d, c_in, scale=c_in**-0.5)
    w["post_extract_proj.bias"] = rnd(d, scale=0.1)
    k, groups = cfg["conv_pos"], cfg["conv_pos_groups"]
    w["encoder.pos_conv.0.weight_v"] = rnd(d, d // groups, k)
    w["encoder.pos_conv.0.weight_g"] = 0.5 + rnd(1, 1, k, scale=0.1).abs()
    w["encoder.pos_conv.0.bias"] = rnd(d, scale=0.1)
    norm("encoder.layer_norm", d)
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            w[f"{p}.self_attn.{proj}.weight"] = rnd(d, d, scale=d**-0.5)
            w[f"{p}.self_attn.{proj}.bias"] = rnd(d, scale=0.1)
        norm(f"{p}.self_attn_layer_norm", d)
        w[f"{p}.fc1.weight"], w[f"{p}.fc1.bias"] = rnd(ffn, d, scale=d**-0.5), rnd(ffn, scale=0.1)
        w[f"{p}.fc2.weight"], w[f"{p}.fc2.bias"] = rnd(d, ffn, scale=ffn**-0.5), rnd(d, scale=0.1)
        norm(f"{p}.final_layer_norm", d)
    w["mask_emb"] = rnd(d)
    w["final_proj.weight"] = rnd(16, d)  # pretraining head: dropped by the converter
    w["label_embs_concat"] = rnd(8, 16)
    return w


def _ln(x, w, prefix):
    return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], 1e-5)


def fairseq_hubert_layer(w: dict, cfg: dict, wav: torch.Tensor, layer: int) -> torch.Tensor:
    """``extract_features(source=wav[None], output_layer=layer)[0][0]``: [frames, dim]."""
    x = wav.float()[None, None]
    for i, (dim, _k, stride) in enumerate(conv_layers(cfg["conv_feature_layers"])):
        x = F.conv1d(x, w[f"feature_extractor.conv_layers.{i}.0.weight"], stride=stride)
        if cfg["extractor_mode"] == "layer_norm":
            x = _ln(x.transpose(1, 2), w, f"feature_extractor.conv_layers.{i}.2.1").transpose(1, 2)
        elif i == 0:
            p = f"feature_extractor.conv_layers.{i}.2"
            x = F.group_norm(x, dim, w[f"{p}.weight"], w[f"{p}.bias"], 1e-5)
        x = F.gelu(x)
    x = _ln(x.transpose(1, 2), w, "layer_norm")
    x = F.linear(x, w["post_extract_proj.weight"], w["post_extract_proj.bias"])
    v, g = w["encoder.pos_conv.0.weight_v"], w["encoder.pos_conv.0.weight_g"]
    kernel = v * (g / v.norm(dim=(0, 1), keepdim=True))
    k = kernel.shape[-1]
    pos = F.conv1d(
        x.transpose(1, 2),
        kernel,
        w["encoder.pos_conv.0.bias"],
        padding=k // 2,
        groups=cfg["conv_pos_groups"],
    )
    if k % 2 == 0:
        pos = pos[:, :, :-1]
    x = x + F.gelu(pos).transpose(1, 2)
    first = cfg["layer_norm_first"]
    if not first:
        x = _ln(x, w, "encoder.layer_norm")
    heads = cfg["encoder_attention_heads"]
    for i in range(layer):
        p = f"encoder.layers.{i}"
        res = x
        if first:
            x = _ln(x, w, f"{p}.self_attn_layer_norm")
        q, kk, vv = (
            F.linear(x, w[f"{p}.self_attn.{n}.weight"], w[f"{p}.self_attn.{n}.bias"])
            for n in ("q_proj", "k_proj", "v_proj")
        )
        t, d = x.shape[1], x.shape[2]
        split = [z.view(1, t, heads, d // heads).transpose(1, 2) for z in (q, kk, vv)]
        scores = (split[0] * (d // heads) ** -0.5) @ split[1].transpose(-1, -2)
        att = (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(1, t, d)
        x = res + F.linear(
            att, w[f"{p}.self_attn.out_proj.weight"], w[f"{p}.self_attn.out_proj.bias"]
        )
        if not first:
            x = _ln(x, w, f"{p}.self_attn_layer_norm")
        res = x
        if first:
            x = _ln(x, w, f"{p}.final_layer_norm")
        x = F.linear(
            F.gelu(F.linear(x, w[f"{p}.fc1.weight"], w[f"{p}.fc1.bias"])),
            w[f"{p}.fc2.weight"],
            w[f"{p}.fc2.bias"],
        )
        x = res + x
        if not first:
            x = _ln(x, w, f"{p}.final_layer_norm")
    return x[0]


def released_quantizer(checkpoint: dict) -> torch.nn.Module:
    """The release's encoder: widths from model_cfg, LeakyReLU between the layers."""
    cfg = checkpoint["model_cfg"]
    vocab, dim, upstream = cfg["vocab_size"], cfg["dim"], cfg["upstream_dim"]
    mid = upstream - (vocab + 1)
    net = torch.nn.Sequential(
        torch.nn.Linear(dim, dim - mid // 4),
        torch.nn.LeakyReLU(),
        torch.nn.Linear(dim - mid // 4, dim - mid // 2),
        torch.nn.LeakyReLU(),
        torch.nn.Linear(dim - mid // 2, vocab + 1),
    )
    net.load_state_dict(checkpoint["model_weight"])
    return net


def released_codes(net: torch.nn.Module, vocab: int, feats: torch.Tensor) -> torch.Tensor:
    """log-softmax, argmax, then blanks filled by the release's roll loop, verbatim in spirit."""
    code = F.log_softmax(net(feats[None]), dim=-1).argmax(dim=-1)
    passes = 0
    while (code == vocab).any():
        passes += 1
        code[code == vocab] = torch.roll(code, 1)[code == vocab]
        if passes == 10000:
            break
    return code[0]


def random_quantizer(vocab: int, dim: int, upstream: int, seed: int = 0) -> dict:
    """A checkpoint in the released format (random weights, fan-in scaled)."""
    gen = torch.Generator().manual_seed(seed)
    mid = upstream - (vocab + 1)
    widths = [dim, dim - mid // 4, dim - mid // 2, vocab + 1]
    weights = {}
    for j, key in enumerate(("0", "2", "4")):
        fan_in = widths[j]
        weights[f"{key}.weight"] = torch.randn(widths[j + 1], fan_in, generator=gen) * fan_in**-0.5
        weights[f"{key}.bias"] = torch.randn(widths[j + 1], generator=gen) * 0.1
    return {
        "model_cfg": {"vocab_size": vocab, "dim": dim, "upstream_dim": upstream},
        "model_weight": weights,
    }
