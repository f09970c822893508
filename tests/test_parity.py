"""Parity first: one full-canvas region under `multidiffusion` is plain Stable Diffusion sampling."""

import numpy as np
import pytest
import torch

from mrgd.layout import Layout


@pytest.mark.parametrize("global_prompt", ["", "best quality"])
def test_single_background_matches_stable_diffusion(tiny_components, tiny_pipe, global_prompt):
    from diffusers import StableDiffusionPipeline

    layout = Layout.from_dict({
        "size": [64, 64], "prompt": global_prompt, "negative_prompt": "blurry", "seed": 3, "steps": 6,
        "guidance_scale": 6.0,
        "regions": [{"id": "all", "kind": "background", "box": [0, 0, 1, 1], "prompt": "a red circle on grass"}],
    })
    ours = np.asarray(tiny_pipe.generate(layout).image).astype(np.int16)

    sd = StableDiffusionPipeline(**tiny_components, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    prompt = f"{global_prompt}, a red circle on grass" if global_prompt else "a red circle on grass"
    theirs = sd(prompt, negative_prompt="blurry", height=64, width=64, num_inference_steps=6, guidance_scale=6.0,
                generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]
    theirs = np.asarray(theirs).astype(np.int16)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 0  # a real picture, not a constant
