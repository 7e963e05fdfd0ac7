"""Small typed records of the speech front end, linked by utterance id (lhotse-style).

Audio is referenced, not held: an :class:`Utterance` says where its samples
are; :mod:`.audio` loads them when a worker needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

Seconds = float


class SpeechInputError(ValueError):
    """Bad speech input; the message names the utterance and the reason."""

    stage = "input"

    def __init__(self, utterance_id: str, reason: str) -> None:
        super().__init__(f"utterance {utterance_id!r}: {reason}")
        self.utterance_id = utterance_id
        self.reason = reason


class AudioReadError(SpeechInputError):
    stage = "audio"


class EmptyAudioError(SpeechInputError):
    stage = "audio"


class NonFiniteAudioError(SpeechInputError):
    stage = "audio"


class WordTimingError(SpeechInputError):
    stage = "alignment"


class ManifestRowError(SpeechInputError):
    """A manifest row that cannot describe an utterance (the message names the row)."""

    stage = "manifest"


class EmptyTextError(SpeechInputError):
    stage = "text"


class SequenceTooLongError(SpeechInputError):
    stage = "sequence"


@dataclass(frozen=True)
class AlignedWord:
    """One word and where it is spoken: ``[start_s, end_s]`` inside its utterance."""

    word: str
    start_s: Seconds
    end_s: Seconds

    @property
    def duration_s(self) -> Seconds:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class AudioSource:
    """Where an utterance's samples are: a path/URI, or bytes embedded in the manifest."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def describe(self) -> str:
        return self.path or f"<{len(self.data or b'')} embedded bytes>"


@dataclass(frozen=True)
class Utterance:
    """An utterance: text, optional audio, optional word timings, optional precomputed units.

    ``units``/``durations``: deduplicated speech units and the frame count of
    each run, when the manifest brings them instead of audio.
    """

    id: str
    text: str
    audio: AudioSource | None = None
    words: tuple[AlignedWord, ...] | None = None
    units: tuple[int, ...] | None = None
    durations: tuple[int, ...] | None = None
    duration_s: Seconds | None = None
    pair_id: str | None = None
    pair_role: str | None = None
    continuation: str | None = None

    def with_words(self, words: tuple[AlignedWord, ...]) -> Utterance:
        return replace(self, words=tuple(words))

    def with_units(self, units: tuple[int, ...], durations: tuple[int, ...]) -> Utterance:
        return replace(self, units=tuple(units), durations=tuple(durations))

    def text_words(self) -> list[str]:
        return self.text.split()
