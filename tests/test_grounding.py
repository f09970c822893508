"""The token-grounding loss used to train the shapes-world UNet (toyworld/grounding.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mrgd.toyworld import grounding


def test_recording_processor_leaves_the_unet_output_unchanged(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = unet(x, t, cond).sample
        maps = grounding.install(unet)
        got = unet(x, t, cond).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # one down and two up cross-attention layers at each of 8x8 and 4x4; never the mid block
    assert sorted(m.shape[1] for m in maps) == [16, 16, 16, 64, 64, 64]
    assert all(m.shape == (2, m.shape[1], 7) for m in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, maps[0].shape[1]))


def test_word_targets_follow_object_order(tiny_components):
    tok = tiny_components["tokenizer"]
    caption = "masterpiece, a red circle and a blue star on grass, 8k"
    tokens = tok.tokenize(caption)
    targets = grounding.word_targets(tok, caption)
    named = [(tokens[p - 1].replace("</w>", ""), i) for p, i in targets]
    assert named == [("red", 1), ("circle", 1), ("blue", 2), ("star", 2), ("grass", 0)]


def test_loss_is_zero_inside_the_mask_and_grows_outside():
    labels = np.zeros((1, 8, 8), np.uint8)
    labels[0, :4, :4] = 1  # object 0 in the top-left quarter
    inside = torch.zeros(1, 16, 3)
    inside[0, [0, 1, 4, 5], 1] = 0.25  # token 1's attention in the 2x2 top-left at 4x4
    inside[0, :, 2] = 1 / 16  # token 2 spread evenly
    zero = grounding.grounding_loss([inside], labels, [[(1, 1)]])
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    spread = grounding.grounding_loss([inside], labels, [[(2, 1)]])
    assert spread.item() == pytest.approx((1 - 0.25) ** 2, rel=1e-5)
    background = grounding.grounding_loss([inside], labels, [[(2, 0)]])
    assert background.item() == pytest.approx(0.25 ** 2, rel=1e-5)
    assert grounding.grounding_loss([inside], labels, [[]]).item() == 0.0


def test_diffuse_positions_are_the_words_that_name_nothing(tiny_components):
    tok = tiny_components["tokenizer"]
    caption = "masterpiece, a red circle and a blue star on grass, 8k"
    tokens = tok.tokenize(caption)
    named = [tokens[p - 1].replace("</w>", "") for p in grounding.diffuse_positions(tok, caption)]
    words = [t.replace("</w>", "") for t in tokens if t.replace("</w>", "") not in {",", "red", "circle", "blue", "star", "grass"}]
    assert named == words
    assert "," not in named and "masterpiece" in "".join(named) and "and" in named


def test_diffuse_loss_is_zero_for_uniform_maps_and_one_for_a_single_pixel():
    maps = torch.zeros(2, 16, 3)
    maps[:, :, 1] = 1 / 16  # token 1 uniform
    maps[:, 5, 2] = 1.0  # token 2 on one pixel
    assert grounding.diffuse_loss([maps], [[1], [1]]).item() == pytest.approx(0.0, abs=1e-6)
    assert grounding.diffuse_loss([maps], [[2], []]).item() == pytest.approx(1.0, abs=1e-6)
    half = torch.zeros(1, 16, 2)
    half[0, :8, 1] = 1 / 8  # half the pixels: log 8 / log 16 of the way
    assert grounding.diffuse_loss([half], [[1]]).item() == pytest.approx(1 - 3 / 4, rel=1e-5)
    assert grounding.diffuse_loss([maps], [[], []]).item() == 0.0


def test_relative_grounding_scores_a_uniform_map_one_whatever_the_mask():
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, :2, :2] = 1  # object 0: a quarter; the background: three quarters
    uniform = torch.full((1, 16, 2), 1 / 16)
    for index in (0, 1):
        loss = grounding.grounding_loss([uniform], labels, [[(1, index)]], relative=True)
        assert loss.item() == pytest.approx(1.0, rel=1e-5)
    plain = grounding.grounding_loss([uniform], labels, [[(1, 0)]])
    assert plain.item() == pytest.approx(0.25 ** 2, rel=1e-5)
    inside = torch.zeros(1, 16, 2)
    inside[0, labels[0].flatten() == 0, 1] = 1 / 12  # exactly on the background
    assert grounding.grounding_loss([inside], labels, [[(1, 0)]], relative=True).item() == pytest.approx(0, abs=1e-6)


def test_positions_stop_where_the_tokenizer_truncates(tiny_components):
    tok = tiny_components["tokenizer"]
    caption = ", ".join(["masterpiece, a red circle"] * 30)  # far past 77 tokens
    limit = tok.model_max_length - 2
    assert max(grounding.diffuse_positions(tok, caption)) <= limit
    assert max(p for p, _ in grounding.word_targets(tok, caption)) <= limit
    assert len(tok.tokenize(caption)) > limit
