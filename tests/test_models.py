"""Model surgery, layer capture and loading on tiny random models of every architecture."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from extractor.lens import LensInputs, fused_logit_lens, reference_logits
from extractor.models import (
    MissingFinalNormError,
    ModelLoadError,
    PickleWeightsError,
    UnsupportedArchitectureError,
    capture_layers,
    fingerprint_checkpoint,
    load_causal_lm,
    model_parts,
)

from .lens_checks import check_exact
from .tiny_models import TINY_CONFIGS, VOCAB, tiny_model

ARCHS = sorted(TINY_CONFIGS)


def _ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_lens_equals_model_logits(arch):
    model = tiny_model(arch)
    parts = model_parts(model)
    ids = _ids()
    select = torch.ones_like(ids, dtype=torch.bool)
    hidden = capture_layers(parts, ids, select)
    assert hidden.shape == (parts.n_layers + 1, ids.numel(), hidden.shape[-1])
    with torch.no_grad():
        real = model(ids).logits.reshape(-1, parts.vocab_size).double()
    lens = reference_logits(
        LensInputs(
            hidden=hidden[-1],
            unembed=parts.unembed,
            k=1,
            final_norm=parts.final_norm,
            bias=parts.bias,
            softcap=parts.softcap,
        )
    )
    assert torch.allclose(lens, real, atol=1e-4), (lens - real).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_lens_on_every_layer(arch):
    model = tiny_model(arch)
    parts = model_parts(model)
    ids = _ids()
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, 3:] = True
    hidden = capture_layers(parts, ids, select)
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = len(rows)
    gen = torch.Generator().manual_seed(2)
    inputs = LensInputs(
        hidden=rows,
        unembed=parts.unembed,
        k=5,
        final_norm=parts.final_norm,
        bias=parts.bias,
        softcap=parts.softcap,
        targets=torch.randint(-1, VOCAB, (n, 3), generator=gen),
        pool_groups=torch.arange(n) // 4,
        pool_targets=torch.randint(0, VOCAB, ((n + 3) // 4, 2), generator=gen),
    )
    got = fused_logit_lens(**inputs.__dict__, backend="torch", row_chunk=7, vocab_chunk=16)
    check_exact(inputs, got, vocab_chunk=16)


def test_layer0_is_the_first_block_input():
    model = tiny_model("gpt2")
    parts = model_parts(model)
    ids = _ids(1, 5)
    hidden = capture_layers(parts, ids, torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        want = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(5))
    assert torch.allclose(hidden[0], want[0], atol=1e-6)


def test_capture_keeps_only_selected_positions():
    parts = model_parts(tiny_model("llama"))
    ids = _ids(2, 6)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, 2] = select[1, 5] = True
    everything = capture_layers(parts, ids, torch.ones_like(select))
    picked = capture_layers(parts, ids, select)
    assert picked.shape[1] == 2
    assert torch.equal(picked[:, 0], everything[:, 2])
    assert torch.equal(picked[:, 1], everything[:, 11])


def test_gemma2_softcap_and_untied_head_are_found():
    parts = model_parts(tiny_model("gemma2"))
    assert parts.softcap == 3.0
    assert model_parts(tiny_model("qwen2")).tied is False
    assert model_parts(tiny_model("llama")).tied is True


def test_unknown_architecture_names_the_class():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="BertLMHeadModel"):
        model_parts(model)


def test_model_without_final_norm_is_refused():
    model = tiny_model("llama")
    model.model.norm = None  # a pre-LN model whose final norm is gone
    with pytest.raises(MissingFinalNormError, match="LlamaForCausalLM"):
        model_parts(model)


def test_opt_350m_style_post_ln_head_is_supported():
    """No final LayerNorm, a project_out to a narrower width: the lens is project_out(h) @ W_U."""
    model = tiny_model("opt", do_layer_norm_before=False)
    assert model.model.decoder.final_layer_norm is None
    assert model.model.decoder.project_out is not None
    parts = model_parts(model)
    ids = _ids()
    hidden = capture_layers(parts, ids, torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        real = model(ids).logits.reshape(-1, parts.vocab_size).double()
    lens = reference_logits(
        LensInputs(hidden=hidden[-1], unembed=parts.unembed, k=1, final_norm=parts.final_norm)
    )
    assert torch.allclose(lens, real, atol=1e-4)
    inputs = LensInputs(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        unembed=parts.unembed,
        k=3,
        final_norm=parts.final_norm,
        targets=torch.randint(0, VOCAB, (hidden.shape[0] * hidden.shape[1], 2)),
    )
    check_exact(inputs, fused_logit_lens(**inputs.__dict__, vocab_chunk=16), 16)


def test_safetensors_by_default_pickle_only_when_allowed(tmp_path):
    model = tiny_model("llama")
    safe_dir, pickle_dir = tmp_path / "safe", tmp_path / "pickle"
    model.save_pretrained(safe_dir)
    model.save_pretrained(pickle_dir)
    (pickle_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickle_dir / "pytorch_model.bin")  # Spirit LM's format
    assert list(pickle_dir.glob("*.bin")) and not list(pickle_dir.glob("*.safetensors"))
    loaded = load_causal_lm(safe_dir, dtype=torch.float32)
    with pytest.raises(PickleWeightsError, match="allow_pickle"):
        load_causal_lm(pickle_dir, dtype=torch.float32)
    unpickled = load_causal_lm(pickle_dir, dtype=torch.float32, allow_pickle=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, unpickled(ids).logits)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_slamkit_unit_lm_loads_with_plain_transformers(tmp_path, tied):
    """A SIMS-style UnitLM folder: nested base_config, top-level vocab, 'lm.' prefix."""
    arch = "llama" if tied else "qwen2"
    model = tiny_model(arch)
    base = model.config.to_dict()
    for key in ("architectures", "vocab_size", "torch_dtype", "dtype", "transformers_version"):
        base.pop(key, None)
    config = {
        "architectures": ["UnitLM"],
        "model_type": "speech_language_model",
        "vocab_size": VOCAB,
        "base_config": base,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {f"lm.{k}": v.contiguous() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm.lm_head.weight")
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_causal_lm(tmp_path, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert model_parts(loaded).tied is tied


def test_fingerprint_follows_content(tmp_path):
    model = tiny_model("llama")
    a, b = tmp_path / "a", tmp_path / "b"
    model.save_pretrained(a)
    model.save_pretrained(b)
    (b / "README.md").write_text("notes do not change what the model computes")
    assert fingerprint_checkpoint(str(a)) == fingerprint_checkpoint(str(b))
    weights = b / "model.safetensors"
    before = fingerprint_checkpoint(str(b))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1000))
    after = fingerprint_checkpoint(str(b))
    assert after != before == fingerprint_checkpoint(str(a))
    assert after == fingerprint_checkpoint(str(b), use_memo=False)  # the memo is faithful
    with pytest.raises(FileNotFoundError):
        fingerprint_checkpoint(str(tmp_path / "missing"))
