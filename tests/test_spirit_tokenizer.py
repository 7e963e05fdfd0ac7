"""Spirit LM's speech tokenizer as released, checked against an independent implementation.

The stand-ins are built in the released formats: a HuBERT checkpoint in fairseq's key
layout (in Spirit LM's weights-only container and in fairseq's pickled training
container) and a quantizer checkpoint in the release's own format.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from extractor.cli import main
from extractor.speech import spirit
from extractor.speech.fairseq_hubert import HubertCheckpointError, convert_hubert
from extractor.speech.spirit import (
    LinearQuantizerTokenizer,
    QuantizerFormatError,
    SpiritQuantizer,
    fill_blanks,
)
from extractor.speech.units import dedup

from .fairseq_reference import (
    fairseq_hubert_layer,
    random_fairseq_hubert,
    random_quantizer,
    released_codes,
    released_quantizer,
)

VOCAB, DIM = 20, 32
CONFIGS = {
    # Spirit LM's HuBERT: post-LN, group-norm feature extractor (fairseq's "default").
    "post-ln": {
        "extractor_mode": "default",
        "layer_norm_first": False,
    },
    "pre-ln": {
        "extractor_mode": "layer_norm",
        "layer_norm_first": True,
    },
}
BASE = {
    "encoder_layers": 3,
    "encoder_embed_dim": DIM,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    # HuBERT's real 25 Hz geometry (total stride 640) at a fraction of the width.
    "conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 3",
    "conv_pos": 16,
    "conv_pos_groups": 4,
}


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    tone = np.sin(2 * np.pi * (180 + 60 * np.sin(3 * t)) * t)
    return (0.3 * tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def _save_converted_container(path, cfg: dict, weights: dict, normalize: bool) -> None:
    """Spirit LM's released HuBERT container: plain dicts and tensors (weights_only)."""
    torch.save(
        {
            "model_cfg": cfg,
            "task_cfg": {"normalize": normalize, "sample_rate": 16_000},
            "model_weight": weights,
            "dictionaries_symbols": [["0", "1"]],
        },
        path,
    )


def _save_fairseq_container(path, cfg: dict, weights: dict, normalize: bool) -> None:
    """fairseq's training checkpoint: its config is a Python object (pickle only)."""
    torch.save(
        {
            "cfg": {
                "model": argparse.Namespace(**cfg),
                "task": argparse.Namespace(normalize=normalize, sample_rate=16_000),
            },
            "model": weights,
        },
        path,
    )


def _tolerance(reference: torch.Tensor, fan_in: int) -> float:
    """fp32, two summation orders: each output differs by at most ~fan_in * u * its scale."""
    u = torch.finfo(torch.float32).eps / 2
    return 4 * fan_in * u * float(reference.abs().max() + 1)


@pytest.fixture(params=sorted(CONFIGS))
def hubert(request, tmp_path):
    from transformers import HubertModel

    cfg = {**BASE, **CONFIGS[request.param]}
    weights = random_fairseq_hubert(cfg, seed=1)
    src = tmp_path / "hubert.pt"
    _save_converted_container(src, cfg, weights, normalize=request.param == "pre-ln")
    folder = convert_hubert(src, tmp_path / "hf")
    model = HubertModel.from_pretrained(folder, use_safetensors=True).eval()
    return cfg, weights, folder, model


@pytest.mark.parametrize("layer", [1, 2])
def test_converted_hubert_equals_the_fairseq_forward(hubert, layer):
    cfg, weights, _, model = hubert
    wav = torch.from_numpy(_clip(1.3))
    with torch.no_grad():
        ours = model(wav[None], output_hidden_states=True).hidden_states[layer][0]
        ref = fairseq_hubert_layer(weights, cfg, wav, layer)
    assert ours.shape == ref.shape
    fan_in = max(cfg["encoder_ffn_embed_dim"], cfg["conv_pos"] * DIM // cfg["conv_pos_groups"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=_tolerance(ref, fan_in))


def test_fairseq_training_container_needs_allow_pickle(tmp_path, capsys):
    cfg = {**BASE, **CONFIGS["post-ln"]}
    weights = random_fairseq_hubert(cfg, seed=2)
    src = tmp_path / "checkpoint_best.pt"
    _save_fairseq_container(src, cfg, weights, normalize=False)
    dst = tmp_path / "hf"
    assert main(["convert-hubert", str(src), str(dst)]) == 2
    assert "allow-pickle" in capsys.readouterr().err and not dst.exists()
    assert main(["convert-hubert", str(src), str(dst), "--allow-pickle"]) == 0
    assert (dst / "model.safetensors").is_file() and not list(dst.glob("*.bin"))


def test_a_tensor_without_a_place_is_an_error(tmp_path):
    cfg = {**BASE, **CONFIGS["post-ln"], "encoder_layers": 2}
    weights = random_fairseq_hubert({**cfg, "encoder_layers": 3}, seed=3)  # one layer too many
    _save_converted_container(tmp_path / "h.pt", cfg, weights, normalize=False)
    with pytest.raises(HubertCheckpointError, match=r"encoder\.layers\.2"):
        convert_hubert(tmp_path / "h.pt", tmp_path / "hf")


def test_blanks_take_the_nearest_unit_to_their_left_as_the_release_does():
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 4, n) for n in (1, 2, 7, 50, 300) for _ in range(20)]
    cases += [np.array([3, 3, 1, 3]), np.array([3, 3, 3]), np.array([0, 1, 2])]
    for codes in cases:
        blank = 3
        want = codes.copy()
        t = torch.from_numpy(want)[None]
        while (t == blank).any():  # the release's loop (never 10,000 passes here)
            t[t == blank] = torch.roll(t, 1)[t == blank]
            if not (t != blank).any():
                break
        np.testing.assert_array_equal(fill_blanks(codes, blank), t[0].numpy(), err_msg=str(codes))


def test_quantizer_loads_the_released_format_only(tmp_path):
    ckpt = random_quantizer(VOCAB, DIM, DIM)
    torch.save(ckpt, tmp_path / "q.pt")
    q = SpiritQuantizer.load(tmp_path / "q.pt")
    assert q.vocab_size == VOCAB and [tuple(w.shape) for w, _ in q.layers] == [
        (30, 32),
        (27, 30),
        (21, 27),
    ]
    torch.save({"layers.0.weight": torch.zeros(21, 32)}, tmp_path / "old.pt")
    with pytest.raises(QuantizerFormatError, match="model_cfg"):
        SpiritQuantizer.load(tmp_path / "old.pt")
    bad = random_quantizer(VOCAB, DIM, DIM)
    bad["model_weight"]["2.weight"] = torch.zeros(5, 5)
    with pytest.raises(QuantizerFormatError, match=r"layer 2: expected weight \(27, 30\)"):
        SpiritQuantizer(bad)


def test_units_equal_the_released_pipeline(hubert, tmp_path, monkeypatch):
    """HuBERT at layer 2, quantizer, blanks, dedup; long audio in chunks, a short tail skipped."""
    cfg, weights, folder, model = hubert
    monkeypatch.setattr(spirit, "MAX_CHUNK", 8_000)  # 0.5 s chunks: exercise the chunking
    ckpt = random_quantizer(VOCAB, DIM, DIM, seed=4)
    # Raise the blank's bias until it wins about a third of the frames of the first clip
    # (leading blanks included, most likely), so that blank filling is exercised.
    probe = fairseq_hubert_layer(weights, cfg, torch.from_numpy(_clip(1.3, seed=5)), 2)
    with torch.no_grad():
        logits = released_quantizer(ckpt)(probe)
    gap = logits[:, :VOCAB].max(-1).values - logits[:, VOCAB]
    ckpt["model_weight"]["4.bias"][VOCAB] += float(gap.quantile(0.35))
    torch.save(ckpt, tmp_path / "q.pt")
    normalize = spirit.reads_normalized(folder)
    assert normalize == (cfg["extractor_mode"] == "layer_norm")
    tok = LinearQuantizerTokenizer.from_file(model, tmp_path / "q.pt", layer=2, normalize=normalize)
    net = released_quantizer(ckpt)
    clips = [_clip(1.3, seed=5), _clip(0.7, seed=6), _clip(1.0 + 300 / 16_000, seed=7)]
    got = tok(clips)
    assert got == [tok([c])[0] for c in clips], "units never depend on the batch"
    blanks_seen = 0
    for clip, seq in zip(clips, got, strict=True):
        x = torch.from_numpy(clip)
        if normalize:
            x = torch.nn.functional.layer_norm(x, x.shape)
        parts = [x[s : s + 8_000] for s in range(0, len(x), 8_000)]
        feats = torch.cat(
            [fairseq_hubert_layer(weights, cfg, p, 2) for p in parts if len(p) >= 400]
        )
        with torch.no_grad():
            logits = net(feats)
            raw = logits.argmax(-1)
            blanks_seen += int((raw == VOCAB).sum())
            want = released_codes(net, VOCAB, feats)
        assert seq.n_frames == len(want) == tok.n_frames(len(clip))
        # Two correct implementations may differ by the feature tolerance; through the
        # quantizer (LeakyReLU is 1-Lipschitz) a gap between two outputs moves by at most
        # twice that times the product of the layers' infinity norms. Frames whose top
        # two outputs are closer could go either way; all others must agree.
        fan_in = max(cfg["encoder_ffn_embed_dim"], cfg["conv_pos"] * DIM // cfg["conv_pos_groups"])
        lipschitz = np.prod([float(w.abs().sum(1).max()) for w, _ in tok.quantizer.layers])
        margin = 2 * lipschitz * _tolerance(feats, fan_in)
        top2 = torch.log_softmax(logits, -1).topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > margin
        ours = torch.from_numpy(tok.quantizer.codes(tok.features(clip)))
        assert 2 * int(clear.sum()) > len(clear), "most frames must be decidable to test"
        assert torch.equal(ours[clear], want[clear])
        if bool(clear.all()):
            assert (seq.units, seq.durations) == tuple(map(list, dedup(want.tolist())))
    assert blanks_seen > 0, "the stand-in quantizer emits CTC blanks, so filling is exercised"
