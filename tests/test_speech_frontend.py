"""The speech front end on real human speech (LibriVox) and exact synthetic speech (espeak-ng)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from extractor.speech.dataset import read_manifest
from extractor.speech.frontend import SpeechFrontEnd
from extractor.speech.records import (
    AlignedWord,
    AudioReadError,
    EmptyAudioError,
    EmptyTextError,
    NonFiniteAudioError,
    WordTimingError,
)
from extractor.speech.synth import synthesize
from extractor.speech.units import (
    HubertKMeansTokenizer,
    convert_kmeans,
    hubert_frames,
    load_centroids,
    unit_spans,
)

from .speech_fixtures import LIBRIVOX, random_centroids, tiny_hubert


@pytest.fixture(scope="module")
def hubert_tokenizer():
    model = tiny_hubert()
    return HubertKMeansTokenizer(model, random_centroids(50, 32), layer=2)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _librivox_rows() -> list[dict]:
    rows = []
    for line in Path(LIBRIVOX, "transcription").read_text().splitlines():
        text, _, name = line.rpartition("(")
        text = text.replace("<s>", "").replace("</s>", "").strip()
        rows.append(
            {"id": name.strip(" )"), "audio": f"{LIBRIVOX}/{name.strip(' )')}.wav", "text": text}
        )
    return rows


@pytest.mark.slow
def test_librivox_through_alignment_and_hubert(tmp_path, hubert_tokenizer):
    manifest = read_manifest(_write_jsonl(tmp_path / "m.jsonl", _librivox_rows()))
    assert len(manifest.utterances) == 5 and not manifest.errors
    prepared = SpeechFrontEnd(hubert_tokenizer, batch_seconds=12).prepare(manifest.utterances)
    for utt in prepared:
        assert not isinstance(utt, Exception), utt
        n_samples = round(utt.duration_s * 16000)
        n_frames = sum(utt.durations)
        assert n_frames == hubert_frames(hubert_tokenizer.model, n_samples)
        assert abs(n_frames - utt.duration_s * 25) <= 2  # 25 Hz
        assert len(utt.words) == len(utt.text.split())
        for w in utt.words:
            assert 0 <= w.start_s < w.end_s <= utt.duration_s
        for span in unit_spans(utt.words, utt.durations):
            assert span is None or 0 <= span[0] < span[1] <= len(utt.units)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_units_never_depend_on_the_batch(norm):
    """Issue 13: a group-norm HuBERT (mHuBERT-25Hz's kind) agreed 22% batched vs alone."""
    import torch
    from transformers import HubertModel

    from extractor.speech.units import HubertKMeansTokenizer, small_hubert_config

    torch.manual_seed(0)
    config = small_hubert_config(hidden=32, layers=2, heads=2, conv=16)
    config.feat_extract_norm, config.do_stable_layer_norm = norm, norm == "layer"
    tok = HubertKMeansTokenizer(HubertModel(config).eval(), random_centroids(20, 32), layer=2)
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, n).astype(np.float32) for n in (8000, 16000, 23000)]
    assert tok(clips) == [tok([c])[0] for c in clips]
    assert tok(clips[::-1]) == [tok([c])[0] for c in clips[::-1]]


@pytest.mark.slow
def test_espeak_spans_match_exact_word_boundaries(tmp_path, hubert_tokenizer):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    audio, timings = synthesize(words)
    sf.write(tmp_path / "fox.wav", audio, 16000)
    rows = [
        {
            "id": "fox",
            "audio": "fox.wav",
            "text": " ".join(words),
            "words": [{"word": w.word, "start": w.start_s, "end": w.end_s} for w in timings],
        }
    ]
    manifest = read_manifest(_write_jsonl(tmp_path / "m.jsonl", rows))
    (utt,) = SpeechFrontEnd(hubert_tokenizer).prepare(manifest.utterances)
    assert utt.words == timings
    n_frames = sum(utt.durations)
    # Frame-level spans (before dedup) land within one 40 ms frame of the true boundaries.
    for w, span in zip(timings, unit_spans(timings, [1] * n_frames), strict=True):
        assert abs(span[0] * 0.04 - w.start_s) <= 0.04
        assert abs(span[1] * 0.04 - w.end_s) <= 0.04
    # After dedup a word may sit inside one long run (then it owns no unit and is
    # recorded as such); a word that owns units owns runs that overlap it.
    ends = np.cumsum(utt.durations) * 0.04
    for w, span in zip(timings, unit_spans(timings, utt.durations), strict=True):
        if span is None:
            continue
        start = ends[span[0] - 1] if span[0] else 0.0
        assert start <= w.start_s + 1e-9 and ends[span[1] - 1] <= w.end_s + 1e-9


def test_manifest_shapes_parquet_bytes_textgrid_and_units(tmp_path):
    audio = np.sin(np.linspace(0, 300, 16000)).astype(np.float32) * 0.3
    sf.write(tmp_path / "a.wav", audio, 16000)
    wav_bytes = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "a.TextGrid").write_text(
        'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\n'
        "tiers? <exists>\nsize = 1\nitem []:\n    item [1]:\n"
        '        class = "IntervalTier"\n        name = "words"\n        xmin = 0\n'
        "        xmax = 1\n        intervals: size = 3\n"
        "        intervals [1]:\n            xmin = 0\n            xmax = 0.3\n"
        '            text = "hello"\n'
        "        intervals [2]:\n            xmin = 0.3\n            xmax = 0.5\n"
        '            text = ""\n'
        "        intervals [3]:\n            xmin = 0.5\n            xmax = 0.9\n"
        '            text = "world"\n'
    )
    table = pa.table(
        {
            "id": ["embedded", "textgrid", "units"],
            "text": ["hello world", "hello world", "hello world"],
            "audio": [
                {"bytes": wav_bytes, "path": "a.wav"},
                {"bytes": None, "path": "a.wav"},
                {"bytes": None, "path": None},
            ],
            "words": [
                json.dumps([["hello", 0, 0.3], ["world", 0.5, 0.9]]),
                None,
                json.dumps([["hello", 0, 0.3], ["world", 0.5, 0.9]]),
            ],
            "textgrid": [None, "a.TextGrid", None],
            "units": [None, None, [1, 2, 3]],
            "durations": [None, None, [10, 5, 10]],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    manifest = read_manifest(str(tmp_path / "m.parquet"))
    assert not manifest.errors
    by_id = {u.id: u for u in manifest.utterances}
    assert by_id["embedded"].audio.data == wav_bytes
    assert [w.word for w in by_id["textgrid"].words] == ["hello", "world"]
    assert by_id["textgrid"].words[1] == AlignedWord("world", 0.5, 0.9)
    assert by_id["units"].units == (1, 2, 3)
    ready = SpeechFrontEnd(None).prepare([by_id["units"]])
    assert ready[0].duration_s == pytest.approx(1.0)


def test_manifest_from_object_storage(tmp_path, s3_env):
    from analysis.storage import s3_filesystem

    fs = s3_filesystem()
    audio = (np.random.default_rng(0).normal(0, 0.1, 8000)).astype(np.float32)
    sf.write(tmp_path / "x.wav", audio, 16000)
    with fs.open_output_stream(f"{s3_env}/data/x.wav") as f:
        f.write((tmp_path / "x.wav").read_bytes())
    with fs.open_output_stream(f"{s3_env}/data/m.jsonl") as f:
        f.write(
            json.dumps(
                {"id": "x", "audio": "x.wav", "text": "hi", "words": [["hi", 0.1, 0.3]]}
            ).encode()
        )
    manifest = read_manifest(f"s3://{s3_env}/data/m.jsonl")
    (utt,) = manifest.utterances
    assert utt.audio.path == f"s3://{s3_env}/data/x.wav"
    from extractor.speech.audio import load_audio

    assert len(load_audio(utt.audio, utt.id)) == 8000


def test_every_bad_input_is_named_and_the_rest_goes_on(tmp_path, hubert_tokenizer):
    good = np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)
    sf.write(tmp_path / "good.wav", good, 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    nan = good.copy()
    nan[8000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(tmp_path / "stereo48k.wav", np.stack([good[:8000]] * 2, 1), 48000)
    w = [{"word": "a", "start": 0.1, "end": 0.3}]
    rows = [
        {"id": "good", "audio": "good.wav", "text": "a", "words": w},
        {"id": "corrupt", "audio": "corrupt.wav", "text": "a", "words": w},
        {"id": "missing", "audio": "nowhere.wav", "text": "a", "words": w},
        {"id": "empty", "audio": "empty.wav", "text": "a", "words": w},
        {"id": "nan", "audio": "nan.wav", "text": "a", "words": w},
        {"id": "late", "audio": "good.wav", "text": "a", "words": [["a", 0.5, 1.3]]},
        {
            "id": "order",
            "audio": "good.wav",
            "text": "a b",
            "words": [["a", 0.5, 0.6], ["b", 0.1, 0.2]],
        },
        {"id": "notext", "audio": "good.wav", "text": ""},
        {"id": "stereo", "audio": "stereo48k.wav", "text": "a", "words": [["a", 0.0, 0.1]]},
    ]
    path = tmp_path / "m.jsonl"
    _write_jsonl(path, rows)
    with path.open("a") as f:
        f.write("{not json\n")
    manifest = read_manifest(str(path))
    assert [e.utterance_id for e in manifest.errors] == ["line10"]
    out = {
        u.id if not isinstance(u, Exception) else u.utterance_id: u
        for u in SpeechFrontEnd(hubert_tokenizer).prepare(manifest.utterances)
    }
    assert out["good"].units and out["stereo"].duration_s == pytest.approx(1 / 6, abs=1e-3)
    expected = {
        "corrupt": AudioReadError,
        "missing": AudioReadError,
        "empty": EmptyAudioError,
        "nan": NonFiniteAudioError,
        "late": WordTimingError,
        "order": WordTimingError,
        "notext": EmptyTextError,
    }
    for utt_id, error in expected.items():
        assert isinstance(out[utt_id], error), (utt_id, out[utt_id])
        assert utt_id in str(out[utt_id])
    assert "past the end" in str(out["late"]) and "out of order" in str(out["order"])
    assert "0.500 s" in str(out["nan"])


class FakeKMeans:
    """What sklearn's KMeans pickles to, as far as slm-lens reads it (no sklearn needed)."""

    def __init__(self) -> None:
        self.cluster_centers_ = random_centroids(7, 4)


def test_convert_kmeans_needs_the_flag(tmp_path):
    import joblib

    joblib.dump(FakeKMeans(), tmp_path / "km.pkl")
    with pytest.raises(PermissionError, match="allow_pickle"):
        convert_kmeans(tmp_path / "km.pkl", tmp_path / "km.npy")
    convert_kmeans(tmp_path / "km.pkl", tmp_path / "km.npy", allow_pickle=True)
    np.testing.assert_array_equal(
        load_centroids(tmp_path / "km.npy"), FakeKMeans().cluster_centers_
    )


def test_convert_kmeans_command(tmp_path, capsys):
    import joblib

    from extractor.cli import main

    joblib.dump(FakeKMeans(), tmp_path / "km.bin")
    assert main(["convert-kmeans", str(tmp_path / "km.bin"), str(tmp_path / "c.npy")]) == 2
    assert "allow_pickle" in capsys.readouterr().err and not (tmp_path / "c.npy").exists()
    args = ["convert-kmeans", str(tmp_path / "km.bin"), str(tmp_path / "c.npy"), "--allow-pickle"]
    assert main(args) == 0
    assert load_centroids(tmp_path / "c.npy").shape == (7, 4)


def test_malformed_manifest_rows_become_named_failures_and_good_rows_run(tmp_path):
    """Issue 11, item 8: none of these may abort the manifest; each names its row."""
    from extractor.speech.dataset import read_manifest
    from extractor.speech.records import ManifestRowError

    lines = [
        '{"id": "good", "text": "hello", "units": [1, 2], "durations": [2, 2]}',
        '["a", "list"]',
        '"a string"',
        '{"id": "u1", "text": "x", "units": ["x"], "durations": [1]}',
        '{"id": "u2", "text": "x", "units": 5, "durations": 5}',
        '{"id": "u3", "text": "x", "duration_s": "long"}',
        '{"id": "u4", "text": "x", "words": 7}',
        '{"id": "u5", "text": 12}',
        '{"id": 0, "text": "an id of zero is an id"}',
        "{not json",
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    manifest = read_manifest(str(path))
    assert [u.id for u in manifest.utterances] == ["good", "0"]
    errors = {str(e) for e in manifest.errors}
    assert len(manifest.errors) == 8
    assert all(isinstance(e, ManifestRowError) for e in manifest.errors)
    for row, what in [
        (2, "is a list"),
        (3, "is a str"),
        (4, "units must be a list of integers"),
        (5, "units must be a list of integers"),
        (6, "duration_s must be a number"),
        (7, "words must be a list"),
        (8, "text must be a string"),
    ]:
        assert any(f"manifest row {row}" in e and what in e for e in errors), (row, errors)
    assert any("line 10" in e for e in errors)
