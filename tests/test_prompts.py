"""Prompts as people write them: WebUI emphasis, long prompts in 75-token chunks, positions that stay readable."""

import pytest
import torch

from mrgd.prompts import CHUNK, PromptEncoder, parse_weighted, positions_of, word_spans


@pytest.mark.parametrize("text, expected", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("((red))", [("red", 1.21)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("(red:1.3) ball", [("red", 1.3), (" ball", 1.0)]),
    ("((red:1.5) ball)", [("red", 1.65), (" ball", 1.1)]),
    (r"a \(red\) circle", [("a (red) circle", 1.0)]),
    ("(red", [("red", 1.1)]),  # unclosed: to the end
    ("red) ball", [("red) ball", 1.0)]),  # stray closing bracket: literal
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_weighted(text, expected):
    parsed = parse_weighted(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def encoder(tiny_components):
    return PromptEncoder(tiny_components["tokenizer"], tiny_components["text_encoder"])


def test_plain_prompt_is_exactly_diffusers(tiny_components, encoder):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**tiny_components, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    for text in ["best quality, a red circle on grass", ""]:
        theirs = sd.encode_prompt(text, "cpu", 1, False)[0]
        ours = encoder.encode(text)
        assert torch.equal(ours.embeds, theirs)
        tok = tiny_components["tokenizer"]
        assert ours.token_ids == tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.length == len(tok(text).input_ids)


def test_weight_scales_one_token_and_keeps_the_mean(encoder):
    plain, weighted = encoder.encode("a red circle"), encoder.encode("a (red:1.5) circle")
    assert weighted.token_ids == plain.token_ids
    red = plain.tokens.index("red</w>")
    assert weighted.weights[red] == 1.5 and sum(w != 1 for w in weighted.weights) == 1
    assert torch.allclose(weighted.embeds.mean(), plain.embeds.mean(), atol=1e-6)
    ratio = weighted.embeds[0] / plain.embeds[0]  # the mean correction c everywhere, 1.5·c at "red"
    c = ratio[0, 0]
    others = [i for i in range(77) if i != red]
    assert torch.allclose(ratio[others], c.expand(len(others), ratio.shape[1]), atol=1e-4)
    assert torch.allclose(ratio[red], (1.5 * c).expand(ratio.shape[1]), atol=1e-4)


def test_long_prompt_is_encoded_in_chunks(tiny_components, encoder):
    text = " ".join(["a red circle,"] * 30)  # 120 tokens
    encoded = encoder.encode(text)
    tok, text_encoder = tiny_components["tokenizer"], tiny_components["text_encoder"]
    assert encoded.embeds.shape[1] == 154 == len(encoded.token_ids) == len(encoded.weights) == len(encoded.part_of)
    assert encoded.chunks == 2 and encoded.length == 122
    assert encoded.real_positions == list(range(1, 76)) + list(range(78, 123))
    for chunk in range(2):
        ids = encoded.token_ids[77 * chunk : 77 * (chunk + 1)]
        assert ids[0] == tok.bos_token_id
        alone = text_encoder(torch.tensor([ids]))[0]
        assert torch.equal(alone, encoded.embeds[:, 77 * chunk : 77 * (chunk + 1)])
    prompt_ids = [encoded.token_ids[p] for p in encoded.real_positions]
    assert prompt_ids == tok(text, add_special_tokens=False, verbose=False).input_ids


def test_pad_to_same_length(encoder):
    short, long = encoder.encode("a red circle"), encoder.encode(" ".join(["a red circle,"] * 30))
    padded_short, padded_long = encoder.pad_to_same_length([short, long])
    assert padded_long is long
    assert padded_short.embeds.shape == long.embeds.shape
    empty = encoder.encode("")
    assert torch.equal(padded_short.embeds[:, 77:], empty.embeds)
    assert padded_short.token_ids == short.token_ids + empty.token_ids
    assert len(padded_short.tokens) == len(padded_short.part_of) == len(padded_short.weights) == 154
    assert padded_short.length == short.length and padded_short.real_positions == short.real_positions
    torch.cat([padded_short.embeds, padded_long.embeds])  # one UNet batch


def test_word_spans_merge_sub_words(encoder):
    encoded = encoder.encode("a zebra, (red:1.2) circle")
    assert [w for w, _ in word_spans(encoded)] == ["a", "zebra", ",", "red", "circle"]
    assert word_spans(encoded)[1][1] == [2, 3, 4, 5, 6]  # z e b r a</w>
    # a word cut by the chunk boundary keeps its pieces on both sides of the next chunk's BOS
    long = encoder.encode("a " + "zebra " * 20)
    spans = word_spans(long)
    assert len(spans) == 21 and {w for w, _ in spans} == {"a", "zebra"}
    assert spans[15] == ("zebra", [72, 73, 74, 75, 78])


def test_part_positions(encoder):
    parts = [(None, "best quality"), ("ball", "a (red) circle"), ("empty", ""), ("kite", "a zebra")]
    encoded = encoder.encode_parts(parts)
    joined = encoder.encode("best quality, a (red) circle, a zebra")
    assert encoded.token_ids == joined.token_ids and torch.equal(encoded.embeds, joined.embeds)
    assert [encoded.tokens[p] for p in positions_of(encoded, "ball")] == ["a</w>", "red</w>", "circle</w>"]
    assert len(positions_of(encoded, "kite")) == 6 and positions_of(encoded, "empty") == []
    commas = [p for p in encoded.real_positions if encoded.tokens[p] == ",</w>"]
    assert len(commas) == 2 and all(encoded.part_of[p] is None for p in commas)
    assert encoded.part_of[0] is None and encoded.part_of[1] is None  # BOS, global prompt
    assert encoded.weights[positions_of(encoded, "ball")[1]] == pytest.approx(1.1)
