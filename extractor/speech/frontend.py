"""The front end as one step: manifest utterances in, utterances with units and timings out.

Loads and validates audio, fills missing word timings by forced alignment,
tokenises speech in length-bucketed batches, and turns every bad item into a
named error record instead of an exception, so one corrupt file never stops a
shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from .audio import SAMPLE_RATE, check_words, load_audio
from .manifest import force_align
from .records import EmptyTextError, SpeechInputError, Utterance, WordTimingError
from .units import FRAME_S, UnitSequence

SpeechTokenizer = Callable[[Sequence[np.ndarray]], list[UnitSequence]]


class SpeechFrontEnd:
    """Prepare utterances for sequence building.

    ``tokenizer``: a batched speech tokenizer (HuBERT + k-means, Spirit LM's
    quantizer) or None when every utterance brings precomputed units.
    ``batch_seconds``: audio per tokenizer call (utterances sorted by length).
    Default: 60 s on a GPU, one utterance on a CPU. The tokenizers run their
    model one utterance at a time inside a call, so units never depend on this
    grouping (or on the device's batch size).
    """

    def __init__(
        self,
        tokenizer: SpeechTokenizer | None,
        *,
        align_missing: bool = True,
        batch_seconds: float | None = None,
        aligner: Callable[[np.ndarray, str, str], tuple] = force_align,
    ) -> None:
        self.tokenizer = tokenizer
        self.align_missing = align_missing
        if batch_seconds is None:
            on_gpu = str(getattr(tokenizer, "device", "cpu")).startswith("cuda")
            batch_seconds = 60.0 if on_gpu else 0.0
        self.batch_samples = int(batch_seconds * SAMPLE_RATE)
        self.aligner = aligner

    def prepare(self, utterances: Sequence[Utterance]) -> list[Utterance | SpeechInputError]:
        """Same order as the input; each item is a ready utterance or the error it hit."""
        out: list[Utterance | SpeechInputError] = list(utterances)
        pending: list[tuple[int, Utterance, np.ndarray]] = []
        for i, utt in enumerate(utterances):
            try:
                if not utt.text.strip() and not utt.words:
                    raise EmptyTextError(utt.id, "no text and no words")
                if utt.units is not None:
                    if utt.words is None:
                        raise WordTimingError(utt.id, "precomputed units need word timings")
                    duration = utt.duration_s or FRAME_S * sum(utt.durations or ())
                    out[i] = replace(
                        utt,
                        duration_s=duration,
                        words=check_words(utt.words, duration, utt.id),
                    )
                    continue
                if utt.audio is None:
                    out[i] = utt  # text-only utterance
                    continue
                audio = load_audio(utt.audio, utt.id)
                duration = len(audio) / SAMPLE_RATE
                words = utt.words
                if words is None:
                    if not self.align_missing:
                        raise WordTimingError(utt.id, "no word timings (alignment disabled)")
                    words = self.aligner(audio, utt.text, utt.id)
                words = check_words(words, duration, utt.id)
                pending.append((i, replace(utt, words=words, duration_s=duration), audio))
            except SpeechInputError as exc:
                out[i] = exc
        if pending and self.tokenizer is None:
            for i, utt, _ in pending:
                out[i] = SpeechInputError(utt.id, "audio given but no speech tokenizer configured")
            return out
        pending.sort(key=lambda item: len(item[2]))
        batch: list[tuple[int, Utterance, np.ndarray]] = []
        for item in [*pending, None]:
            full = item is None or (batch and (len(batch) + 1) * len(item[2]) > self.batch_samples)
            if full and batch:
                units = self.tokenizer([a for _, _, a in batch])
                for (i, utt, _), seq in zip(batch, units, strict=True):
                    out[i] = utt.with_units(tuple(seq.units), tuple(seq.durations))
                batch = []
            if item is not None:
                batch.append(item)
        return out
