"""Metrics of method.md §8 on hand-made images and a tiny random CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mrgd.layout import Edit
from mrgd.metrics import (
    CLIP_MEAN, CLIP_STD, box_mask, clip_in_box, clip_texts, dilate, edit_masks, explain_masks, psnr, ssim, ssim_e,
    ssim_i, ssim_map,
)

# E = pixels [64, 102) on both axes; grown by 0.25 * 38.4 = 9.6 px -> [54, 112); inherent box [6, 38)
EDIT = {
    "size": [128, 128],
    "prompt": "masterpiece",
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
        {"id": "keep", "box": [0.05, 0.05, 0.25, 0.25], "prompt": "a blue square"},
        {"id": "ball", "box": [0.5, 0.5, 0.3, 0.3], "prompt": "a red circle", "target_prompt": "a yellow circle"},
    ],
}


@pytest.fixture()
def edit():
    return Edit.from_dict(EDIT)


@pytest.fixture()
def image():
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def test_box_mask_is_clamped_pixel_box():
    mask = box_mask([0.5, 0.25, 0.75, 0.5], (64, 32))
    assert mask.shape == (32, 64)
    assert mask.sum() == 32 * 16 and mask[8:24, 32:].all()


def test_ring_geometry(edit):
    masks = edit_masks(edit)
    expected_edited = np.zeros((128, 128), bool)
    expected_edited[64:102, 64:102] = True
    expected_grown = np.zeros((128, 128), bool)
    expected_grown[54:112, 54:112] = True
    assert (masks["edited"] == expected_edited).all()
    assert (masks["ring"] == expected_grown & ~expected_edited).all()
    assert masks["ring"].sum() == 58**2 - 38**2
    assert masks["inherent"].sum() == 32 * 32 and masks["inherent"][6:38, 6:38].all()


def test_dilate_each_box_by_its_own_side_and_clamps():
    boxes = [[0.8, 0.0, 0.2, 0.25], [0.0, 0.5, 0.125, 0.0625]]  # 32 px side -> pad 8; 16 px side -> pad 4
    grown = dilate(np.zeros((128, 128), bool), boxes, (128, 128))
    expected = np.zeros((128, 128), bool)
    expected[0:40, 94:128] = True
    expected[60:76, 0:20] = True
    assert (grown == expected).all()


def test_inherent_falls_back_to_outside_of_dilation():
    edit = Edit.from_dict({**EDIT, "regions": [EDIT["regions"][0], EDIT["regions"][2]]})
    masks = edit_masks(edit)
    assert masks["inherent"].sum() == 128**2 - 58**2 and not (masks["inherent"] & masks["ring"]).any()


def test_identical_images_score_one(edit, image):
    assert ssim_e(image, image, edit) == pytest.approx(1.0)
    assert ssim_i(Image.fromarray(image), Image.fromarray(image), edit) == pytest.approx(1.0)
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim_map(image, image).shape == (128, 128)
    assert psnr(image, image) == math.inf


def test_change_well_inside_edit_is_invisible(edit, image):
    target = image.copy()
    target[72:94, 72:94] = 255 - target[72:94, 72:94]  # 8 px inside E, beyond the 5 px Gaussian window radius
    assert ssim_e(image, target, edit) == pytest.approx(1.0)
    assert ssim_i(image, target, edit) == pytest.approx(1.0)
    assert ssim(image, target) < 0.99


def test_change_in_ring_lowers_ssim_e_only(edit, image):
    target = image.copy()
    target[56:62, 70:90] = 255 - target[56:62, 70:90]
    assert ssim_e(image, target, edit) < 0.95
    assert ssim_i(image, target, edit) == pytest.approx(1.0)


def test_empty_ring_is_nan(image):
    edit = Edit.from_dict({**EDIT, "regions": [{"id": "all", "box": [0, 0, 1, 1], "target_prompt": "sea"}]})
    assert math.isnan(ssim_e(image, image, edit)) and math.isnan(ssim_i(image, image, edit))


def test_psnr_known_values(image):
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert psnr(a, a + 1) == pytest.approx(48.13, abs=0.005)
    assert psnr(a, a + 10) == pytest.approx(28.13, abs=0.005)
    assert psnr(a / 255, (a + 1) / 255, data_range=1) == pytest.approx(48.13, abs=0.005)


def test_explain_masks_is_a_large_picture(edit):
    picture = explain_masks(edit)
    assert min(picture.size) >= 256 and picture.mode == "RGB"
    pixels = np.asarray(picture)
    assert tuple(pixels[2 * 80, 2 * 80]) == (210, 40, 40)  # inside E, scaled by 2


# ---------------------------------------------------------------------------------------------------------------
# CLIP in box


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), tokenizer


def test_removal_text_is_what_covers_the_box():
    removed = {"id": "rock", "box": [0.1, 0.1, 0.3, 0.3], "prompt": "a black star", "target_prompt": None}
    added = {"id": "toy", "box": [0.5, 0.5, 0.3, 0.3], "target_prompt": "highly detailed, a red square"}
    ground = {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "sand"}
    edit = Edit.from_dict({"prompt": "best quality", "regions": [ground, removed, added]})
    assert clip_texts(edit) == {"rock": "sand", "toy": "highly detailed, a red square"}
    half = {**ground, "box": [0.5, 0, 0.5, 1]}  # the background no longer holds the removed box's centre
    edit = Edit.from_dict({"prompt": "best quality", "regions": [half, removed, added]})
    assert clip_texts(edit)["rock"] == "best quality, sand, highly detailed, a red square"


def test_clip_in_box_matches_hand_computation(clip, edit, image):
    model, tokenizer = clip
    added = {"id": "toy", "box": [0.1, 0.5, 0.3, 0.4], "target_prompt": "a purple star, sharp focus"}
    edit = Edit.from_dict({**EDIT, "regions": EDIT["regions"] + [added]})
    scores = clip_in_box(Image.fromarray(image), edit, model, tokenizer)
    assert set(scores) == {"ball", "toy"}
    assert all(isinstance(s, float) and -100 <= s <= 100 for s in scores.values())

    crop = Image.fromarray(image[64:102, 64:102]).resize((32, 32), Image.BICUBIC)  # the "ball" box
    pixels = (torch.tensor(np.asarray(crop), dtype=torch.float32).permute(2, 0, 1) / 255
              - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    with torch.no_grad():
        image_embed = model.visual_projection(model.vision_model(pixel_values=pixels[None]).pooler_output)[0]
        ids = torch.tensor([tokenizer("a yellow circle").input_ids])
        text_embed = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
    expected = 100 * float(image_embed @ text_embed / (image_embed.norm() * text_embed.norm()))
    assert scores["ball"] == pytest.approx(expected, abs=1e-3)


def test_overlap_class_needs_an_edited_box_over_an_inherent_foreground_box():
    from mrgd.metrics import boxes_intersect, overlaps_inherent

    assert boxes_intersect([0, 0, 0.5, 0.5], [0.4, 0.4, 0.5, 0.5])
    assert not boxes_intersect([0, 0, 0.5, 0.5], [0.5, 0, 0.5, 0.5])  # edges touching share no area

    def edit(*regions):
        return Edit.from_dict({"regions": [{"id": "bg", "kind": "background", "box": [0, 0, 1, 1], "prompt": "sea"},
                                           *regions]})

    added = {"id": "new", "box": [0.4, 0.4, 0.3, 0.3], "target_prompt": "a red circle"}
    assert overlaps_inherent(edit(added, {"id": "old", "box": [0.1, 0.1, 0.4, 0.4], "prompt": "a blue star"}))
    assert not overlaps_inherent(edit(added, {"id": "old", "box": [0.0, 0.0, 0.4, 0.4], "prompt": "a blue star"}))
    assert not overlaps_inherent(edit(added))  # the background does not count
    # two edited boxes overlapping each other, no inherent foreground: separate
    assert not overlaps_inherent(edit(added, {"id": "gone", "box": [0.5, 0.5, 0.3, 0.3], "prompt": "a star",
                                              "target_prompt": None}))
