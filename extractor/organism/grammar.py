"""A generated English-like corpus with real structure, for the model organism.

Noun classes constrain which adjectives and verbs fit, so the text has the
dependencies a language model can learn in minutes; word choice is Zipfian, so
frequency effects (and the frequency-matched control) are realistic.
"""

from __future__ import annotations

import numpy as np

NOUNS = {
    "animal": [
        "cat",
        "dog",
        "horse",
        "bird",
        "fish",
        "cow",
        "sheep",
        "mouse",
        "lion",
        "bear",
        "fox",
        "wolf",
        "duck",
        "goat",
        "frog",
    ],
    "person": [
        "man",
        "woman",
        "boy",
        "girl",
        "child",
        "king",
        "queen",
        "farmer",
        "doctor",
        "teacher",
        "baker",
        "sailor",
    ],
    "food": [
        "bread",
        "apple",
        "cake",
        "soup",
        "cheese",
        "milk",
        "rice",
        "egg",
        "pear",
        "plum",
        "corn",
        "meat",
    ],
    "place": [
        "house",
        "garden",
        "river",
        "forest",
        "town",
        "school",
        "market",
        "field",
        "road",
        "hill",
        "lake",
        "farm",
    ],
    "thing": [
        "ball",
        "book",
        "cup",
        "hat",
        "box",
        "chair",
        "door",
        "lamp",
        "rope",
        "key",
        "coin",
        "bell",
    ],
}
ADJECTIVES = {
    "animal": ["small", "big", "brown", "white", "black", "wild", "old", "young", "fast", "quiet"],
    "person": ["tall", "old", "young", "kind", "happy", "tired", "brave", "poor", "rich", "wise"],
    "food": ["fresh", "sweet", "hot", "cold", "warm", "soft", "green", "ripe", "red", "sour"],
    "place": ["quiet", "old", "big", "small", "green", "dark", "far", "near", "busy", "empty"],
    "thing": ["red", "blue", "small", "big", "old", "new", "heavy", "round", "broken", "clean"],
}
VERBS = {  # verb -> object classes it takes
    "saw": ("animal", "person", "place", "thing", "food"),
    "found": ("animal", "thing", "food", "person"),
    "liked": ("animal", "person", "food", "place", "thing"),
    "ate": ("food",),
    "cooked": ("food",),
    "visited": ("place", "person"),
    "left": ("place", "thing"),
    "carried": ("thing", "food", "animal"),
    "fed": ("animal", "person"),
    "painted": ("thing", "place"),
    "helped": ("person", "animal"),
    "washed": ("thing", "animal", "food"),
}
SUBJECT_CLASSES = ("animal", "person")
PREPOSITIONS = ["in", "near", "by", "behind", "under", "at"]
ADVERBS = ["slowly", "quickly", "today", "again", "often", "soon", "quietly"]
DETERMINERS = ["the", "a", "this", "that"]
CONJUNCTIONS = ["and", "but", "then"]


def vocabulary() -> list[str]:
    words = set(DETERMINERS + PREPOSITIONS + ADVERBS + CONJUNCTIONS + list(VERBS))
    for cls in NOUNS:
        words |= set(NOUNS[cls]) | set(ADJECTIVES[cls])
    return sorted(words)


class Grammar:
    """Seeded sentence generator: ``sentence()`` -> list of words (5-14 words)."""

    def __init__(self, seed: int = 0, zipf: float = 1.1) -> None:
        self.rng = np.random.default_rng(seed)
        self.zipf = zipf

    def _pick(self, items: list[str]) -> str:
        weights = 1.0 / np.arange(1, len(items) + 1) ** self.zipf
        return items[self.rng.choice(len(items), p=weights / weights.sum())]

    def _noun_phrase(self, cls: str) -> list[str]:
        words = [self._pick(DETERMINERS)]
        if self.rng.random() < 0.5:
            words.append(self._pick(ADJECTIVES[cls]))
        return [*words, self._pick(NOUNS[cls])]

    def _clause(self) -> list[str]:
        subject = self._noun_phrase(str(self.rng.choice(SUBJECT_CLASSES)))
        verb = self._pick(list(VERBS))
        obj = self._noun_phrase(str(self.rng.choice(VERBS[verb])))
        words = [*subject, verb, *obj]
        if self.rng.random() < 0.4:
            words += [self._pick(PREPOSITIONS), *self._noun_phrase("place")]
        if self.rng.random() < 0.3:
            words.append(self._pick(ADVERBS))
        return words

    def sentence(self) -> list[str]:
        words = self._clause()
        if self.rng.random() < 0.25:
            words += [self._pick(CONJUNCTIONS), *self._clause()]
        return words[:14]
