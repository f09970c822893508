"""Keyword selection (method.md §4) on hand-made attention maps."""

import math

import pytest
import torch

from mrgd.keywords import MapAccumulator, keywords_to_words, map_entropy, select_keywords
from mrgd.prompts import EncodedPrompt


def test_entropy_by_hand():
    half = torch.tensor([0.0, 0.0, 3.0, 3.0])  # levels {0, 255} half/half
    uniform = torch.full((4,), 0.2)  # one level
    four = torch.tensor([0.0, 1.0, 2.0, 3.0] * 4)  # levels 0, 85, 170, 255
    skewed = torch.tensor([0.0, 0.0, 0.0, 1.0])  # p = 3/4, 1/4
    entropy = map_entropy(torch.stack([half, uniform, four[:4], skewed]))
    expected = [1.0, 0.0, 2.0, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))]
    assert entropy.tolist() == pytest.approx(expected, abs=1e-6)
    assert map_entropy(four).item() == pytest.approx(2.0)


def test_entropy_floors_and_excludes_empty_maps():
    # 0.5/1 -> 127.5 -> floored to 127; 0.499/1 -> 127.2 -> 127: one bin, with 255 that is 1 bit in all
    assert map_entropy(torch.tensor([0.5, 0.499, 1.0, 1.0])).item() == pytest.approx(1.0)
    assert map_entropy(torch.zeros(2, 16)).tolist() == [math.inf, math.inf]


def _blob_and_noise(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((ys - 5) ** 2 + (xs - 9) ** 2) / 4).flatten()
    noise = (0.5 + 0.5 * torch.rand(256, generator=g))
    return blob, noise


def test_focused_maps_beat_diffuse_ones():
    blob, noise = _blob_and_noise()
    entropy = map_entropy(torch.stack([blob, noise]))
    assert entropy[0] < 2 < 6 < entropy[1]


def _maps(tokens: int = 10) -> torch.Tensor:
    """Token 3 and 7 are blobs (7 sharper), the rest noise of different seeds."""
    maps = torch.stack([_blob_and_noise(seed)[1] for seed in range(tokens)])
    maps[3] = _blob_and_noise()[0]
    maps[7] = _blob_and_noise()[0] ** 4
    maps[8] = 0  # a map that carries nothing
    return maps


def test_select_keywords_restricts_orders_and_counts():
    maps = _maps()
    entropy = map_entropy(maps)
    selected = select_keywords(maps, {"ball": [3, 4, 5, 7, 8], "kite": [1, 2], "none": []}, k=3)
    ball = selected["ball"]
    assert [p for p, _ in ball][:2] == [7, 3] and len(ball) == 3 and ball[2][0] in (4, 5)
    assert [h for _, h in ball] == sorted(h for _, h in ball)
    assert ball[0][1] == pytest.approx(entropy[7].item())
    assert sorted(p for p, _ in selected["kite"]) == [1, 2]  # fewer than k: all; only its own positions
    assert selected["none"] == []
    assert all(p != 8 for p, _ in ball)  # the all-zero map is never a keyword
    assert select_keywords(maps, {"ball": [3, 7]}, k=0) == {"ball": []}
    with pytest.raises(ValueError):
        select_keywords(maps, {"ball": [3]}, k=-1)
    with pytest.raises(ValueError):
        select_keywords(maps, {"ball": [10]}, k=1)


def test_select_keywords_by_words_scores_a_word_by_its_least_focused_piece():
    maps = _maps()
    spatial = "spatial"
    # word A = pieces 3 (a blob) + 4 (noise): per token, 3 alone is the best pick; per word, A is as diffuse as 4
    # and loses to word B = piece 7, a sharper blob; the noise word C = 5 comes last
    words = [[3, 4], [7], [5]]
    by_token = select_keywords(maps, {"r": [3, 4, 5, 7]}, k=1, entropy=spatial)
    assert [p for p, _ in by_token["r"]] == [7]
    by_word = select_keywords(maps, {"r": [3, 4, 5, 7]}, k=2, entropy=spatial, words=words)
    from mrgd.keywords import spatial_entropy

    h = spatial_entropy(maps)
    order = sorted([([3, 4], max(h[3], h[4]).item()), ([7], h[7].item()), ([5], h[5].item())], key=lambda x: x[1])
    expected = [(p, score) for ps, score in order[:2] for p in ps]
    assert [p for p, _ in by_word["r"]] == [p for p, _ in expected]  # k counts words; all pieces of a chosen one
    assert [s for _, s in by_word["r"]] == pytest.approx([s for _, s in expected])
    assert 3 not in [p for p, _ in select_keywords(maps, {"r": [3, 4, 7]}, k=1, entropy=spatial, words=words)["r"]]
    # a candidate in no word is its own word; positions outside the region's candidates are never returned
    alone = select_keywords(maps, {"r": [3, 9]}, k=5, entropy=spatial, words=[[3, 4]])
    assert sorted(p for p, _ in alone["r"]) == [3, 9]


def test_map_accumulator_averages_heads_and_calls():
    acc = MapAccumulator()
    first = torch.rand(1, 2, 16, 5)
    second = torch.rand(1, 2, 16, 5)
    acc.add(first, (4, 4))
    acc.add(second, (4, 4))
    expected = (first.mean(dim=(0, 1)) + second.mean(dim=(0, 1))).T / 2
    assert acc.maps().shape == (5, 16) and torch.allclose(acc.maps(), expected)
    with pytest.raises(ValueError):
        acc.add(torch.rand(1, 2, 64, 5), (8, 8))  # another resolution
    with pytest.raises(ValueError):
        MapAccumulator().maps()


def test_keywords_to_words_merges_sub_words():
    # "<bos> a zebra , red zebra <eos>" with zebra in pieces
    tokens = ["<|startoftext|>", "a</w>", "ze", "bra</w>", ",</w>", "red</w>", "ze", "bra</w>", "<|endoftext|>"]
    encoded = EncodedPrompt(torch.zeros(1, 9, 4), list(range(9)), 9, tokens=tokens, real_positions=list(range(1, 8)))
    selected = [(3, 0.5), (5, 0.7), (2, 0.9), (7, 1.2)]
    assert keywords_to_words(encoded, selected) == [{"word": "zebra", "entropy": 0.5}, {"word": "red", "entropy": 0.7}]
    with pytest.raises(ValueError):
        keywords_to_words(encoded, [(0, 0.1)])  # BOS is no word


def test_punctuation_is_never_a_candidate(tokenizer_dir):
    from conftest import make_tiny_components
    from mrgd.keywords import word_positions
    from mrgd.prompts import PromptEncoder, positions_of

    parts = make_tiny_components(tokenizer_dir)
    encoder = PromptEncoder(parts["tokenizer"], parts["text_encoder"])
    encoded = encoder.encode_parts([(None, "best quality"), ("ball", "masterpiece, a red circle, 8k")])
    words = [encoded.tokens[p].replace("</w>", "") for p in word_positions(encoded, positions_of(encoded, "ball"))]
    assert words == ["masterpiece", "a", "red", "circle", "8", "k"]


def test_spatial_entropy_ranks_focused_maps_first():
    import torch

    from mrgd.keywords import select_keywords, spatial_entropy

    flat = torch.ones(64)
    focused = torch.zeros(64)
    focused[:4] = 1
    h = spatial_entropy(torch.stack([flat, focused, torch.zeros(64)]))
    assert h[0].item() == pytest.approx(6.0) and h[1].item() == pytest.approx(2.0) and h[2].item() == float("inf")
    chosen = select_keywords(torch.stack([flat, focused]), {"r": [0, 1]}, 1, entropy="spatial")
    assert chosen["r"][0][0] == 1


def test_select_keywords_takes_a_count_per_region():
    maps = torch.zeros(6, 16)
    for position, width in zip(range(6), (1, 2, 4, 8, 12, 16)):
        maps[position, :width] = 1.0  # two levels, 255 and 0: entropy H(width / 16) bits
    chosen = select_keywords(maps, {"a": [0, 1, 2], "b": [3, 4, 5]}, {"a": 1, "b": 2})
    assert [p for p, _ in chosen["a"]] == [0]  # H(1/16) = 0.34 < H(2/16) = 0.54 < H(4/16) = 0.81
    assert [p for p, _ in chosen["b"]] == [5, 4]  # H(16/16) = 0 < H(12/16) = 0.81 < H(8/16) = 1
    with pytest.raises(ValueError, match="k must be >= 0"):
        select_keywords(maps, {"a": [0]}, {"a": -1})
