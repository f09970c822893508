"""Random-vocabulary padding of training captions (toyworld/fillers.py): never a world or held-out word."""

from __future__ import annotations

import numpy as np
from transformers import CLIPTokenizer

from mrgd.models import DEFAULT_MODEL
from mrgd.toyworld import grounding
from mrgd.toyworld.fillers import NAMING, allowed, pad_with_random, random_phrase
from mrgd.toyworld.world import HELD_OUT_FILLERS, QUALITY_WORDS, TEST_FILLERS


def tokenizer():
    return CLIPTokenizer.from_pretrained(str(DEFAULT_MODEL / "tokenizer"))


def test_random_words_never_name_a_thing_nor_repeat_a_held_out_filler():
    tok = tokenizer()
    assert not allowed("sred", tok)  # s + red</w>: a colour token
    assert not allowed("bokeh", tok)  # a test-suite filler
    assert not allowed("masterpiece", tok) and not allowed("grass", tok)
    assert allowed("qzkp", tok)
    rng = np.random.default_rng(3)
    held = {w for phrase in HELD_OUT_FILLERS + TEST_FILLERS + QUALITY_WORDS for w in phrase.split()}
    for _ in range(300):
        phrase = random_phrase(rng, tok)
        assert 1 <= len(phrase.split()) <= 2 and not set(phrase.split()) & held
        assert not any(t.endswith("</w>") and t[:-4] in NAMING for t in tok.tokenize(phrase))


def test_padding_keeps_the_caption_and_its_grounded_words_and_gets_diffused():
    tok = tokenizer()
    rng = np.random.default_rng(0)
    caption = "grass, masterpiece, a red circle, a blue star"
    padded = [pad_with_random(caption, rng, tok, 1.0) for _ in range(50)]
    for text in padded:
        parts = text.split(", ")
        kept = [p for p in parts if p in caption.split(", ")]
        assert kept == caption.split(", ") and len(parts) > len(kept)  # order kept, something inserted
        # the grounded words are the caption's; every random piece is a diffuse position
        assert [tok.convert_ids_to_tokens(tok(text).input_ids)[p] for p, _ in grounding.word_targets(tok, text)] == \
            ["grass</w>", "red</w>", "circle</w>", "blue</w>", "star</w>"]
        assert len(grounding.diffuse_positions(tok, text)) > len(grounding.diffuse_positions(tok, caption))
    assert pad_with_random(caption, rng, tok, 0.0) == caption
    assert sum(pad_with_random(caption, rng, tok, 0.5) != caption for _ in range(200)) in range(70, 131)
