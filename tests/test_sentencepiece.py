"""Variants, text spans and word boundaries on real SentencePiece and byte-level BPE tokenizers.

The SentencePiece stand-ins are trained here with Llama-2's settings (BPE, dummy
prefix, byte fallback, split digits, identity normaliser, whitespace kept) and
loaded two ways: the ``tokenizer.json`` shape Llama-2 and Spirit LM ship, whose
normaliser prepends "▁" and so encodes " Hello" as ["▁", "▁Hello"]; and
transformers' own conversion of ``tokenizer.model``. SmolLM2's real tokenizer
stands for byte-level BPE (GPT-2, Qwen, Llama-3 share its shape: no word-start
mark, the space belongs to the word).
"""

from __future__ import annotations

import pytest

from extractor.speech.layouts import layout_from_config
from extractor.speech.records import AlignedWord, Utterance
from extractor.speech.sequence import (
    ModalityRule,
    build_sequence,
    marks_word_starts,
    word_variants,
)

SENTENCES = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "a small dog ran home",
    "we drank tea by the river",
    "Hello world 2024 numbers 12345",
    "The Cat and the Hat sat",
]
MARKERS = ["[Text]", "[Speech]"]
N_UNITS = 10
LAYOUT = {
    "unit_format": "[Hu{}]",
    "n_units": N_UNITS,
    "speech_marker": "[Speech]",
    "text_marker": "[Text]",
}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("sp") / "llama-like"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 40),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _with_speech_tokens(tok):
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in MARKERS])
    tok.add_tokens([AddedToken(f"[Hu{i}]", normalized=False) for i in range(N_UNITS)])
    return tok


def llama2_as_released(sp_model, folder):
    """The tokenizer.json shape of Llama-2 / Spirit LM: Prepend("▁") + Replace(" ", "▁")."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(sp_model)).extract()
    core = Tokenizer(
        BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    )
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return _with_speech_tokens(AutoTokenizer.from_pretrained(folder))


def llama_from_model_file(sp_model, folder):
    import shutil

    from transformers import LlamaTokenizer

    folder.mkdir()
    shutil.copy(sp_model, folder / "tokenizer.model")
    return _with_speech_tokens(LlamaTokenizer.from_pretrained(folder))


@pytest.fixture(params=["llama2-tokenizer.json", "llama-tokenizer.model", "smollm2-bpe"])
def tokenizer(request, sp_model, tmp_path, smollm2_path):
    from transformers import AutoTokenizer

    if request.param == "llama2-tokenizer.json":
        tok = llama2_as_released(sp_model, tmp_path / "tok")
        assert tok.convert_ids_to_tokens(tok.encode(" Hello", add_special_tokens=False)) == [
            "▁",
            "▁Hello",
        ], "the stand-in must encode as Llama-2 does"
        return tok
    if request.param == "llama-tokenizer.model":
        return llama_from_model_file(sp_model, tmp_path / "tok")
    return _with_speech_tokens(AutoTokenizer.from_pretrained(smollm2_path))


WORDS = [
    ("the", 0.0, 0.2),
    ("cat", 0.2, 0.4),
    ("sat", 0.4, 0.6),
    ("on", 0.6, 0.8),
    ("12345", 0.8, 1.0),
    ("Hat", 1.0, 1.2),
]


def _sequence(tok):
    utt = Utterance(
        id="u",
        text=" ".join(w for w, _, _ in WORDS),
        words=tuple(AlignedWord(*w) for w in WORDS),
        units=tuple(i % N_UNITS for i in range(30)),
        durations=(1,) * 30,
    )
    layout = layout_from_config(LAYOUT).check(tok)
    rule = ModalityRule("alternate", n=2, start="text")  # text: the cat | 12345 Hat
    return build_sequence(utt, tok, layout, "interleaved", rule)


def test_no_variant_is_whitespace_and_words_do_not_share_them(tokenizer):
    seq = _sequence(tokenizer)
    seen = {}
    for row in seq.words:
        assert row.variant_ids, row.word
        for v in row.variant_ids:
            text = tokenizer.decode([v]).strip()
            assert text, f"{row.word}: variant {v} is whitespace only"
            assert row.word.lower().startswith(text.lower()), (row.word, text)
            assert seen.setdefault(v, row.word.lower()) == row.word.lower(), (v, row.word)


def test_text_runs_are_what_the_tokenizer_makes_of_the_whole_run(tokenizer):
    seq = _sequence(tokenizer)
    lead = "" if marks_word_starts(tokenizer) else " "
    runs = [["the", "cat"], ["12345", "Hat"]]
    marker = tokenizer.convert_tokens_to_ids("[Text]")
    starts = [p + 1 for p, t in enumerate(seq.token_ids) if t == marker]
    assert len(starts) == 2
    for start, run in zip(starts, runs, strict=True):
        want = tokenizer.encode(lead + " ".join(run), add_special_tokens=False)
        assert seq.token_ids[start : start + len(want)] == want
        for word in run:
            row = next(r for r in seq.words if r.word == word)
            span = seq.token_ids[row.first_position : row.last_position + 1]
            assert tokenizer.decode(span).strip() == word
            positions = range(row.first_position, row.last_position + 1)
            assert all(seq.word_index[p] == row.word_index for p in positions)
    # The run right after a marker starts with the word itself, never a stray "▁".
    first = seq.token_ids[starts[0]]
    assert tokenizer.decode([first]).strip() == "the"


def test_sentencepiece_detection(tokenizer):
    name = type(tokenizer).__name__
    assert marks_word_starts(tokenizer) == (
        tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[
            0
        ].startswith("▁")
    ), name


def test_the_reported_collision_is_gone(sp_model, tmp_path):
    """The issue's case: with Llama-2's tokenizer every word's variant was the bare "▁"."""
    tok = llama2_as_released(sp_model, tmp_path / "tok")
    blank = tok.convert_tokens_to_ids("▁")
    variants = {w: word_variants(tok, w) for w in ("Hello", "cat", "river", "france")}
    assert all(blank not in v for v in variants.values()), variants
    assert len({v[0] for v in variants.values()}) == 4
