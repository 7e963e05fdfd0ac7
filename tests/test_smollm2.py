"""The lens on a real pretrained model: SmolLM2-135M (30 blocks, V=49,152, tied)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from extractor.cli import main
from extractor.lens import LensInputs, VocabSegments, fused_logit_lens, reference_logits
from extractor.lens.chunked import MODEL_DTYPE, chunked_lens, gemm_choices
from extractor.models import capture_layers, load_causal_lm, model_parts

from .lens_checks import check_exact

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def _inputs(model, tokenizer, positions=slice(-6, None)) -> LensInputs:
    parts = model_parts(model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, positions] = True
    hidden = capture_layers(parts, ids, select)  # [31, P, d]
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = len(rows)
    gen = torch.Generator().manual_seed(0)
    next_ids = [*ids[0, 1:].tolist(), 0]
    targets = torch.tensor([next_ids[i] for i in range(ids.shape[1]) if select[0, i]])
    targets = targets.repeat(hidden.shape[0])[:, None]
    targets = torch.cat([targets, torch.randint(-1, parts.vocab_size, (n, 2), generator=gen)], 1)
    return LensInputs(
        hidden=rows,
        unembed=parts.unembed,
        k=10,
        final_norm=parts.final_norm,
        # A pretend SIMS split of the real vocabulary, to exercise segments at full size.
        segments=VocabSegments.from_ranges(parts.vocab_size, {"speech": [(48_000, 49_152)]}),
        targets=targets,
        pool_groups=torch.arange(n) // 3,
        pool_targets=torch.randint(0, parts.vocab_size, ((n + 2) // 3, 2), generator=gen),
    )


@pytest.mark.slow
def test_fp32_lens_is_exact_on_real_hidden_states(smollm2_fp32):
    inputs = _inputs(*smollm2_fp32)
    got = fused_logit_lens(**inputs.__dict__, backend="torch", row_chunk=64, vocab_chunk=4096)
    check_exact(inputs, got, vocab_chunk=4096)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_lens_is_exact_on_real_hidden_states(smollm2_path, dtype):
    from transformers import AutoTokenizer

    model = load_causal_lm(smollm2_path, dtype=dtype)
    inputs = _inputs(model, AutoTokenizer.from_pretrained(smollm2_path), slice(-3, None))
    assert inputs.hidden.dtype == dtype
    # Every GEMM each call can take, whether or not this CPU would choose it: with ranks,
    # IEEE fp32 through torch's BLAS, oneDNN and (bf16, a CPU with AVX-512 BF16)
    # VDPBF16PS; without, the model-dtype GEMM too.
    rank_free = replace(inputs, targets=None, pool_targets=None)
    assert MODEL_DTYPE in gemm_choices(rank_free)
    for call in (inputs, rank_free):
        for gemm in gemm_choices(call):
            check_exact(call, chunked_lens(call, gemm=gemm))


@pytest.mark.slow
def test_last_layer_equals_the_model_logits(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    parts = model_parts(model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    hidden = capture_layers(parts, ids, torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        real = torch.log_softmax(model(ids).logits[0].double(), -1)
    res = fused_logit_lens(hidden[-1], parts.final_norm, parts.unembed, 5)
    assert torch.equal(res.topk_ids, real.topk(5).indices)
    assert torch.allclose(res.topk_logprobs.double(), real.topk(5).values, atol=1e-4)
    lens = reference_logits(
        LensInputs(hidden=hidden[-1], unembed=parts.unembed, k=1, final_norm=parts.final_norm)
    )
    assert torch.allclose(torch.log_softmax(lens, -1), real, atol=1e-4)


@pytest.mark.slow
def test_lens_command_prints_every_layer(smollm2_path, capsys):
    assert main(["lens", "The capital of France is", "--k", "3", "--model", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(rows) == 31  # embeddings + 30 blocks
    assert rows[-1].split()[0] == "30" and "Paris" in rows[-1]
