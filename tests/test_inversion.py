"""Real images: DDIM inversion parity with diffusers, null-text optimisation, the saved inversion."""

import numpy as np
import pytest
import torch
from PIL import Image

from mrgd.inversion import Inversion, ddim_invert, encode_image, invert, load_image
from mrgd.errors import InputError
from mrgd.layout import Edit


def _edit(steps=4, regions=None):
    return Edit.from_dict({"size": [64, 64], "seed": 1, "steps": steps, "guidance_scale": 3.0, "mrgd": {"method": "p2p"},
                           "regions": regions or [{"id": "all", "kind": "background", "box": [0, 0, 1, 1],
                                                   "prompt": "a red circle on grass"}]})


def _picture():
    from mrgd.toyworld.world import make_scene

    return Image.fromarray(make_scene(np.random.default_rng(3), 64).image)


def test_plain_inversion_matches_ddim_inverse_scheduler(tiny_pipe):
    from diffusers import DDIMInverseScheduler

    edit = _edit(steps=5)
    z0 = encode_image(tiny_pipe, _picture())
    ours = ddim_invert(tiny_pipe, edit, z0)[-1]

    inverse = DDIMInverseScheduler.from_config(tiny_pipe.scheduler.config)
    inverse.set_timesteps(5)
    ids = tiny_pipe.tokenizer("a red circle on grass", padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond = tiny_pipe.text_encoder(ids)[0]
    x = z0
    with torch.no_grad():
        for t in inverse.timesteps:
            eps = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
            x = inverse.step(eps, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4, rtol=1e-4)


def test_null_text_beats_plain_inversion_and_round_trips(tiny_pipe, tmp_path):
    regions = [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
               {"id": "ball", "box": [0.2, 0.2, 0.5, 0.5], "prompt": "a red circle"}]
    edit = _edit(steps=4, regions=regions)
    image = _picture()
    inversion, pivots = invert(tiny_pipe, image, edit, inner_steps=5, method="null-text")
    plain = tiny_pipe.edit(edit, start_latents=pivots[-1], images=(0,))
    tuned = tiny_pipe.edit(edit, start_latents=inversion.z_T, null_embeds=inversion.null_embeds_for((0,)), images=(0,))
    z0 = pivots[0]
    plain_err = (plain.latents["source"] - z0).pow(2).mean()
    tuned_err = (tuned.latents["source"] - z0).pow(2).mean()
    assert tuned_err < plain_err
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    again = Inversion.load(path)
    assert torch.equal(again.z_T, inversion.z_T) and again.null_embeds.keys() == inversion.null_embeds.keys()
    assert again.null_embeds["ball"].shape[0] == edit.steps
    assert again.region_context == edit.region_context
    again.check(edit)
    other = Edit.from_dict({**edit.to_dict(), "region_context": edit.region_context + 0.25})
    with pytest.raises(InputError, match="region_context"):
        again.check(other)


@pytest.mark.parametrize("method", ["direct", "negative-prompt", "null-text"])
def test_each_inversion_reconstructs_the_models_own_picture(tiny_pipe, tmp_path, method):
    regions = [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
               {"id": "ball", "box": [0.2, 0.2, 0.5, 0.5], "prompt": "a red circle",
                "target_prompt": "a blue circle"}]
    edit = _edit(steps=4, regions=regions)
    own = tiny_pipe.edit(edit, images=(0,)).source  # a picture the tiny model itself drew from this layout
    inversion, pivots = invert(tiny_pipe, own, edit, inner_steps=5, method=method)
    assert inversion.method == method
    z0 = pivots[0]
    plain = tiny_pipe.edit(edit, start_latents=pivots[-1], images=(0,)).latents["source"]
    result = tiny_pipe.edit(edit, **inversion.edit_kwargs())
    error = (result.latents["source"] - z0).pow(2).mean()
    assert error < (plain - z0).pow(2).mean()
    if method == "direct":  # exact: the source ends on the encoded picture itself
        assert torch.allclose(result.latents["source"], z0, atol=1e-6)
        assert not torch.equal(result.latents["target"], result.latents["source"])  # the edit still edits
    path = tmp_path / "inversion.safetensors"
    inversion.save(path)
    again = Inversion.load(path)
    assert again.method == method and again.steps == edit.steps
    replay = tiny_pipe.edit(edit, **again.edit_kwargs())
    assert torch.equal(replay.latents["target"], result.latents["target"])


def test_inversion_method_is_checked(tiny_pipe):
    with pytest.raises(InputError, match="--inversion"):
        invert(tiny_pipe, _picture(), _edit(), method="magic")


def test_load_image_fits_and_refuses_non_images(tmp_path):
    from mrgd.errors import InputError

    Image.new("RGB", (100, 50), "red").save(tmp_path / "wide.png")
    image, message = load_image(tmp_path / "wide.png", (64, 64))
    assert image.size == (64, 64) and "centre-cropped" in message
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(InputError, match="IMAGE"):
        load_image(tmp_path / "not.png", (64, 64))
