"""`lens.head`: another checkpoint's final norm and unembedding decode the model's layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.store import open_store
from extractor.config import parse_config
from extractor.models.head import HeadMismatchError, foreign_head
from extractor.service.driver import run_extraction
from tests.service_helpers import small_config


def _text_lm(folder, hidden: int, vocab: int | None = None) -> str:
    """A random text LM over SmolLM2's own tokenizer (no speech units): a foreign head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from extractor.models.smollm2 import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab or len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_head_of_another_width_is_refused_by_name(tmp_path):
    head = _text_lm(tmp_path / "head48", hidden=48)
    with pytest.raises(HeadMismatchError, match="width 48, but the model's blocks write width 32"):
        foreign_head(head, model_hidden_size=32, dtype=torch.float32, device="cpu")


def test_a_head_whose_tokenizer_outgrows_its_unembedding_is_refused(tmp_path):
    head = _text_lm(tmp_path / "small", hidden=32, vocab=2000)
    cfg = small_config(str(tmp_path / "store"), tmp_path / "data", lens={"head": head})
    with pytest.raises(HeadMismatchError, match="tokens but its unembedding only 2000 rows"):
        run_extraction(parse_config(cfg), in_process=True, progress=False)


def test_a_foreign_head_ranks_over_its_own_vocabulary(tmp_path):
    head = _text_lm(tmp_path / "head", hidden=32)  # the tiny demo model is 32 wide
    store = str(tmp_path / "store")
    own = run_extraction(parse_config(small_config(store, tmp_path / "data")), in_process=True)
    cfg = small_config(store, tmp_path / "data", lens={"head": head})
    summary = run_extraction(parse_config(cfg), in_process=True, progress=False)
    assert summary.ok, summary.describe()
    assert summary.run_id != own.run_id

    con = open_store(store, [summary.run_id])
    (config, vocab_size) = con.sql("SELECT config, vocab_size FROM runs").fetchone()
    lens_config = json.loads(config)["lens"]
    assert lens_config["head"] == head and len(lens_config["head_revision"]) >= 8
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(head)
    vocab = con.sql("SELECT modality, count(*) FROM vocab GROUP BY ALL").fetchall()
    assert dict(vocab) == {
        "text": len(tokenizer) - len(tokenizer.all_special_ids),
        "special": len(tokenizer.all_special_ids),
    }
    assert vocab_size == len(tokenizer)
    lens = con.sql(
        "SELECT max(list_max(topk_ids)) AS top, count(next_token_logprob) AS next_lp, "
        "count(cur_word_text_rank) AS text_ranks, count(*) AS n FROM lens"
    ).fetchone()
    assert lens[0] < len(tokenizer)  # ids of the head's vocabulary: no unit id
    assert lens[1] == 0  # the model's next token is not a token of this head
    assert lens[2] > 0 and lens[3] > 0
    # The word targets are the head tokenizer's ids (here the same text ids as the model's).
    words = con.sql("SELECT word, variant_ids FROM words WHERE word = 'cat' LIMIT 1").fetchone()
    assert words[1][0] in tokenizer.encode(" cat") + tokenizer.encode("cat")


@pytest.mark.slow
def test_smollm2_as_the_foreign_head_of_its_speech_extension_gives_the_same_text_ranks(tmp_path):
    """The demo model is SmolLM2-135M with unit rows appended: decoded by the original
    SmolLM2 (same final norm, same text rows), every text-segment rank and text top-k list
    must equal the own-head run's exactly; only the unit rows differ."""
    from extractor.demo import demo_config
    from extractor.models.smollm2 import ensure_smollm2

    store = str(tmp_path / "store")
    sentences = ["the cat sat on the mat", "paris is the capital of france"]
    raw = demo_config(store, tmp_path / "data", librivox=False, sentences=sentences)
    raw["shard_size"] = 2
    own = run_extraction(parse_config(raw), in_process=True, progress=False)
    raw["lens"] = {**raw["lens"], "head": str(ensure_smollm2())}
    foreign = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert own.ok and foreign.ok

    cols = "utterance_id, position, layer, cur_word_text_rank, next_word_text_rank, text_topk_ids"
    key = "ORDER BY utterance_id, position, layer"
    a = open_store(store, [own.run_id]).sql(f"SELECT {cols} FROM lens {key}").df()
    b = open_store(store, [foreign.run_id]).sql(f"SELECT {cols} FROM lens {key}").df()
    assert len(a) == len(b) > 0
    for col in ("cur_word_text_rank", "next_word_text_rank"):
        assert a[col].fillna(-1).tolist() == b[col].fillna(-1).tolist(), col
    assert [list(x) for x in a["text_topk_ids"]] == [list(x) for x in b["text_topk_ids"]]
    assert np.isfinite(a["cur_word_text_rank"].dropna()).all()
