"""Synthetic speech with exact word timings, from espeak-ng (a Debian package).

Each word is synthesised on its own and the pieces are joined with a short gap,
so every word's [start, end] is known to the sample: the ground truth the
tests hold unit spans against. Voices, speeds and pitches vary the signal.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass

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


def synthesize(
    words: list[str], voice: Voice = Voice(), gap_s: float = 0.06, lead_s: float = 0.1
) -> tuple[np.ndarray, tuple[AlignedWord, ...]]:
    """A sentence as audio plus the exact [start, end] of every word."""
    rate = SAMPLE_RATE
    pieces = [np.zeros(int(lead_s * rate), np.float32)]
    timings = []
    cursor = len(pieces[0])
    gap = np.zeros(int(gap_s * rate), np.float32)
    for w in words:
        audio = espeak_word(w, voice)
        timings.append(AlignedWord(w, cursor / rate, (cursor + len(audio)) / rate))
        pieces += [audio, gap]
        cursor += len(audio) + len(gap)
    return np.concatenate(pieces), tuple(timings)
