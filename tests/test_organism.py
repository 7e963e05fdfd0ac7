"""The model organism: a tiny version trains in well under a minute and runs through slm-lens."""

from __future__ import annotations

import json

import pytest

from extractor.organism.grammar import Grammar, vocabulary
from extractor.organism.study import summarize
from extractor.organism.train import OrganismSpec, build_tokenizer, train_organism
from extractor.speech.fbank import FbankKMeansTokenizer, log_mel
from extractor.speech.synth import synthesize

pytestmark = pytest.mark.slow


def test_grammar_is_seeded_and_within_the_vocabulary():
    a, b = Grammar(3), Grammar(3)
    sentences = [a.sentence() for _ in range(50)]
    assert sentences == [b.sentence() for _ in range(50)]
    vocab = set(vocabulary())
    assert all(5 <= len(s) <= 14 and set(s) <= vocab for s in sentences)


def test_acoustic_tokenizer_frames_at_25_hz(tmp_path):
    audio, _ = synthesize(["the", "cat", "sat", "on", "the", "mat"])
    assert len(log_mel(audio)) == len(audio) // 640
    tok = FbankKMeansTokenizer.fit([audio], 20)
    tok.save(tmp_path / "a.npz")
    again = FbankKMeansTokenizer.load(tmp_path / "a.npz")
    (seq,) = again([audio])
    assert seq.n_frames == len(audio) // 640 == sum(seq.durations)
    assert max(seq.units) < 20


def test_tokenizer_has_the_sims_layout():
    from extractor.speech.layouts import layout_from_config

    tok = build_tokenizer(["cat", "dog"], 7)
    layout = layout_from_config(
        {
            "unit_format": "<Un{}>",
            "n_units": 7,
            "speech_marker": "<speech>",
            "text_marker": "<text>",
        }
    )
    resolved = layout.check(tok)
    assert resolved.unit_id(0) == 6 and resolved.speech_marker_id == 13


def test_a_tiny_organism_trains_and_goes_through_the_pipeline(tmp_path):
    from extractor.organism.evaluate import evaluate

    spec = OrganismSpec(
        steps=24,
        layers=2,
        hidden=64,
        heads=2,
        context=64,
        batch=4,
        speech_pool=60,
        renderings=2,
        n_units=40,
    )
    model = train_organism(tmp_path / "organism", spec, log=lambda *_: None)
    info = json.loads((model / "organism.json").read_text())
    assert info["steps"] == 24 and info["tokens"] == 24 * 4 * 64
    # Every sequence starts with <s> at analysis time, as every packed one did in training.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer("cat").input_ids[0] == tokenizer.bos_token_id
    curves = evaluate(model, tmp_path / "heldout", str(tmp_path / "store"), "tiny", n_sentences=6)
    assert set(curves.target) == {"cur", "next"} and curves.n_words.min() > 10
    summary = summarize(curves.assign(variant="interleaved", seed=0))
    assert len(summary) == 6 and summary.cur_recall.between(0, 1).all()

    # The README's main job on this organism: the demo command, end to end.
    from extractor.cli import main

    store = tmp_path / "demo" / "store"
    assert main(["demo", "--organism", str(model), "--store", str(store), "--in-process"]) == 0


def test_held_out_sentences_are_remade_when_their_recipe_changes(tmp_path):
    """An older folder (other voices, another count) is regenerated, never reused."""
    from extractor.organism.evaluate import heldout_manifest

    (tmp_path / "manifest.jsonl").write_text('{"id": "stale", "text": "a"}\n')
    manifest = heldout_manifest(tmp_path, 2)
    assert [json.loads(line)["id"] for line in manifest.read_text().splitlines()] == [
        "heldout-0000",
        "heldout-0001",
    ]
    made = manifest.stat().st_mtime_ns
    assert heldout_manifest(tmp_path, 2).stat().st_mtime_ns == made  # same recipe: reused
    assert len(heldout_manifest(tmp_path, 3).read_text().splitlines()) == 3
