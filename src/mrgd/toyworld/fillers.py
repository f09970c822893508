"""Captions padded with random vocabulary, so that "a word that names nothing attends evenly" is learnt for every
word, not just for the dozen quality words of the training captions.

The toy tokenizer knows the world's words; any other word falls back to byte-level pieces ("bokeh" is b, o, k, e,
h</w>), pieces no training caption ever held, whose embeddings stayed at their random start. Keyword selection on
shapes-v3 picked such words over object words (precision 0.71 with fillers it never saw,
benchmarks/results/keywords-held-out.md). Random letter strings are made of the same pieces, so padding captions
with them (and asking their maps to spread, `grounding.diffuse_loss`) teaches the text side what any unknown word
should do. Words of the benchmarks' held-out lists (`world.HELD_OUT_FILLERS`, `world.TEST_FILLERS`) and every
world word are never drawn, nor a string that tokenizes into a colour, shape or background token.
"""

from __future__ import annotations

import string

import numpy as np

from .world import BACKGROUNDS, COLORS, HELD_OUT_FILLERS, SHAPES, TEST_FILLERS, vocabulary_text

LETTERS = string.ascii_lowercase
DIGITS = string.digits
NAMING = {*COLORS, *SHAPES, *BACKGROUNDS}  # words whose token must never come out of a random string
NEVER = {w for phrase in HELD_OUT_FILLERS + TEST_FILLERS for w in phrase.split()} | set(vocabulary_text())


def random_word(rng: np.random.Generator) -> str:
    """2-8 random lower-case letters; one word in ten gets a digit or two ("x7", "4kq")."""
    n = int(rng.integers(2, 9))
    chars = [LETTERS[i] for i in rng.integers(0, len(LETTERS), n)]
    if rng.random() < 0.1:
        for i in rng.integers(0, n, int(rng.integers(1, 3))):
            chars[i] = DIGITS[int(rng.integers(0, 10))]
    return "".join(chars)


def allowed(word: str, tokenizer) -> bool:
    """A random word may pad a caption unless it is a world or held-out word or holds a naming token."""
    if word in NEVER:
        return False
    return not any(t.endswith("</w>") and t[:-4] in NAMING for t in tokenizer.tokenize(word))


def random_phrase(rng: np.random.Generator, tokenizer) -> str:
    """1-2 allowed random words."""
    words, n = [], int(rng.integers(1, 3))
    while len(words) < n:
        word = random_word(rng)
        if allowed(word, tokenizer):
            words.append(word)
    return " ".join(words)


def pad_with_random(caption: str, rng: np.random.Generator, tokenizer, p: float, most: int = 3) -> str:
    """With probability p, insert 1..most random phrases between the caption's comma-separated parts (before the
    first and after the last too): a sentence caption gets them before or after, a layout caption anywhere."""
    if p <= 0 or rng.random() >= p:
        return caption
    parts = caption.split(", ") if caption else []
    for _ in range(int(rng.integers(1, most + 1))):
        parts.insert(int(rng.integers(0, len(parts) + 1)), random_phrase(rng, tokenizer))
    return ", ".join(parts)
