"""Tiny random-weight model families built from configs, as diffusers' own tests do."""

from __future__ import annotations

import pytest
import torch


def make_tiny_components(tokenizer_dir, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


@pytest.fixture(scope="session")
def tokenizer_dir():
    from mrgd.models import DEFAULT_MODEL

    return DEFAULT_MODEL / "tokenizer"


@pytest.fixture(scope="session")
def tiny_components(tokenizer_dir):
    return make_tiny_components(tokenizer_dir)


@pytest.fixture()
def tiny_pipe(tiny_components):
    from mrgd.pipeline import MRGDPipeline

    return MRGDPipeline(**tiny_components, name="tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_components, tmp_path_factory):
    """The tiny family saved as a diffusers folder (safetensors), for CLI and loader tests."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    sd = StableDiffusionPipeline(**tiny_components, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(folder)
    make_tiny_clipseg(tiny_components["tokenizer"]).save_pretrained(folder / "clipseg")
    tiny_components["tokenizer"].save_pretrained(folder / "clipseg")
    return folder


THREE_REGION_EDIT = {
    "size": [64, 64], "prompt": "masterpiece", "seed": 7, "steps": 5,
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
        {"id": "ball", "box": [0.05, 0.5, 0.4, 0.45], "prompt": "a red circle", "seed": 11},
        {"id": "kite", "box": [0.5, 0.05, 0.45, 0.4], "prompt": "a blue square", "target_prompt": "a yellow square"},
        {"id": "toy", "box": [0.55, 0.55, 0.4, 0.4], "target_prompt": "a purple star"},
        {"id": "rock", "box": [0.05, 0.05, 0.3, 0.3], "prompt": "an orange triangle", "target_prompt": None},
    ],
}


def make_tiny_clipseg(tokenizer, seed: int = 3):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    return CLIPSegForImageSegmentation(CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16,
                                                     extract_layers=[1], reduce_dim=16,
                                                     decoder_num_attention_heads=2, decoder_intermediate_size=32))


@pytest.fixture()
def tiny_guided_pipe(tiny_components):
    from mrgd.pipeline import MRGDPipeline

    seg = make_tiny_clipseg(tiny_components["tokenizer"])
    return MRGDPipeline(**tiny_components, guidance_model=seg, guidance_tokenizer=tiny_components["tokenizer"],
                        name="tiny")


def run_cli(capsys, *args):
    """Run the `mrgd` entry point in-process: (exit code, stdout, stderr)."""
    import sys

    from mrgd.cli import main

    argv = sys.argv
    sys.argv = ["mrgd", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return exit_.value.code, out, err
