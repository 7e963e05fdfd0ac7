"""Unit arithmetic: dedup, slamkit spans, layouts and sequence building."""

from __future__ import annotations

import bisect
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractor.speech.layouts import (
    SIMS,
    SLAM,
    SPIRIT_LM,
    LayoutError,
    layout_from_config,
)
from extractor.speech.records import AlignedWord, SequenceTooLongError, Utterance
from extractor.speech.sequence import ControlSampler, ModalityRule, build_sequence, word_variants
from extractor.speech.units import dedup, unit_spans

from .speech_fixtures import sims_tokenizer, spirit_tokenizer


@given(st.lists(st.integers(0, 5), max_size=200))
def test_dedup_keeps_runs(frames):
    units, durations = dedup(frames)
    assert sum(durations) == len(frames)
    assert all(d >= 1 for d in durations)
    assert all(a != b for a, b in itertools.pairwise(units))
    assert [u for u, d in zip(units, durations, strict=True) for _ in range(d)] == frames


@st.composite
def timed_words(draw):
    durations = draw(st.lists(st.integers(1, 6), min_size=1, max_size=60))
    total = sum(durations) * 0.04
    cuts = sorted(draw(st.lists(st.floats(0, total), min_size=2, max_size=20)))
    words = [
        AlignedWord(f"w{i}", a, b)
        for i, (a, b) in enumerate(zip(cuts[::2], cuts[1::2], strict=False))
    ]
    return durations, words


@settings(max_examples=200)
@given(timed_words())
def test_spans_are_ordered_disjoint_and_inside(case):
    durations, words = case
    spans = unit_spans(words, durations)
    owned = [s for s in spans if s]
    for first, stop in owned:
        assert 0 <= first < stop <= len(durations)
    for (_a0, a1), (b0, _b1) in itertools.pairwise(owned):
        assert a1 <= b0 + 1  # words meeting inside one unit may share its boundary unit
    ends = list(np.cumsum(durations) * 0.04)
    for w, span in zip(words, spans, strict=True):
        want = (bisect.bisect_left(ends, w.start_s), bisect.bisect_right(ends, w.end_s))
        assert span == (want if want[1] > want[0] else None)


def test_spans_match_exact_boundaries_within_a_frame():
    # 25 Hz frames, no dedup: each frame is one unit.
    durations = [1] * 100
    words = [AlignedWord("a", 0.10, 0.52), AlignedWord("b", 0.60, 1.31), AlignedWord("c", 1.5, 2.0)]
    for w, (first, stop) in zip(words, unit_spans(words, durations), strict=True):
        assert abs(first * 0.04 - w.start_s) <= 0.04
        assert abs(stop * 0.04 - w.end_s) <= 0.04


def test_word_without_units_is_recorded():
    spans = unit_spans([AlignedWord("a", 0.0, 0.2), AlignedWord("uh", 0.201, 0.202)], [5, 5])
    assert spans[0] == (0, 1) and spans[1] is None


@pytest.fixture(scope="module")
def sims(smollm2_path):
    tok = sims_tokenizer(smollm2_path)
    return tok, SIMS.check(tok)


def _utt(words, units, durations):
    return Utterance(
        id="u1",
        text=" ".join(w for w, _, _ in words),
        words=tuple(AlignedWord(*w) for w in words),
        units=tuple(units),
        durations=tuple(durations),
    )


CAT = [
    ("The", 0.0, 0.16),
    ("cat", 0.16, 0.32),
    ("on", 0.32, 0.4),
    ("the", 0.4, 0.48),
    ("mat", 0.48, 0.6),
]


def test_sims_interleaved_decodes_to_the_reference_string(sims):
    tok, layout = sims
    utt = _utt(CAT, units=[12, 7, 3, 9, 4, 5, 6, 8], durations=[2, 2, 1, 1, 1, 1, 2, 5])
    rule = ModalityRule(kind="flags", flags=(False, False, True, False, False))
    seq = build_sequence(utt, tok, layout, "interleaved", rule)
    # "on" spans [0.32, 0.40] s: unit ends are 0.08, 0.16, ... so it owns units 5 and 6.
    assert tok.decode(seq.token_ids) == "<text> The cat<speech><Un5><Un6><text> the mat"
    spoken = seq.words[2]
    assert spoken.modality == "speech" and spoken.last_position == spoken.first_position + 1
    assert seq.modality[spoken.first_position] == "speech"
    assert seq.word_index[spoken.first_position] == 2
    assert tok.decode([spoken.variant_ids[0]]) == " on"
    assert seq.words[1].next_variant_ids == spoken.variant_ids
    assert seq.words[-1].next_variant_ids is None


def test_sims_speech_mode_keeps_silence_units(sims):
    tok, layout = sims
    words = [("hi", 0.08, 0.2), ("there", 0.3, 0.5)]
    utt = _utt(words, units=[1, 2, 3, 4, 5, 6], durations=[2, 2, 2, 2, 2, 3])
    seq = build_sequence(utt, tok, layout, "speech")
    assert tok.decode(seq.token_ids) == "<speech>" + "".join(f"<Un{u}>" for u in range(1, 7))
    # Unit ends 0.08, 0.16, 0.24, 0.32, 0.40, 0.52 s: "hi" owns units 0-1, "there" 3-4,
    # unit 2 is the pause between them and unit 5 trailing silence.
    assert seq.word_index == [None, 0, 0, None, 1, 1, None]
    assert (seq.words[0].first_position, seq.words[0].last_position) == (1, 2)
    assert seq.unspanned_words == []
    # A word too short to own a 40 ms unit is lensed nowhere, and counted as such.
    short = _utt([*words, ("a", 0.505, 0.51)], units=[1, 2, 3, 4, 5, 6], durations=[2] * 5 + [3])
    assert build_sequence(short, tok, layout, "speech").unspanned_words == [2]


def test_speech_only_prompts_open_as_each_family_does(sims):
    """slamkit writes bare units; Spirit LM (and the organism) open with the speech marker."""
    tok, layout = sims
    utt = _utt([("hi", 0.0, 0.2)], units=[1, 2, 3], durations=[2, 2, 2])
    bare = build_sequence(utt, tok, layout, "speech", speech_marker=False)
    marked = build_sequence(utt, tok, layout, "speech")
    assert tok.decode(bare.token_ids) == "<Un1><Un2><Un3>"
    assert marked.token_ids == [layout.speech_marker_id, *bare.token_ids]
    assert marked.words[0].first_position == bare.words[0].first_position + 1


def test_variants_cover_case_and_space(sims):
    tok, _ = sims
    ids = word_variants(tok, '"Paris,"')
    forms = (" Paris", "Paris", " paris", "paris")
    want = list(dict.fromkeys(tok.encode(f, add_special_tokens=False)[0] for f in forms))
    assert sorted(ids) == sorted(want)
    assert tok.decode([ids[0]]) == " Paris"


def test_spirit_layout_ids_and_string():
    tok = spirit_tokenizer()
    layout = SPIRIT_LM.check(tok)
    assert layout.unit_id(0) == 32002 and layout.text_marker_id == 32000
    utt = _utt([("the", 0, 0.08), ("cat", 0.08, 0.16)], [3, 4, 5, 6], [1, 1, 1, 1])
    seq = build_sequence(
        utt, tok, layout, "interleaved", ModalityRule("flags", flags=(False, True))
    )
    assert seq.token_ids[:2] == [32000, tok.convert_tokens_to_ids("the")]
    # slamkit rule: "cat" [0.08, 0.16] owns the unit ending at 0.08 too (units 1-3).
    assert seq.token_ids[2:] == [32001, 32002 + 4, 32002 + 5, 32002 + 6]
    segs = layout.segments()
    assert segs.names[segs.index[32002]] == "speech" and segs.names[segs.index[5]] == "text"


def test_layout_mismatch_names_the_first_problem(smollm2_path):
    tok = sims_tokenizer(smollm2_path, n_units=10)
    with pytest.raises(LayoutError, match="<Un10>"):
        SIMS.check(tok)
    with pytest.raises(LayoutError, match=r"\[Hu0\]"):
        SPIRIT_LM.check(tok)
    with pytest.raises(LayoutError, match="expected 2"):
        SLAM.check(sims_tokenizer(smollm2_path))
    custom = layout_from_config(
        {
            "unit_format": "<Un{}>",
            "n_units": 10,
            "speech_marker": "<speech>",
            "text_marker": "<text>",
        }
    )
    assert custom.check(tok).unit_id(9) == tok.convert_tokens_to_ids("<Un9>")
    with pytest.raises(LayoutError, match="unknown fields"):
        layout_from_config({"unit_format": "x{}", "n_units": 1, "colour": "red"})


def test_slam_layout_speech_only():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<PAD>": 0, "<S>": 1, **{f"<Un{i}>": i + 2 for i in range(500)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<PAD>")))
    layout = SLAM.check(tok)
    utt = _utt([("a", 0, 0.08)], [0, 499], [1, 1])
    assert build_sequence(utt, tok, layout, "speech").token_ids == [2, 501]
    with pytest.raises(LayoutError, match="no text vocabulary"):
        build_sequence(utt, tok, layout, "text")


def test_poisson_rule_is_seeded_and_alternates():
    rule = ModalityRule("poisson", mean_span=2.0, seed=3)
    a, b = rule.assign("u", 40), rule.assign("u", 40)
    assert a == b and {"text", "speech"} == set(a)
    assert ModalityRule("alternate", n=2).assign("u", 5) == [
        "text",
        "text",
        "speech",
        "speech",
        "text",
    ]


def test_control_words_come_from_other_utterances():
    corpus = [("u1", ["a", "b", "c"]), ("u2", ["x", "y"]), ("u3", ["p"])]
    sampler = ControlSampler(corpus, seed=1)
    for i in range(3):
        word = sampler.draw("u1", i)
        assert word in {"x", "y", "p"}
        assert sampler.draw("u1", i) == word  # deterministic


def test_too_long_sequence_is_refused(sims):
    tok, layout = sims
    utt = _utt(CAT, units=list(range(8)), durations=[2] * 8)
    with pytest.raises(SequenceTooLongError, match="context"):
        build_sequence(utt, tok, layout, "speech", max_positions=4)


def test_variants_never_include_unk():
    tok = spirit_tokenizer()  # word-level: "Cat" is not in its vocabulary
    ids = word_variants(tok, "cat")
    assert tok.unk_token_id not in ids and ids == [tok.convert_tokens_to_ids("cat")]
