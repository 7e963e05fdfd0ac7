"""Stored rank columns against an independent float64 computation, row by row.

``pack_targets`` and ``lens_tables`` turn built sequences into lens targets and the lens
result into store rows. Here a real (tiny, random) SIMS model's hidden states go through
them and the exact lens; every stored rank is then recomputed from float64 logits with
plain per-row Python: for each row, the count of vocabulary entries strictly above the
best variant, over the whole vocabulary and over the text segment; for each spoken word,
the same in the element-wise maximum of its speech positions' logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from extractor.demo import build_demo_model
from extractor.lens import LensInputs, fused_logit_lens
from extractor.lens.reference import reference_logits
from extractor.models import capture_layers, load_causal_lm, model_parts
from extractor.service.rows import lens_tables, pack_targets, pooled_groups
from extractor.speech.layouts import SIMS
from extractor.speech.records import AlignedWord, Utterance
from extractor.speech.sequence import ControlSampler, ModalityRule, build_sequence

WORDS = [
    ("the", 0.0, 0.2),
    ("cat", 0.2, 0.44),
    ("sat", 0.44, 0.6),
    ("on", 0.6, 0.72),
    ("the", 0.72, 0.8),
    ("mat", 0.8, 1.0),
]


@pytest.fixture(scope="module")
def batch():
    folder = build_demo_model(tiny=True)
    model = load_causal_lm(folder, dtype=torch.float32)
    parts = model_parts(model)
    tok = AutoTokenizer.from_pretrained(folder)
    layout = SIMS.check(tok)
    control = ControlSampler([("a", ["dog", "tea", "river"]), ("b", ["sun", "home"])], seed=0)
    seqs = []
    for i, rule in enumerate(
        (ModalityRule("alternate", n=2, start="speech"), ModalityRule("alternate", n=1))
    ):
        utt = Utterance(
            id=f"u{i}",
            text=" ".join(w for w, _, _ in WORDS),
            words=tuple(AlignedWord(*w) for w in WORDS),
            units=tuple((7 * j + i) % 500 for j in range(25)),
            durations=(1,) * 25,
        )
        seqs.append(build_sequence(utt, tok, layout, "interleaved", rule, control))
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s.token_ids)
        attn[b, : len(s)] = 1
    select = attn.bool()
    sel_b, sel_p = torch.nonzero(select, as_tuple=True)
    hidden = capture_layers(parts, ids, select, attn)
    return parts, layout, seqs, sel_b.numpy(), sel_p.numpy(), hidden


def test_stored_ranks_equal_an_independent_float64_count(batch):
    parts, layout, seqs, sel_b, sel_p, hidden = batch
    n_layers, k = hidden.shape[0], 5
    targets = pack_targets(seqs, sel_b, sel_p)
    pool_rows, pool_targets = pooled_groups(targets, n_layers)
    segments = layout.segments(parts.vocab_size)
    inputs = LensInputs(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        unembed=parts.unembed,
        k=k,
        final_norm=parts.final_norm,
        bias=parts.bias,
        softcap=parts.softcap,
        segments=segments,
        targets=torch.from_numpy(np.tile(targets.row_targets(), (n_layers, 1))),
        pool_groups=torch.from_numpy(pool_rows),
        pool_targets=torch.from_numpy(pool_targets),
    )
    result = fused_logit_lens(**inputs.__dict__, backend="torch")
    lens, word_lens = lens_tables(result, targets, seqs, n_layers, k, has_text=True)

    logits = reference_logits(inputs).double()  # [n_layers * rows, V], layer-major
    text = segments.index == segments.names.index("text")
    by_id = {s.utterance_id: s for s in seqs}

    def best_rank(row_logits: torch.Tensor, variants) -> tuple[int | None, int | None]:
        if not variants:
            return None, None
        full = min(int((row_logits > row_logits[v]).sum()) for v in variants)
        in_text = min(int((row_logits[text] > row_logits[v]).sum()) for v in variants)
        return full, in_text

    rows = lens.to_pylist()
    assert len(rows) == n_layers * len(sel_b)
    checked = 0
    for r, row in enumerate(rows):
        seq = by_id[row["utterance_id"]]
        assert seq.token_ids and row["modality"] == seq.modality[row["position"]]
        w = seq.word_index[row["position"]]
        assert row["word_index"] == w
        if w is None:
            assert row["cur_word_rank"] is None
            continue
        word = seq.words[w]
        for name, variants in (
            ("cur", word.variant_ids),
            ("next", word.next_variant_ids),
            ("ctrl", word.ctrl_variant_ids),
        ):
            want = best_rank(logits[r], variants)
            assert (row[f"{name}_word_rank"], row[f"{name}_word_text_rank"]) == want, (r, name)
            checked += 1
    assert checked > 100

    pooled = word_lens.to_pylist()
    assert pooled, "the speech words of both utterances are pooled"
    n_rows = len(sel_b)
    for row in pooled:
        seq = by_id[row["utterance_id"]]
        b = [s.utterance_id for s in seqs].index(row["utterance_id"])
        word = seq.words[row["word_index"]]
        assert word.modality == "speech"
        members = [
            row["layer"] * n_rows + s
            for s in range(n_rows)
            if sel_b[s] == b
            and seq.word_index[sel_p[s]] == row["word_index"]
            and seq.modality[sel_p[s]] == "speech"
        ]
        maxed = logits[members].max(dim=0).values
        for name, variants in (("cur", word.variant_ids), ("next", word.next_variant_ids)):
            want = best_rank(maxed, variants)
            assert (row[f"{name}_word_rank"], row[f"{name}_word_text_rank"]) == want
