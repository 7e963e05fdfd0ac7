"""Benchmark data as manifests: read a benchmark's released on-disk layout, write Parquet.

``slm-lens data NAME SOURCE OUT`` (docs/manifests.md, "Benchmark recipes"):

* ``swuggy``, ``sblimp``: a ZeroSpeech 2021 ``lexical/<split>`` or ``syntactic/<split>``
  folder, its wavs (``<filename>.wav``) beside ``gold.csv``. Every (item, voice) becomes a
  spoken-knowledge item: the ``correct == 1`` file against the ``correct == 0`` file(s).
  sWUGGY pairs on (``id``, ``voice``); sBLIMP on (``type``, ``subtype``, ``id``, ``voice``),
  by key, never by row order.
* ``storycloze``: spoken or topic StoryCloze as slamkit reads it: a flat folder of
  ``<n>_<story>_correct.wav`` and ``<n>_<story>_incorrect.wav``. The audio ships without
  transcripts, so each clip is scored whole (as slamkit does): the prefix is the same
  audio in both members, so a causal LM's likelihoods differ by the ending.
* ``librispeech``: a LibriSpeech-style folder (``<speaker>/<chapter>/<utt>.flac`` beside
  ``<speaker>-<chapter>.trans.txt``), with word timings from Montreal Forced Aligner
  TextGrids (``--alignments``: any folder holding ``<utt>.TextGrid`` files, as MFA or the
  published LibriSpeech alignments lay them out), else from pocketsphinx at run time.

Items that cannot be used (a missing side, a missing wav, a repeated role) are left out
and counted by reason, never dropped silently. Pure reading and writing: no model.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: The manifest columns a recipe writes (docs/manifests.md, "Rows").
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("audio", pa.string()),
        ("text", pa.string()),
        ("words", pa.string()),  # JSON [[word, start, end], ...]
        ("textgrid", pa.string()),
        ("duration_s", pa.float64()),
        ("pair_id", pa.string()),
        ("pair_role", pa.string()),
        ("continuation", pa.string()),
    ]
)


class RecipeError(ValueError):
    """A source folder that is not in the layout the recipe reads."""


@dataclass
class RecipeResult:
    """Manifest rows, and what was left out (reason -> count) or is worth knowing."""

    rows: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def describe(self, out: Path) -> str:
        pairs = len({r["pair_id"] for r in self.rows if r.get("pair_id")})
        lines = [f"wrote {len(self.rows):,} utterances to {out}"]
        if pairs:
            lines[0] += f" ({pairs:,} spoken-knowledge items)"
        lines += [f"left out {n:,}: {why}" for why, n in sorted(self.dropped.items())]
        return "\n".join(lines + self.notes)


def _read_gold(source: Path, required: tuple[str, ...]) -> list[dict]:
    gold = source / "gold.csv"
    if not gold.is_file():
        raise RecipeError(
            f"no gold.csv in {source}: point at a ZeroSpeech 2021 set folder "
            "(lexical/dev, syntactic/dev, ...) holding gold.csv beside its wavs"
        )
    try:
        with gold.open(newline="", encoding="utf-8-sig") as f:  # a BOM is not a column name
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise RecipeError(f"{gold} lacks column(s) {missing} (has {reader.fieldnames})")
            return list(reader)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{gold} is not UTF-8 text ({exc})") from exc


def _one_span_row(uid: str, wav: Path, label: str) -> dict:
    """A clip whose one word spans all of it (a sWUGGY word, a StoryCloze clip scored whole)."""
    duration = _duration(wav)
    return {
        "id": uid,
        "audio": str(wav),
        "text": label,
        "words": json.dumps([[label, 0.0, round(duration, 5)]]),
        "duration_s": duration,
    }


def _duration(path: Path) -> float:
    """Seconds of an audio file, from its header only."""
    import soundfile as sf

    return float(sf.info(str(path)).duration)


def _paired(
    gold: list[dict],
    source: Path,
    key: Callable[[dict], tuple],
    prefix: str,
    row_of: Callable[[dict, Path], dict],
) -> RecipeResult:
    """One manifest row per file of every usable item: exactly one ``correct == 1`` file,
    at least one ``correct == 0``, every wav present."""
    result = RecipeResult()
    items: dict[tuple, list[dict]] = defaultdict(list)
    for g in gold:
        items[key(g)].append(g)
    uses = Counter(g["filename"] for g in gold)
    for item_key, members in items.items():
        if any(uses[m["filename"]] > 1 for m in members):
            result.dropped["items with a file listed twice in the gold file"] += 1
            continue
        roles = Counter(str(m["correct"]).strip() for m in members)
        wavs = [source / f"{m['filename']}.wav" for m in members]
        if roles["1"] != 1 or roles["0"] < 1 or roles["1"] + roles["0"] != len(members):
            why = "no correct side" if roles["1"] == 0 else "no counterfactual side"
            if roles["1"] > 1:
                why = "several correct sides"
            elif roles["1"] + roles["0"] != len(members):
                why = "a `correct` value other than 0 or 1"
            result.dropped[f"items with {why}"] += 1
            continue
        if not all(w.is_file() for w in wavs):
            result.dropped["items with a missing wav"] += 1
            continue
        pair_id = "/".join([prefix, *map(str, item_key)])
        for member, wav in zip(members, wavs, strict=True):
            role = "correct" if str(member["correct"]).strip() == "1" else "counterfactual"
            row = row_of(member, wav)
            result.rows.append(
                {**row, "pair_id": pair_id, "pair_role": role, "continuation": row["text"]}
            )
    return result


def swuggy(source: Path, alignments: Path | None = None) -> RecipeResult:
    """sWUGGY: a word against a non-word, one clip each, the whole clip scored.

    A clip is one word, so its timing is the clip ([0, duration]) and no aligner runs. A
    non-word without a spelling (``word`` empty) is labelled by its ``phones``, joined.
    """
    if alignments is not None:
        raise RecipeError("swuggy clips are single words: --alignments does not apply")
    gold = _read_gold(source, ("filename", "id", "voice", "correct"))

    def row_of(g: dict, wav: Path) -> dict:
        label = (g.get("word") or "").strip() or "".join((g.get("phones") or "").split())
        return _one_span_row(g["filename"], wav, label)

    return _paired(gold, source, lambda g: (g["id"], g["voice"]), "swuggy", row_of)


def sblimp(source: Path, alignments: Path | None = None) -> RecipeResult:
    """sBLIMP: a grammatical sentence against its ungrammatical twin, whole sentences scored.

    Word timings from ``<alignments>/<filename>.TextGrid`` when given (any depth), else
    pocketsphinx aligns each sentence at run time.
    """
    gold = _read_gold(
        source, ("filename", "id", "voice", "type", "subtype", "correct", "transcription")
    )
    grids = _textgrids(alignments)

    def row_of(g: dict, wav: Path) -> dict:
        grid = grids.get(g["filename"])
        return {
            "id": g["filename"],
            "audio": str(wav),
            "text": g["transcription"].strip(),
            "textgrid": None if grid is None else str(grid),
        }

    result = _paired(
        gold, source, lambda g: (g["type"], g["subtype"], g["id"], g["voice"]), "sblimp", row_of
    )
    _note_alignments(result, alignments)
    return result


#: A StoryCloze clip: ``<n>_<story id>_correct.wav`` / ``..._incorrect.wav``.
_CLOZE_WAV = re.compile(r"^(\d+)_(.+)_(correct|incorrect)$")
#: The label of a clip scored whole: it cleans to no word, so it has no text token and
#: adds nothing to recall (docs/metrics.md counts only words with a variant).
WHOLE_CLIP = "…"


def storycloze(source: Path, alignments: Path | None = None) -> RecipeResult:
    """Spoken/topic StoryCloze: the story with its right ending against a wrong one.

    Items pair by story id; each clip is one span over its whole length (label ``…``),
    and the whole clip is the continuation, since no transcript ships with the audio.
    """
    if alignments is not None:
        raise RecipeError("storycloze ships no transcripts to align: --alignments does not apply")
    wavs = sorted(source.glob("*.wav"))
    if not wavs:
        raise RecipeError(f"no *.wav in {source}: point at the sSC or tSC folder")
    gold, misnamed = [], 0
    for wav in wavs:
        match = _CLOZE_WAV.match(wav.stem)
        if match is None:
            misnamed += 1
            continue
        gold.append(
            {
                "filename": wav.stem,
                "story": match.group(2),
                "correct": "1" if match.group(3) == "correct" else "0",
            }
        )
    paired = _paired(
        gold,
        source,
        lambda g: (g["story"],),
        "storycloze",
        lambda g, wav: _one_span_row(g["filename"], wav, WHOLE_CLIP),
    )
    if misnamed:
        paired.dropped["wavs not named <n>_<story>_correct|incorrect.wav"] += misnamed
    return paired


def librispeech(source: Path, alignments: Path | None = None) -> RecipeResult:
    """LibriSpeech-style read speech: ``*.trans.txt`` lines (``<utt> TRANSCRIPT``) beside
    ``<utt>.flac`` (or ``.wav``); transcripts lower-cased (LibriSpeech's are upper case)."""
    transcripts = sorted(source.rglob("*.trans.txt"))
    if not transcripts:
        raise RecipeError(
            f"no *.trans.txt under {source}: point at a LibriSpeech split "
            "(<speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside the .flac files)"
        )
    grids = _textgrids(alignments)
    result = RecipeResult()
    for trans in transcripts:
        for line in trans.read_text().splitlines():
            uid, text = ([*line.split(None, 1), ""])[:2]
            if not uid:
                continue
            audio = next(
                (
                    p
                    for p in (trans.parent / f"{uid}.flac", trans.parent / f"{uid}.wav")
                    if p.is_file()
                ),
                None,
            )
            if audio is None or not text.strip():
                why = "utterances whose audio is missing" if audio is None else "empty transcripts"
                result.dropped[why] += 1
                continue
            grid = grids.get(uid)
            result.rows.append(
                {
                    "id": uid,
                    "audio": str(audio),
                    "text": text.strip().lower(),
                    "textgrid": None if grid is None else str(grid),
                }
            )
    _note_alignments(result, alignments)
    return result


def _textgrids(alignments: Path | None) -> dict[str, Path]:
    """Every ``<stem>.TextGrid`` under ``alignments`` by stem (MFA mirrors the corpus's
    folders; the published LibriSpeech alignments add the split above them)."""
    if alignments is None:
        return {}
    if not alignments.is_dir():
        raise RecipeError(f"--alignments {alignments} is not a folder")
    return {p.stem: p for p in sorted(alignments.rglob("*.TextGrid"))}


def _note_alignments(result: RecipeResult, alignments: Path | None) -> None:
    unaligned = sum(1 for r in result.rows if not r.get("textgrid"))
    if alignments is not None and unaligned:
        result.notes.append(
            f"{unaligned:,} utterance(s) have no TextGrid in {alignments}: "
            "pocketsphinx aligns them at run time"
        )
    elif alignments is None and result.rows:
        result.notes.append("no --alignments: pocketsphinx aligns every utterance at run time")


RECIPES: dict[str, Callable[[Path, Path | None], RecipeResult]] = {
    "swuggy": swuggy,
    "sblimp": sblimp,
    "storycloze": storycloze,
    "librispeech": librispeech,
}


def make_manifest(
    name: str, source: Path, out: Path, alignments: Path | None = None
) -> RecipeResult:
    """Run recipe ``name`` over ``source`` and write its rows to the Parquet file ``out``."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}: use one of {sorted(RECIPES)}")
    if not source.is_dir():
        raise RecipeError(f"{source} is not a folder")
    if out.is_dir():
        raise RecipeError(f"{out} is a folder: name the manifest file to write (.parquet)")
    # Absolute paths: the reader resolves relative ones against the manifest's own folder.
    source = source.resolve()
    alignments = alignments.resolve() if alignments is not None else None
    result = RECIPES[name](source, alignments)
    if not result.rows:
        raise RecipeError(f"{name}: nothing usable in {source} ({dict(result.dropped)})")
    columns = {f.name: [r.get(f.name) for r in result.rows] for f in MANIFEST_SCHEMA}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    pq.write_table(pa.table(columns, schema=MANIFEST_SCHEMA), tmp, compression="zstd")
    tmp.replace(out)  # a reader never sees half a manifest
    return result
