"""The shapes world: seeded scenes with ground truth, captions, and the offline tokenizer."""

import json

import numpy as np

from mrgd.toyworld.world import BACKGROUNDS, COLORS, QUALITY_WORDS, SHAPES, caption_layout, caption_scene, make_scene, word_roles


def test_scenes_are_seeded_and_carry_ground_truth():
    a, b = make_scene(np.random.default_rng(5)), make_scene(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and a.background == b.background
    assert a.background in BACKGROUNDS and 1 <= len(a.objects) <= 3
    for obj in a.objects:
        x, y, w, h = obj.box
        assert 0 <= x < 1 and 0 <= y < 1 and w > 0.1 and h > 0.1
        assert obj.color in COLORS and obj.shape in SHAPES
        ys, xs = np.nonzero(obj.mask)
        if len(xs):  # the visible mask lies inside the box
            assert xs.min() >= int(x * 128) and xs.max() < round((x + w) * 128) + 1


def test_object_pixels_have_the_object_colour():
    scene = make_scene(np.random.default_rng(1), n_objects=1)
    obj = scene.objects[0]
    inner = scene.image[obj.mask].astype(float)
    assert np.abs(np.median(inner, axis=0) - np.array(COLORS[obj.color])).max() < 30


def test_captions_name_objects_and_quality_words_are_independent():
    rng = np.random.default_rng(0)
    scene = make_scene(rng, n_objects=2)
    texts = [caption_scene(scene, rng) for _ in range(200)]
    assert all(o.phrase in t for t in texts for o in scene.objects)
    padded = [t for t in texts if any(q in t for q in QUALITY_WORDS)]
    assert 0.3 < len(padded) / len(texts) < 0.7
    roles = dict(word_roles("masterpiece, a red circle on grass"))
    assert roles == {"masterpiece": "quality", "a": "filler", "red": "color", "circle": "object", "on": "filler",
                     "grass": "background"}


def test_layout_captions_put_the_background_first_and_objects_in_scene_order():
    rng = np.random.default_rng(1)
    scene = make_scene(rng, n_objects=3)
    texts = [caption_layout(scene, rng) for _ in range(200)]
    for text in texts:
        named = [w for w, role in word_roles(text) if role in ("background", "object")]
        shapes = [o.shape for o in scene.objects]
        assert named in (shapes, [scene.background] + shapes), text
        assert " and " not in text
    assert 0.6 < sum(t.split(", ")[0] == scene.background for t in texts) / len(texts) < 0.95
    assert any(t.split(", ")[0] in QUALITY_WORDS for t in texts)


def test_tokenizer_is_rebuilt_identically(tmp_path, tokenizer_dir):
    from transformers import CLIPTokenizer

    from mrgd.toyworld.tokenizer import build_tokenizer

    rebuilt = build_tokenizer(tmp_path / "tok")
    assert json.loads((rebuilt / "vocab.json").read_text()) == json.loads((tokenizer_dir / "vocab.json").read_text())
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok("masterpiece, a purple star on the sea").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1
    # every world word is a single token, as in OpenAI CLIP
    assert len(ids) == 2 + len("masterpiece , a purple star on the sea".split())


def test_oracle_reads_generated_scenes():
    from mrgd.toyworld.oracle import box_pixels, read_background, read_colour

    rng = np.random.default_rng(4)
    right_colour = right_background = 0
    for _ in range(20):
        scene = make_scene(rng, n_objects=1)
        obj = scene.objects[0]
        x0, y0, x1, y1 = box_pixels(obj.box, (128, 128))
        right_colour += read_colour(scene.image[y0:y1, x0:x1].reshape(-1, 3)) == obj.color
        right_background += read_background(scene.image, [(x0, y0, x1, y1)]) == scene.background
    assert right_colour >= 19 and right_background >= 19


def test_fold_pixel_range_makes_clip_take_standard_normalisation():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mrgd.guidance import clip_pixels
    from mrgd.toyworld.train import fold_pixel_range

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                             num_hidden_layers=2, num_attention_heads=4)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = model(pixel_values=x).pooler_output
        fold_pixel_range(model.embeddings)
        after = model(pixel_values=clip_pixels(x, 32)).pooler_output
        unchanged_input = model(pixel_values=x).pooler_output
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, unchanged_input, atol=1e-3)
