"""Build model-ready sequences (speech, text, interleaved) with per-position bookkeeping.

Interleaved strings follow slamkit: a marker before the first word and at
each modality change; text words carry their leading space, units none:
``<text> The cat<speech><Un12><Un7>...<text> on the mat``. Every position
records its modality and word, every word its positions and the variant ids of
itself, the next word and a frequency-matched control word (docs/metrics.md).
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .layouts import LayoutError, ResolvedLayout
from .records import AlignedWord, SequenceTooLongError, Utterance, WordTimingError
from .units import FRAME_S, unit_spans

MODES = ("speech", "text", "interleaved")
_PUNCT = string.punctuation + "“”‘’«»—–…"


def clean_word(word: str) -> str:
    return word.strip().strip(_PUNCT)


def _is_blank(tokenizer, token_id: int) -> bool:
    """A token that spells only whitespace (SentencePiece's bare "▁", GPT-2's "Ġ")."""
    return not tokenizer.decode([token_id]).strip()


def marks_word_starts(tokenizer) -> bool:
    """True for SentencePiece-style tokenizers, which write the word-start mark ("▁") themselves.

    Llama-2 and Spirit LM encode " cat" as ["▁", "▁cat"]: a space written before a
    text run would put a stray "▁" in front of it. Byte-level BPE (GPT-2, SmolLM2,
    Qwen, Llama-3) has no such mark; there a word's leading space is its own.
    """
    ids = tokenizer.encode("a", add_special_tokens=False)
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[:1])[0].startswith("▁")


def word_variants(tokenizer, word: str) -> list[int]:
    """First real token of " w", "w" and their first-letter case flips, deduplicated.

    "Real": the first token that is neither <unk> (the vocabulary lacks the form,
    and <unk> is not the word) nor whitespace only (a bare "▁" is every word's).
    """
    w = clean_word(word)
    if not w:
        return []
    forms = [w, w[0].upper() + w[1:], w[0].lower() + w[1:]]
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    for form in forms:
        for text in (" " + form, form):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            first = next((t for t in encoded if not _is_blank(tokenizer, t)), None)
            if first is not None and first != unk and first not in ids:
                ids.append(first)
    return ids


def text_run_tokens(tokenizer, words: Sequence[str]) -> list[tuple[int, int]]:
    """Consecutive text words as the model reads them: (token id, index into ``words``).

    The run is encoded as one string, as the model's own tokenizer would see it
    after a marker (a leading space for byte-level BPE, slamkit's convention; none
    where the tokenizer marks word starts itself), and each token is given to the
    word its characters come from; a whitespace-only token belongs to the word it
    precedes. Tokenizers without offsets encode word by word.
    """
    sep = "" if marks_word_starts(tokenizer) else " "
    if not getattr(tokenizer, "is_fast", False):
        return [
            (t, i)
            for i, w in enumerate(words)
            for t in tokenizer.encode((sep if i == 0 else " ") + w, add_special_tokens=False)
        ]
    text = sep + " ".join(words)
    owner = [-1] * len(sep)  # the word each character of ``text`` belongs to (-1: a space)
    for i, w in enumerate(words):
        owner += ([-1] if i else []) + [i] * len(w)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words_of = []
    for a, b in enc["offset_mapping"]:
        seen = [owner[c] for c in range(a, b) if owner[c] >= 0]
        words_of.append(seen[0] if seen else None)
    following = len(words) - 1
    for k in range(len(words_of) - 1, -1, -1):
        if words_of[k] is None:
            words_of[k] = following
        following = words_of[k]
    return list(zip(enc["input_ids"], words_of, strict=True))


@dataclass(frozen=True)
class ModalityRule:
    """Which words are spoken: ``alternate`` every n words, seeded ``poisson`` spans, ``flags``."""

    kind: str = "alternate"
    n: int = 3
    mean_span: float = 3.0
    seed: int = 0
    start: str = "text"
    flags: tuple[bool, ...] | None = None  # True = speech, per word

    def assign(self, utterance_id: str, n_words: int) -> list[str]:
        if self.kind == "flags":
            if self.flags is None or len(self.flags) != n_words:
                raise WordTimingError(
                    utterance_id,
                    f"explicit modality flags cover {len(self.flags or ())} words, "
                    f"the utterance has {n_words}",
                )
            return ["speech" if f else "text" for f in self.flags]
        other = {"text": "speech", "speech": "text"}
        current = self.start
        out: list[str] = []
        if self.kind == "alternate":
            for i in range(n_words):
                if i and i % self.n == 0:
                    current = other[current]
                out.append(current)
            return out
        if self.kind == "poisson":
            rng = np.random.default_rng([self.seed, zlib.crc32(utterance_id.encode())])
            while len(out) < n_words:
                span = 1 + int(rng.poisson(max(self.mean_span - 1, 0)))
                out.extend([current] * span)
                current = other[current]
            return out[:n_words]
        raise ValueError(f"unknown modality rule {self.kind!r}: alternate, poisson or flags")


class ControlSampler:
    """Frequency-matched chance words: a word occurrence drawn from *another* utterance.

    Deterministic in (seed, utterance id, word index), so every worker draws the
    same control for the same word without coordination.
    """

    def __init__(self, corpus: Sequence[tuple[str, Sequence[str]]], seed: int = 0) -> None:
        self.seed = seed
        self.pool_utt: list[str] = []
        self.pool_word: list[str] = []
        for utt_id, words in corpus:
            for w in words:
                if clean_word(w):
                    self.pool_utt.append(utt_id)
                    self.pool_word.append(w)
        self.n_utterances = len({u for u, _ in corpus})

    def draw(self, utterance_id: str, word_index: int) -> str | None:
        if self.n_utterances < 2 or not self.pool_word:
            return None
        rng = np.random.default_rng([self.seed, zlib.crc32(utterance_id.encode()), word_index])
        for _ in range(64):
            j = int(rng.integers(len(self.pool_word)))
            if self.pool_utt[j] != utterance_id:
                return self.pool_word[j]
        return None


@dataclass
class WordRow:
    word_index: int
    word: str
    modality: str
    start_s: float | None
    end_s: float | None
    first_position: int | None
    last_position: int | None
    variant_ids: list[int]
    next_variant_ids: list[int] | None
    ctrl_word: str | None
    ctrl_variant_ids: list[int] | None


@dataclass
class BuiltSequence:
    """One utterance rendered for the model, with everything the lens and the store need."""

    utterance_id: str
    token_ids: list[int]
    modality: list[str]
    word_index: list[int | None]
    words: list[WordRow]
    duration_s: float | None = None
    continuation_start: int | None = None
    #: Spoken words whose timings cover no unit frame (lensed nowhere): counted in the
    #: shard telemetry and the run summary.
    unspanned_words: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a").input_ids
    return [bos] if probe and probe[0] == bos else []


class _Tokens:
    """The growing sequence: ids, each id's modality and word, each word's first/last position."""

    def __init__(self, prefix: list[int], n_words: int, layout: ResolvedLayout) -> None:
        self.ids = list(prefix)
        self.modality: list[str] = ["special"] * len(prefix)
        self.word: list[int | None] = [None] * len(prefix)
        self.first: list[int | None] = [None] * n_words
        self.last: list[int | None] = [None] * n_words
        self.layout = layout

    def put(self, token: int, modality: str, word: int | None) -> None:
        if word is not None:
            self.first[word] = len(self.ids) if self.first[word] is None else self.first[word]
            self.last[word] = len(self.ids)
        self.ids.append(token)
        self.modality.append(modality)
        self.word.append(word)

    def marker(self, modality: str) -> None:
        layout = self.layout
        token = layout.speech_marker_id if modality == "speech" else layout.text_marker_id
        if token is not None:
            self.put(token, "marker", None)

    def units(self, units: list[int], lo: int, hi: int, owner) -> None:
        """Units ``lo:hi``, each owned by the word ``owner(k)`` (None: silence)."""
        for k in range(lo, hi):
            self.put(self.layout.unit_id(units[k]), "speech", owner(k))


def _speech_only(tokens: _Tokens, units: list[int], spans, speech_marker: bool) -> None:
    """The whole utterance as units, silences included; words own their spans."""
    if speech_marker:
        tokens.marker("speech")
    owner: list[int | None] = [None] * len(units)
    for i, span in enumerate(spans):
        if span:
            for k in range(*span):
                owner[k] = i
    tokens.units(units, 0, len(units), owner.__getitem__)


def _interleaved(tokens: _Tokens, words, modalities, units, spans, tokenizer) -> None:
    """Runs of text words as the tokenizer sees them, runs of spoken words as their units
    (with the silences between them), a marker at every change of modality."""
    n, i, current = len(words), 0, None
    while i < n:
        modality = modalities[i]
        if modality != current:
            tokens.marker(modality)
            current = modality
        j = i
        while j < n and modalities[j] == modality:
            j += 1
        if modality == "text":
            for token, k in text_run_tokens(tokenizer, [w.word for w in words[i:j]]):
                tokens.put(token, "text", i + k)
        elif owned := [(w, spans[w]) for w in range(i, j) if spans[w]]:
            owner = {k: w for w, span in owned for k in range(*span)}
            tokens.units(units, owned[0][1][0], owned[-1][1][1], owner.get)
        i = j


def _word_rows(utt, words, modalities, spans, tokens: _Tokens, tokenizer, control):
    variant_ids = [word_variants(tokenizer, w.word) for w in words]
    rows = []
    for i, w in enumerate(words):
        ctrl = control.draw(utt.id, i) if control is not None else None
        rows.append(
            WordRow(
                word_index=i,
                word=w.word,
                modality=modalities[i],
                start_s=None if np.isnan(w.start_s) else float(w.start_s),
                end_s=None if np.isnan(w.end_s) else float(w.end_s),
                first_position=tokens.first[i],
                last_position=tokens.last[i],
                variant_ids=variant_ids[i],
                next_variant_ids=variant_ids[i + 1] if i + 1 < len(words) else None,
                ctrl_word=ctrl,
                ctrl_variant_ids=word_variants(tokenizer, ctrl) if ctrl else None,
            )
        )
    return rows


def _continuation_start(utt: Utterance, tokens: _Tokens) -> int | None:
    """First position of the continuation's words (spoken-knowledge items)."""
    if not utt.continuation:
        return None
    n, k = len(tokens.first), len(utt.continuation.split())
    starts = [tokens.first[i] for i in range(max(0, n - k), n) if tokens.first[i] is not None]
    return starts[0] if starts else None


def build_sequence(
    utt: Utterance,
    tokenizer,
    layout: ResolvedLayout,
    mode: str = "speech",
    rule: ModalityRule | None = None,
    control: ControlSampler | None = None,
    max_positions: int | None = None,
    frame_s: float = FRAME_S,
    variants: bool = True,
    speech_marker: bool = True,
    target_tokenizer=None,
) -> BuiltSequence:
    """Render ``utt`` (with units if any word is spoken) as token ids plus bookkeeping.

    ``variants=False`` skips the variant/control ids (training data needs only ids).
    ``target_tokenizer``: whose ids the word variants are (a foreign lens head's
    tokenizer); the model's own ``tokenizer`` by default.
    ``speech_marker=False`` starts a speech-only sequence with its first unit, as
    slamkit does; interleaved sequences always mark every modality change.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    words = (
        list(utt.words)
        if utt.words is not None
        else [AlignedWord(w, float("nan"), float("nan")) for w in utt.text_words()]
    )
    n = len(words)
    if mode == "speech":
        modalities = ["speech"] * n
    elif mode == "text":
        modalities = ["text"] * n
    else:
        modalities = (rule or ModalityRule()).assign(utt.id, n)
    needs_units = "speech" in modalities
    if needs_units and (utt.units is None or utt.durations is None or utt.words is None):
        raise WordTimingError(utt.id, "spoken words need units, durations and word timings")
    if layout.layout.replaces_text and "text" in modalities:
        raise LayoutError(f"layout {layout.layout.name} has no text vocabulary: use mode=speech")
    spans = unit_spans(words, utt.durations, frame_s) if needs_units else [None] * n

    tokens = _Tokens(_bos(tokenizer), n, layout)
    units = list(utt.units or ())
    if mode == "speech":
        _speech_only(tokens, units, spans, speech_marker)
    else:
        _interleaved(tokens, words, modalities, units, spans, tokenizer)
    if max_positions is not None and len(tokens.ids) > max_positions:
        raise SequenceTooLongError(
            utt.id,
            f"sequence of {len(tokens.ids)} tokens exceeds the model's context ({max_positions})",
        )
    if not variants:
        return BuiltSequence(utt.id, tokens.ids, tokens.modality, tokens.word, [], utt.duration_s)
    return BuiltSequence(
        utterance_id=utt.id,
        token_ids=tokens.ids,
        modality=tokens.modality,
        word_index=tokens.word,
        words=_word_rows(
            utt, words, modalities, spans, tokens, target_tokenizer or tokenizer, control
        ),
        duration_s=utt.duration_s,
        continuation_start=_continuation_start(utt, tokens),
        unspanned_words=[i for i in range(n) if modalities[i] == "speech" and spans[i] is None],
    )
