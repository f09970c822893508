"""Quality tests on the embedded shapes-world model: the main job must do what the README says, measured."""

import json
from pathlib import Path

import numpy as np
import pytest

from mrgd.layout import Edit, Layout
from mrgd.models import DEFAULT_MODEL
from mrgd.toyworld.oracle import box_pixels, read_background, read_colour


@pytest.fixture(scope="module")
def pipe():
    from mrgd.pipeline import MRGDPipeline

    return MRGDPipeline.default()


def test_embedded_family_is_complete(pipe):
    assert pipe.guidance_model is not None and pipe.scorer is not None
    meta = json.loads((DEFAULT_MODEL / "shapes_world.json").read_text())
    assert meta["native_size"] == 128
    weights = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert weights < 40e6


@pytest.mark.parametrize("colour, shape, background", [
    ("red", "circle", "grass"), ("blue", "square", "sand"), ("yellow", "star", "sea"),
    ("purple", "triangle", "sky"), ("orange", "square", "grass"), ("black", "circle", "sand")])
def test_generate_puts_the_prompted_colour_in_the_box_on_the_prompted_background(pipe, colour, shape, background):
    box = [0.25, 0.25, 0.5, 0.5]
    layout = Layout.from_dict({"size": [128, 128], "seed": 1, "regions": [
        {"id": "bg", "kind": "background", "box": [0, 0, 1, 1], "prompt": background},
        {"id": "obj", "box": box, "prompt": f"a {colour} {shape}"}]})
    image = np.asarray(pipe.generate(layout).image)
    x0, y0, x1, y1 = box_pixels(box, (128, 128))
    assert read_colour(image[y0:y1, x0:x1].reshape(-1, 3)) == colour
    assert read_background(image, [(x0, y0, x1, y1)]) == background


def _three_regions(method: str) -> Edit:
    edit = Edit.load(Path(__file__).parents[1] / "examples" / "three_regions.json")
    return Edit.from_dict({**edit.to_dict(), "mrgd": {**edit.mrgd.model_dump(), "method": method}})


def test_edit_changes_the_edited_boxes_and_keeps_the_rest(pipe):
    from mrgd.metrics import edit_masks, ssim_i, ssim_map

    edit = _three_regions("p2p")
    result = pipe.edit(edit)
    kept = ssim_i(result.source, result.target, edit)
    changed = ssim_map(np.asarray(result.source), np.asarray(result.target))[edit_masks(edit)["edited"]].mean()
    assert kept > 0.75 and changed < kept - 0.2
    # the added star comes out purple, the recoloured square yellow
    for rid, colour in (("toy", "purple"), ("kite", "yellow")):
        x0, y0, x1, y1 = box_pixels(edit.regions_by_id()[rid].box, (128, 128))
        assert read_colour(np.asarray(result.target)[y0:y1, x0:x1].reshape(-1, 3)) == colour
