"""Synthetic speech with exact word timings, from espeak-ng (a Debian package).

Each word is synthesised on its own and the pieces are joined with a short gap,
so every word's [start, end] is known to the sample: the ground truth the
tests hold unit spans against. Voices, speeds and pitches vary the signal.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, to_mono_16k
from .records import AlignedWord


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True)
class Voice:
    name: str = "en-us"
    speed: int = 165
    pitch: int = 50


def espeak_word(word: str, voice: Voice = Voice()) -> np.ndarray:
    """One word as 16 kHz mono float32, leading/trailing silence trimmed."""
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError("espeak-ng is not installed (apt-get install espeak-ng)")
    proc = subprocess.run(
        [exe, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", word],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise SynthesisError(f"espeak-ng failed on {word!r}: {proc.stderr.decode()[:200]}")
    samples, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    audio = to_mono_16k(samples, rate, f"espeak:{word}")
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


#: Silence before the first word and between words of a synthesized sentence.
LEAD_S, GAP_S = 0.1, 0.06


def join_clips(
    clips: list[tuple[str, np.ndarray]], gap_s: float = GAP_S, lead_s: float = LEAD_S
) -> tuple[np.ndarray, tuple[AlignedWord, ...]]:
    """(word, 16 kHz clip) pairs joined by silence, plus the exact [start, end] of each word."""
    rate = SAMPLE_RATE
    pieces = [np.zeros(int(lead_s * rate), np.float32)]
    timings = []
    cursor = len(pieces[0])
    gap = np.zeros(int(gap_s * rate), np.float32)
    for word, audio in clips:
        timings.append(AlignedWord(word, cursor / rate, (cursor + len(audio)) / rate))
        pieces += [audio, gap]
        cursor += len(audio) + len(gap)
    return np.concatenate(pieces), tuple(timings)


def synthesize(
    words: list[str], voice: Voice = Voice(), gap_s: float = GAP_S, lead_s: float = LEAD_S
) -> tuple[np.ndarray, tuple[AlignedWord, ...]]:
    """A sentence as audio plus the exact [start, end] of every word: each word rendered
    alone by espeak-ng, the clips joined by silence (not continuous speech)."""
    return join_clips([(w, espeak_word(w, voice)) for w in words], gap_s, lead_s)


def speak_sentences(folder: Path, sentences: list[tuple[str, list[str], Voice]]) -> list[dict]:
    """Manifest rows for (id, words, voice) sentences, each written as ``<id>.wav`` into
    ``folder`` by :func:`synthesize`, with its exact word timings (to 10 µs)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for uid, words, voice in sentences:
        audio, timings = synthesize(words, voice)
        sf.write(folder / f"{uid}.wav", audio, SAMPLE_RATE)
        rows.append(
            {
                "id": uid,
                "audio": f"{uid}.wav",
                "text": " ".join(words),
                "words": [[w.word, round(w.start_s, 5), round(w.end_s, 5)] for w in timings],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """A JSONL manifest, one row per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
