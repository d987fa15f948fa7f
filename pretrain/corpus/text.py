"""English sentences from a small built-in grammar, so the corpus needs no downloads.

The vocabulary is chosen to cover every phone of the shared inventory several times in every
few sentences (the tests check the coverage); sentences are one to three clauses, which gives
utterances of roughly 1.5 to 9 seconds across the voices.
"""

from __future__ import annotations

import numpy as np

NAMES = (
    "anna", "peter", "maria", "john", "susan", "george", "helen", "oliver", "judy", "victor",
    "thomas", "ruth", "edward", "joyce", "hugo", "martha", "zachary", "irene", "charles", "owen",
)
ADJECTIVES = (
    "small", "large", "green", "yellow", "quiet", "noisy", "heavy", "bright", "gentle", "rough",
    "cheap", "thick", "smooth", "shiny", "ancient", "modern", "frozen", "curious", "brave",
    "lazy", "purple", "orange", "wooden", "golden", "narrow", "usual", "beige", "rich", "pleasant",
    "strange", "thin", "young", "hungry", "royal", "foreign", "huge", "vivid", "joyful", "sharp",
)
NOUNS = (
    "dog", "cat", "horse", "garden", "river", "mountain", "village", "teacher", "doctor",
    "window", "table", "letter", "picture", "kitchen", "bridge", "engine", "ship", "island",
    "forest", "market", "church", "judge", "voice", "boy", "girl", "child", "farmer", "machine",
    "treasure", "measure", "hour", "clock", "chair", "bottle", "pencil", "tower", "wheel",
    "bird", "mouse", "book", "student", "thumb", "feather", "whistle", "orchestra", "queen",
    "oyster", "yard", "jungle", "vision", "pleasure", "path", "bath", "shoe", "juice",
)
VERBS = (
    "found", "watched", "carried", "painted", "opened", "closed", "cleaned", "visited", "moved",
    "pushed", "pulled", "noticed", "bought", "sold", "borrowed", "pointed at", "looked at",
    "talked to", "waited for", "thought about", "showed", "touched", "fixed", "dropped",
    "wanted", "measured", "enjoyed", "judged", "washed", "chased", "followed", "described",
)
ADVERBS = (
    "quickly", "slowly", "quietly", "happily", "carefully", "suddenly", "usually", "nearly",
    "gladly", "rarely", "easily", "proudly", "calmly", "boldly", "thoroughly", "eagerly",
)
PREPOSITIONS = (
    "near", "behind", "under", "beside", "inside", "across", "without", "beyond", "toward",
    "through", "among", "during",
)
TIMES = (
    "yesterday", "this morning", "last night", "every day", "on monday", "in the evening",
    "at noon", "after lunch", "before the storm", "three weeks ago", "in june", "at seven",
)
CONJUNCTIONS = ("and", "but", "because", "while", "so", "although", "after", "before")
DETERMINERS = ("the", "a", "that", "this", "every", "one", "my", "our", "her", "his", "their")


def vocabulary() -> list[str]:
    """Every word the grammar can produce, for coverage checks of the phone maps."""
    words: set[str] = set()
    for group in (NAMES, ADJECTIVES, NOUNS, VERBS, ADVERBS, PREPOSITIONS, TIMES, CONJUNCTIONS,
                  DETERMINERS):
        for phrase in group:
            words.update(phrase.split())
    words.update({"a", "an", "the"})
    return sorted(words)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator) -> str:
    if rng.random() < 0.2:
        return _pick(rng, NAMES)
    words = [_pick(rng, DETERMINERS)]
    for _ in range(int(rng.integers(0, 3))):
        words.append(_pick(rng, ADJECTIVES))
    words.append(_pick(rng, NOUNS))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _clause(rng: np.random.Generator) -> str:
    parts = [_noun_phrase(rng)]
    if rng.random() < 0.35:
        parts.append(_pick(rng, ADVERBS))
    parts.append(_pick(rng, VERBS))
    parts.append(_noun_phrase(rng))
    if rng.random() < 0.45:
        parts.append(_pick(rng, PREPOSITIONS))
        parts.append(_noun_phrase(rng))
    if rng.random() < 0.3:
        parts.append(_pick(rng, TIMES))
    return " ".join(parts)


def sentence(rng: np.random.Generator, max_clauses: int = 3) -> str:
    """One sentence of 1..``max_clauses`` clauses, joined by conjunctions, with punctuation."""
    n = 1 + int(rng.integers(max_clauses))
    text = _clause(rng)
    for _ in range(n - 1):
        comma = "," if rng.random() < 0.5 else ""
        text += f"{comma} {_pick(rng, CONJUNCTIONS)} {_clause(rng)}"
    return text[0].upper() + text[1:] + "."
