"""Dataset manifests (JSONL / Parquet), TextGrid word tiers and forced alignment.

A manifest has one row per utterance: ``id`` (or ``utterance_id``), ``text``,
and any of ``audio`` (a path/URI, or the Hugging Face datasets shape
``{"bytes", "path"}``), ``words`` (a list of ``{"word", "start", "end"}`` or of
``[word, start, end]``, or the same as a JSON string), ``textgrid`` (a Praat
TextGrid with a word tier), ``units`` + ``durations`` (precomputed), and for
spoken-knowledge pairs ``pair_id``, ``pair_role``, ``continuation``. Relative
paths are relative to the manifest file (or part) that holds them. A bad row becomes
an error record that names the row; the good rows are still read. Finding and reading
the rows of one file, a folder or a glob of parts is :mod:`.dataset`'s job.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from analysis.storage import resolve

from .audio import SAMPLE_RATE
from .records import (
    AlignedWord,
    AudioSource,
    ManifestRowError,
    SpeechInputError,
    Utterance,
    WordTimingError,
)

#: Roles of a spoken-knowledge item's members: one correct, one or more counterfactuals.
PAIR_ROLES = ("correct", "counterfactual")


class ManifestError(ValueError):
    """The manifest as a whole cannot be read."""


@dataclass
class Manifest:
    uri: str
    utterances: list[Utterance]
    errors: list[SpeechInputError]


def _join(base: str, path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in base:
        return base.rstrip("/") + "/" + path
    return os.path.join(base, path)


def _parse_words(raw, utt_id: str) -> tuple[AlignedWord, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WordTimingError(utt_id, f"words column is not valid JSON: {exc}") from exc
    out = []
    for i, item in enumerate(raw):
        try:
            if isinstance(item, dict):
                word = item.get("word", item.get("text"))
                start = item.get("start_s", item.get("start"))
                end = item.get("end_s", item.get("end"))
            else:
                word, start, end = item
            out.append(AlignedWord(str(word), float(start), float(end)))
        except (TypeError, ValueError, KeyError) as exc:
            raise WordTimingError(utt_id, f"word {i} is malformed ({item!r})") from exc
    return tuple(out)


def read_textgrid(uri: str, utt_id: str, tier: str | None = None) -> tuple[AlignedWord, ...]:
    """Word intervals of a Praat TextGrid (tier ``words``, else the first interval tier)."""
    from praatio import textgrid

    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
        with tempfile.NamedTemporaryFile(suffix=".TextGrid") as tmp:
            tmp.write(data)
            tmp.flush()
            tg = textgrid.openTextgrid(tmp.name, includeEmptyIntervals=False)
    except Exception as exc:
        raise WordTimingError(utt_id, f"cannot read TextGrid {uri}: {exc}") from exc
    names = tg.tierNames
    # Montreal Forced Aligner names a speaker's tiers "<speaker> - words" / "- phones".
    name = tier or next(
        (n for n in names if n.lower() in ("words", "word") or n.lower().endswith(" - words")),
        None,
    )
    if name is None:
        interval = [n for n in names if tg.getTier(n).tierType == "IntervalTier"]
        if not interval:
            raise WordTimingError(utt_id, f"TextGrid {uri} has no interval tier")
        name = interval[0]
    entries = tg.getTier(name).entries
    return tuple(
        AlignedWord(e.label.strip(), float(e.start), float(e.end))
        for e in entries
        if e.label.strip() and e.label.strip().lower() not in ("sil", "sp", "<sil>", "spn")
    )


def _int_list(row: dict, name: str, utt_id: str) -> tuple[int, ...] | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ManifestRowError(utt_id, f"{name} must be a list of integers, got {value!r:.60}")
    return tuple(value)


def row_to_utterance(row: dict, base: str, index: int) -> Utterance:
    """One manifest row as an :class:`Utterance`; raises a :class:`SpeechInputError` naming it."""
    given = row.get("id", row.get("utterance_id"))
    utt_id = str(given) if given is not None and given != "" else f"row{index}"
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise ManifestRowError(utt_id, f"text must be a string, got {text!r:.60}")
    raw_words = row.get("words")
    if raw_words is not None and not isinstance(raw_words, str | list | tuple):
        raise ManifestRowError(utt_id, f"words must be a list (or its JSON), got {raw_words!r:.60}")
    duration = row.get("duration_s")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float)
    ):
        raise ManifestRowError(utt_id, f"duration_s must be a number, got {duration!r:.60}")
    audio = row.get("audio")
    source = None
    if isinstance(audio, dict):
        if audio.get("bytes"):
            source = AudioSource(path=audio.get("path"), data=bytes(audio["bytes"]))
        elif audio.get("path"):
            source = AudioSource(path=_join(base, audio["path"]))
    elif isinstance(audio, str) and audio:
        source = AudioSource(path=_join(base, audio))
    words = _parse_words(row.get("words"), utt_id)
    if words is None and row.get("textgrid"):
        words = read_textgrid(_join(base, row["textgrid"]), utt_id)
    if not text and words:
        text = " ".join(w.word for w in words)
    pair_id, pair_role = row.get("pair_id"), row.get("pair_role")
    if pair_role is not None and pair_role not in PAIR_ROLES:
        raise ManifestRowError(
            utt_id, f"pair_role must be one of {PAIR_ROLES}, got {pair_role!r:.60}"
        )
    if (pair_id is None) != (pair_role is None):
        raise ManifestRowError(utt_id, "pair_id and pair_role must be given together")
    units, durations = _int_list(row, "units", utt_id), _int_list(row, "durations", utt_id)
    if (units is None) != (durations is None):
        raise WordTimingError(utt_id, "units and durations must be given together")
    if units is not None and len(units) != len(durations):
        raise WordTimingError(utt_id, f"{len(units)} units but {len(durations)} durations")
    return Utterance(
        id=utt_id,
        text=str(text or ""),
        audio=source,
        words=words,
        units=units,
        durations=durations,
        duration_s=float(duration) if duration is not None else None,
        pair_id=None if pair_id is None else str(pair_id),
        pair_role=pair_role,
        continuation=row.get("continuation"),
    )


_VARIANT = re.compile(r"\(\d+\)$")
_NOT_WORDS = {"<s>", "</s>", "<sil>", "[noise]", "<unk>"}


def force_align(audio: np.ndarray, text: str, utt_id: str) -> tuple[AlignedWord, ...]:
    """Word timings by pocketsphinx forced alignment (offline; the ``align`` extra)."""
    try:
        from pocketsphinx import Decoder
    except ImportError as exc:
        raise WordTimingError(
            utt_id, "no word timings and pocketsphinx is not installed (pip install pocketsphinx)"
        ) from exc
    words = [w for w in re.sub(r"[^\w' ]+", " ", text.lower()).split() if w]
    if not words:
        raise WordTimingError(utt_id, "nothing to align: empty text")
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
    decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    frate = int(decoder.config["frate"])
    try:
        decoder.set_align_text(" ".join(words))
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        segs = [s for s in decoder.seg() if s.word.lower() not in _NOT_WORDS]
    except RuntimeError as exc:
        raise WordTimingError(utt_id, f"forced alignment failed: {exc}") from exc
    if len(segs) != len(words):
        raise WordTimingError(
            utt_id, f"forced alignment found {len(segs)} words, the text has {len(words)}"
        )
    return tuple(
        AlignedWord(_VARIANT.sub("", s.word), s.start_frame / frate, (s.end_frame + 1) / frate)
        for s in segs
    )
