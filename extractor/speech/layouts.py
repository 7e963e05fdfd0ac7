"""Vocabulary layouts: where speech units and modality markers live in a model's vocabulary.

A layout is checked against the real tokenizer before any id is trusted: every
unit token must exist with its expected id and every marker must exist; the
first mismatch is named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from extractor.lens import VocabSegments


class LayoutError(ValueError):
    """The tokenizer does not have the layout's tokens where the layout says."""


@dataclass(frozen=True)
class VocabLayout:
    """How unit ``i`` and the modality markers are spelled and numbered.

    ``unit_offset``: the id of unit 0, or None for "wherever the tokenizer put
    it" (then units must still be contiguous).
    """

    name: str
    unit_format: str
    n_units: int
    speech_marker: str | None
    text_marker: str | None
    unit_offset: int | None = None
    replaces_text: bool = False

    def unit_token(self, unit: int) -> str:
        return self.unit_format.format(unit)

    def check(self, tokenizer) -> ResolvedLayout:
        """Resolve ids against ``tokenizer``; raise :class:`LayoutError` on the first mismatch."""
        vocab = tokenizer.get_vocab()
        first = self.unit_token(0)
        if first not in vocab:
            raise LayoutError(
                f"layout {self.name}: unit token {first!r} is not in the tokenizer's vocabulary"
            )
        offset = vocab[first] if self.unit_offset is None else self.unit_offset
        for i in range(self.n_units):
            tok = self.unit_token(i)
            got = vocab.get(tok)
            if got != offset + i:
                raise LayoutError(
                    f"layout {self.name}: unit {i} {tok!r} has id {got}, expected {offset + i}"
                )
        markers = {}
        for role, tok in (("speech", self.speech_marker), ("text", self.text_marker)):
            if tok is None:
                continue
            if tok not in vocab:
                raise LayoutError(f"layout {self.name}: marker {tok!r} is not in the tokenizer")
            markers[role] = vocab[tok]
        size = max(len(vocab), max(vocab.values()) + 1)
        return ResolvedLayout(
            layout=self,
            vocab_size=size,
            unit_offset=offset,
            speech_marker_id=markers.get("speech"),
            text_marker_id=markers.get("text"),
            special_ids=tuple(sorted(set(getattr(tokenizer, "all_special_ids", []) or []))),
        )


@dataclass(frozen=True)
class ResolvedLayout:
    """A layout checked against a tokenizer: concrete ids."""

    layout: VocabLayout
    vocab_size: int
    unit_offset: int
    speech_marker_id: int | None
    text_marker_id: int | None
    special_ids: tuple[int, ...] = ()

    def unit_id(self, unit: int) -> int:
        if not 0 <= unit < self.layout.n_units:
            raise LayoutError(
                f"unit {unit} outside [0, {self.layout.n_units}) of {self.layout.name}"
            )
        return self.unit_offset + unit

    def modality_of(self) -> list[str]:
        """Per token id: text / speech / marker / special."""
        mod = ["special" if self.layout.replaces_text else "text"] * self.vocab_size
        for i in self.special_ids:
            if i < self.vocab_size:
                mod[i] = "special"
        for i in range(self.unit_offset, self.unit_offset + self.layout.n_units):
            mod[i] = "speech"
        for i in (self.speech_marker_id, self.text_marker_id):
            if i is not None:
                mod[i] = "marker"
        return mod

    def segments(self, vocab_size: int | None = None) -> VocabSegments:
        """Lens segments (text, speech, marker, special) for a head of ``vocab_size`` rows."""
        return segments_of(self.modality_of(), vocab_size)


SEGMENT_NAMES = ("text", "speech", "marker", "special")


def segments_of(modalities: list[str], vocab_size: int | None = None) -> VocabSegments:
    """Lens segments from per-token modalities, for a head of ``vocab_size`` rows.

    A head may be padded past its tokenizer: padding rows count as special.
    """
    size = vocab_size or len(modalities)
    mod = (modalities + ["special"] * size)[:size]
    index = torch.tensor([SEGMENT_NAMES.index(m) for m in mod], dtype=torch.long)
    return VocabSegments(SEGMENT_NAMES, index)


def text_modalities(tokenizer) -> list[str]:
    """Per token id of a text LM's tokenizer (a foreign lens head's): text, or special."""
    mod = ["text"] * len(tokenizer)
    for i in tokenizer.all_special_ids:
        if 0 <= i < len(mod):
            mod[i] = "special"
    return mod


SIMS = VocabLayout("sims", "<Un{}>", 500, "<speech>", "<text>")
SLAM = VocabLayout("slam", "<Un{}>", 500, None, None, unit_offset=2, replaces_text=True)
SPIRIT_LM = VocabLayout("spirit-lm", "[Hu{}]", 501, "[Speech]", "[Text]", unit_offset=32002)
LAYOUTS = {lay.name: lay for lay in (SIMS, SLAM, SPIRIT_LM)}

#: Spirit LM Expressive interleaves pitch ([Pi]) and style ([St]) tokens with its units.
EXPRESSIVE_REFUSAL = (
    "Spirit LM Expressive is not supported: its speech interleaves pitch ([Pi*]) and style "
    "([St*]) tokens, from an F0 VQ-VAE and a style encoder, with the HuBERT units, and "
    "slm-lens computes only the units ([Hu*]), so its prompts would not be the model's. "
    "Use the base model's layout, spirit-lm"
)


def layout_from_config(spec: str | Mapping) -> VocabLayout:
    """A named layout (``sims``, ``slam``, ``spirit-lm``...) or a custom one from a mapping."""
    if isinstance(spec, str):
        if spec == "spirit-lm-expressive":
            raise LayoutError(EXPRESSIVE_REFUSAL)
        if spec not in LAYOUTS:
            raise LayoutError(f"unknown layout {spec!r}: use one of {sorted(LAYOUTS)} or a mapping")
        return LAYOUTS[spec]
    known = {
        "name",
        "unit_format",
        "n_units",
        "speech_marker",
        "text_marker",
        "unit_offset",
        "replaces_text",
    }
    unknown = set(spec) - known
    if unknown:
        raise LayoutError(f"custom layout has unknown fields {sorted(unknown)}")
    missing = {"unit_format", "n_units"} - set(spec)
    if missing:
        raise LayoutError(f"custom layout misses {sorted(missing)}")
    return VocabLayout(
        name=spec.get("name", "custom"),
        unit_format=spec["unit_format"],
        n_units=int(spec["n_units"]),
        speech_marker=spec.get("speech_marker"),
        text_marker=spec.get("text_marker"),
        unit_offset=spec.get("unit_offset"),
        replaces_text=bool(spec.get("replaces_text", False)),
    )
