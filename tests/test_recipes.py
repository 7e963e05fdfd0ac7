"""`slm-lens data`: benchmark layouts (small stand-ins written as released) to manifests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from extractor.cli import main
from extractor.speech.dataset import read_manifest
from extractor.speech.recipes import RecipeError, make_manifest

RATE = 16_000


def _wav(path: Path, seconds: float, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE, format=fmt)


def _gold(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "gold.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _textgrid(path: Path, words: list[tuple[str, float, float]], end: float) -> None:
    from praatio import textgrid

    path.parent.mkdir(parents=True, exist_ok=True)
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("words", [(s, e, w) for w, s, e in words], 0, end))
    tg.addTier(textgrid.IntervalTier("phones", [], 0, end))
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def swuggy_standin(root: Path) -> Path:
    """lexical/dev as ZeroSpeech 2021 ships it: random wav names, gold.csv beside them.

    Item 1 in two voices, item 2 with a non-word spelled only by its phones, item 3 with
    no non-word, item 4 with a wav missing.
    """
    dev = root / "lexical" / "dev"
    gold = []
    spec = [
        ("1", "Alex", "brick", "1", 0.5),
        ("1", "Alex", "blick", "0", 0.6),
        ("1", "Beth", "brick", "1", 0.45),
        ("1", "Beth", "blick", "0", 0.55),
        ("2", "Alex", "dog", "1", 0.4),
        ("2", "Alex", "", "0", 0.4),
        ("3", "Alex", "cat", "1", 0.4),
        ("4", "Alex", "sun", "1", 0.4),
        ("4", "Alex", "zun", "0", 0.4),
    ]
    for n, (item, voice, word, correct, seconds) in enumerate(spec):
        name = f"aQ{n:03d}xZ"
        if item != "4" or correct == "1":
            _wav(dev / f"{name}.wav", seconds)
        gold.append(
            {
                "filename": name,
                "id": item,
                "voice": voice,
                "frequency": "oov",
                "word": word,
                "phones": "d ao g" if word == "dog" else "z ao g",
                "length": "3",
                "correct": correct,
            }
        )
    _gold(dev, gold)
    return dev


def test_swuggy_pairs_by_item_and_voice_and_counts_what_it_leaves_out(tmp_path, capsys):
    dev = swuggy_standin(tmp_path)
    out = tmp_path / "swuggy.parquet"
    assert main(["data", "swuggy", str(dev), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 utterances" in printed and "(3 spoken-knowledge items)" in printed
    assert "left out 1: items with no counterfactual side" in printed
    assert "left out 1: items with a missing wav" in printed

    manifest = read_manifest(str(out))
    utts = {u.id: u for u in manifest.utterances}
    assert len(utts) == 6 and not manifest.errors
    first = utts["aQ000xZ"]
    assert (first.pair_id, first.pair_role, first.continuation) == (
        "swuggy/1/Alex",
        "correct",
        "brick",
    )
    assert first.words[0].word == "brick" and first.words[0].start_s == 0.0
    assert first.words[0].end_s == pytest.approx(0.5, abs=1e-4)  # the whole clip is the word
    assert utts["aQ001xZ"].pair_role == "counterfactual"
    assert utts["aQ002xZ"].pair_id == "swuggy/1/Beth"
    assert utts["aQ005xZ"].text == "zaog"  # a non-word without a spelling: its phones


def test_sblimp_pairs_by_key_not_row_order_and_reads_textgrids(tmp_path):
    dev = tmp_path / "syntactic" / "dev"
    sentences = [
        ("1", "Alex", "the dogs bark", "1"),
        ("2", "Alex", "a cat sleeps", "1"),
        ("1", "Alex", "the dogs barks", "0"),  # rows interleaved: position pairing would fail
        ("2", "Alex", "a cat sleep", "0"),
    ]
    gold = []
    for n, (item, voice, text, correct) in enumerate(sentences):
        name = f"s{n}"
        _wav(dev / f"{name}.wav", 1.0)
        gold.append(
            {
                "filename": name,
                "id": item,
                "voice": voice,
                "type": "agreement",
                "subtype": "plural",
                "correct": correct,
                "transcription": text,
            }
        )
    _gold(dev, gold)
    grids = tmp_path / "mfa"
    _textgrid(
        grids / "s0.TextGrid", [("the", 0.1, 0.2), ("dogs", 0.2, 0.5), ("bark", 0.5, 0.9)], 1.0
    )

    out = tmp_path / "sblimp.parquet"
    result = make_manifest("sblimp", dev, out, grids)
    assert "3 utterance(s) have no TextGrid" in result.describe(out)
    utts = {u.id: u for u in read_manifest(str(out)).utterances}
    assert utts["s0"].pair_id == utts["s2"].pair_id == "sblimp/agreement/plural/1/Alex"
    assert (utts["s0"].pair_role, utts["s2"].pair_role) == ("correct", "counterfactual")
    assert utts["s3"].continuation == "a cat sleep"
    assert [w.word for w in utts["s0"].words] == ["the", "dogs", "bark"]
    assert utts["s1"].words is None  # aligned by pocketsphinx at run time


def test_librispeech_with_mfa_textgrids(tmp_path):
    split = tmp_path / "LibriSpeech" / "test-clean"
    chapter = split / "121" / "121726"
    lines = [
        "121-121726-0000 ALSO A POPULAR CONTRIVANCE",
        "121-121726-0001 HARANGUE",
        "121-121726-0002 MISSING AUDIO",
    ]
    (chapter).mkdir(parents=True)
    (chapter / "121-121726.trans.txt").write_text("\n".join(lines) + "\n")
    _wav(chapter / "121-121726-0000.flac", 1.2, "FLAC")
    _wav(chapter / "121-121726-0001.flac", 0.6, "FLAC")
    # MFA mirrors the corpus folders under its output, as the published alignments do.
    aligned = tmp_path / "alignments" / "test-clean" / "121" / "121726" / "121-121726-0000.TextGrid"
    words = [("also", 0.05, 0.3), ("a", 0.3, 0.4), ("popular", 0.4, 0.8), ("contrivance", 0.8, 1.1)]
    _textgrid(aligned, words, 1.2)

    out = tmp_path / "libri.parquet"
    assert (
        main(
            [
                "data",
                "librispeech",
                str(split),
                str(out),
                "--alignments",
                str(tmp_path / "alignments"),
            ]
        )
        == 0
    )
    utts = {u.id: u for u in read_manifest(str(out)).utterances}
    assert set(utts) == {"121-121726-0000", "121-121726-0001"}
    assert utts["121-121726-0000"].text == "also a popular contrivance"
    assert [w.word for w in utts["121-121726-0000"].words] == [
        "also",
        "a",
        "popular",
        "contrivance",
    ]
    assert utts["121-121726-0001"].words is None and utts["121-121726-0001"].pair_id is None


def test_a_folder_in_another_layout_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"no gold\.csv"):
        make_manifest("swuggy", tmp_path / "empty", tmp_path / "x.parquet")
    assert main(["data", "librispeech", str(tmp_path / "empty"), str(tmp_path / "x.parquet")]) == 2
    assert "no *.trans.txt" in capsys.readouterr().err
    _gold(tmp_path / "bad", [{"filename": "a", "id": "1"}])
    with pytest.raises(RecipeError, match=r"lacks column\(s\) \['voice', 'correct'\]"):
        make_manifest("swuggy", tmp_path / "bad", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.slow
def test_swuggy_standin_end_to_end_gives_knowledge_accuracy(tmp_path):
    """Real espeak-ng words and non-words in the released layout, through the real service."""
    from analysis import metrics
    from analysis.store import open_store
    from extractor.config import parse_config
    from extractor.service.driver import run_extraction
    from extractor.speech.synth import Voice, espeak_word
    from tests.service_helpers import small_config

    dev = tmp_path / "lexical" / "dev"
    items = [("brick", "blick"), ("table", "tabre"), ("water", "wotter")]
    gold = []
    for i, (word, nonword) in enumerate(items):
        for voice in ("en-us", "en-gb"):
            for label, correct in ((word, "1"), (nonword, "0")):
                name = f"{label}{voice[-2:]}{i}"
                dev.mkdir(parents=True, exist_ok=True)
                sf.write(dev / f"{name}.wav", espeak_word(label, Voice(voice)), RATE)
                gold.append(
                    {
                        "filename": name,
                        "id": str(i),
                        "voice": voice,
                        "word": label,
                        "phones": "",
                        "correct": correct,
                    }
                )
    _gold(dev, gold)
    manifest = tmp_path / "swuggy.parquet"
    make_manifest("swuggy", dev, manifest)

    store = str(tmp_path / "store")
    raw = small_config(store, tmp_path / "demo-data", shard_size=4)
    raw["dataset"] = {"manifest": str(manifest), "name": "swuggy-standin"}
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok, summary.describe()
    acc = metrics.knowledge_accuracy(open_store(store))
    assert acc["n_pairs"].tolist() == [6] and acc["n_pairs_dropped"].tolist() == [0]
    assert 0.0 <= acc["accuracy"].iloc[0] <= 1.0
    utts = open_store(store).sql("SELECT pair_id, pair_role FROM utterances").fetchall()
    assert len(utts) == 12 and json.dumps(sorted(utts))


def test_storycloze_pairs_by_story_and_scores_each_clip_whole(tmp_path, capsys):
    folder = tmp_path / "sSC"
    for name in (
        "0_abc_correct",
        "1_abc_incorrect",
        "2_def_correct",
        "3_g_h_correct",
        "4_g_h_incorrect",
        "5_g_h_incorrect",
        "notes",
    ):
        _wav(folder / f"{name}.wav", 0.7)
    out = tmp_path / "ssc.parquet"
    assert main(["data", "storycloze", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 utterances" in printed and "(2 spoken-knowledge items)" in printed
    assert "left out 1: items with no counterfactual side" in printed
    assert "left out 1: wavs not named <n>_<story>_correct|incorrect.wav" in printed
    utts = {u.id: u for u in read_manifest(str(out)).utterances}
    assert utts["3_g_h_correct"].pair_id == utts["5_g_h_incorrect"].pair_id == "storycloze/g_h"
    whole = utts["0_abc_correct"]
    assert [(w.word, w.start_s) for w in whole.words] == [("…", 0.0)]
    assert whole.words[0].end_s == pytest.approx(0.7, abs=1e-4) and whole.continuation == "…"


@pytest.mark.slow
def test_storycloze_standin_end_to_end_scores_whole_clips(tmp_path):
    from analysis import metrics
    from analysis.store import open_store
    from extractor.config import parse_config
    from extractor.service.driver import run_extraction
    from extractor.speech.synth import synthesize
    from tests.service_helpers import small_config

    folder = tmp_path / "sSC"
    folder.mkdir()
    stories = [
        ("cat", "the cat sat on the mat", "and slept", "and flew"),
        ("sun", "the sun rose in the east", "and shone", "and sang"),
    ]
    for n, (story, prefix, right, wrong) in enumerate(stories):
        for role, ending in (("correct", right), ("incorrect", wrong)):
            audio, _ = synthesize(f"{prefix} {ending}".split())
            sf.write(folder / f"{2 * n + (role == 'incorrect')}_{story}_{role}.wav", audio, RATE)
    manifest = tmp_path / "ssc.parquet"
    make_manifest("storycloze", folder, manifest)
    store = str(tmp_path / "store")
    raw = small_config(store, tmp_path / "demo-data", shard_size=2)
    raw["dataset"] = {"manifest": str(manifest), "name": "ssc-standin"}
    summary = run_extraction(parse_config(raw), in_process=True, progress=False)
    assert summary.ok, summary.describe()
    con = open_store(store)
    acc = metrics.knowledge_accuracy(con)
    assert acc["n_pairs"].tolist() == [2] and acc["n_pairs_dropped"].tolist() == [0]
    # The whole-clip span has no text token: it is in `words`, never in recall.
    assert con.sql("SELECT DISTINCT word, len(variant_ids) FROM words").fetchall() == [("…", 0)]
    assert metrics.recall_by_layer(con, 10).empty


def test_odd_but_real_inputs(tmp_path, monkeypatch):
    """A relative SOURCE, a BOM, a file listed twice, a tab after the id, MFA's per-speaker
    tier names, a folder given as OUT."""
    dev = swuggy_standin(tmp_path)
    gold = (dev / "gold.csv").read_text()
    (dev / "gold.csv").write_text("\ufeff" + gold)  # Excel writes a BOM
    monkeypatch.chdir(tmp_path)
    make_manifest("swuggy", Path("lexical/dev"), Path("out/m.parquet"))
    utts = read_manifest(str(tmp_path / "out" / "m.parquet")).utterances
    assert len(utts) == 6 and all(Path(u.audio.path).is_file() for u in utts)

    lines = gold.splitlines()
    (dev / "gold.csv").write_text("\n".join([*lines, lines[1]]) + "\n")  # aQ000xZ twice
    result = make_manifest("swuggy", dev, tmp_path / "m2.parquet")
    assert result.dropped["items with a file listed twice in the gold file"] == 1

    chapter = tmp_path / "libri" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000\tHELLO WORLD\n")
    _wav(chapter / "1-2-0000.flac", 1.0, "FLAC")
    grid = tmp_path / "mfa" / "1" / "2" / "1-2-0000.TextGrid"
    from praatio import textgrid

    grid.parent.mkdir(parents=True)
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("1 - phones", [(0.1, 0.2, "HH"), (0.2, 0.3, "AH")], 0, 1))
    tg.addTier(textgrid.IntervalTier("1 - words", [(0.1, 0.5, "hello"), (0.5, 0.9, "world")], 0, 1))
    tg.save(str(grid), format="long_textgrid", includeBlankSpaces=True)
    make_manifest("librispeech", tmp_path / "libri", tmp_path / "l.parquet", tmp_path / "mfa")
    (utt,) = read_manifest(str(tmp_path / "l.parquet")).utterances
    assert utt.text == "hello world" and [w.word for w in utt.words] == ["hello", "world"]

    with pytest.raises(RecipeError, match="is a folder"):
        make_manifest("swuggy", dev, tmp_path / "out")
