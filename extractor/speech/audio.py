"""Audio I/O and validation: soundfile to read, torchaudio to resample, named errors."""

from __future__ import annotations

import io

import numpy as np

from analysis.storage import StorageError, resolve, with_retries

from .records import (
    AlignedWord,
    AudioReadError,
    AudioSource,
    EmptyAudioError,
    NonFiniteAudioError,
    WordTimingError,
)

SAMPLE_RATE = 16_000
#: How far a word may end past the audio (aligners round to their frame rate).
WORD_TOLERANCE_S = 0.05


def read_source(source: AudioSource, utterance_id: str) -> tuple[np.ndarray, int]:
    """(samples [n, channels] float32, sample rate) from a path, URI or embedded bytes.

    A store that is briefly unreachable is retried with backoff; if it stays
    down, the :class:`~analysis.storage.StorageError` propagates (the shard must
    stay uncommitted, so a re-run tries again). Anything wrong with the file
    itself is an :class:`AudioReadError`: a failure of this utterance only.
    """
    import soundfile as sf

    try:
        if source.data is not None:
            data = source.data
        elif source.path is not None:
            fs, path = resolve(source.path)
            data = with_retries(
                lambda: _fetch(fs, path), f"reading audio of {utterance_id!r} from {source.path}"
            )
        else:
            raise AudioReadError(utterance_id, "no audio source given")
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (AudioReadError, StorageError):
        raise
    except Exception as exc:  # soundfile/pyarrow raise many types; keep the cause
        raise AudioReadError(utterance_id, f"cannot read audio {source.describe()}: {exc}") from exc
    return samples, int(rate)


def _fetch(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def to_mono_16k(samples: np.ndarray, rate: int, utterance_id: str) -> np.ndarray:
    """Average channels, resample to 16 kHz with torchaudio, validate the result."""
    if samples.size == 0:
        raise EmptyAudioError(utterance_id, "audio has no samples")
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if not np.isfinite(mono).all():
        bad = int(np.flatnonzero(~np.isfinite(mono))[0])
        raise NonFiniteAudioError(
            utterance_id, f"audio holds NaN/inf samples (first at {bad / rate:.3f} s)"
        )
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional as AF

        mono = AF.resample(torch.from_numpy(mono.astype(np.float32)), rate, SAMPLE_RATE).numpy()
    if mono.size == 0:
        raise EmptyAudioError(utterance_id, "audio is empty after resampling")
    return mono.astype(np.float32, copy=False)


def load_audio(source: AudioSource, utterance_id: str) -> np.ndarray:
    """Mono float32 samples at 16 kHz."""
    samples, rate = read_source(source, utterance_id)
    return to_mono_16k(samples, rate, utterance_id)


def check_words(
    words: tuple[AlignedWord, ...],
    duration_s: float,
    utterance_id: str,
    tolerance_s: float = WORD_TOLERANCE_S,
) -> tuple[AlignedWord, ...]:
    """Validate timings: ordered, non-negative, inside the audio (within tolerance).

    A word ending up to ``tolerance_s`` past the audio is clipped to its end; more
    than that raises :class:`WordTimingError` saying which word and by how much.
    """
    out = []
    previous_start = -np.inf
    for i, w in enumerate(words):
        if not w.word.strip():
            raise WordTimingError(utterance_id, f"word {i} is empty")
        if not (np.isfinite(w.start_s) and np.isfinite(w.end_s)):
            raise WordTimingError(utterance_id, f"word {i} {w.word!r} has non-finite times")
        if w.start_s < -tolerance_s or w.end_s < w.start_s:
            raise WordTimingError(
                utterance_id,
                f"word {i} {w.word!r} has bad times [{w.start_s:.3f}, {w.end_s:.3f}] s",
            )
        if w.start_s < previous_start:
            raise WordTimingError(
                utterance_id,
                f"words out of order: word {i} {w.word!r} starts at {w.start_s:.3f} s, "
                f"before word {i - 1} ({previous_start:.3f} s)",
            )
        if w.end_s > duration_s + tolerance_s:
            raise WordTimingError(
                utterance_id,
                f"word {i} {w.word!r} ends at {w.end_s:.3f} s, {w.end_s - duration_s:.3f} s "
                f"past the end of the audio ({duration_s:.3f} s; tolerance {tolerance_s} s)",
            )
        previous_start = w.start_s
        out.append(AlignedWord(w.word, max(0.0, w.start_s), min(w.end_s, duration_s)))
    return tuple(out)
