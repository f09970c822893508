"""Tiny random-weight SD 1.x-, SD 2.x- and SDXL-shaped families, built from configs as diffusers' tests do.

Unlike conftest's toy family they use CLIP's real 49408-token vocabulary and follow each family's rules for
what a state dict cannot say (heads, activations, norm groups), so a single file written from them loads back
through the package's shipped configs exactly as a real checkpoint of the family would.
"""

from __future__ import annotations

import torch

from mrgd.checkpoint import TOKENIZER_DIR, family_template


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token)


def _text(template: dict, cls_name: str, hidden: int, seed: int, **extra):
    import transformers

    config = {**template["config"], "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
              "num_attention_heads": max(1, hidden // 64), **extra}
    torch.manual_seed(seed)
    cls = getattr(transformers, cls_name)
    return cls(cls.config_class(**config))


def _vae(template: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = {k: v for k, v in template.items() if not k.startswith("_")}
    config.update(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    return AutoencoderKL(**config)


def _scheduler(template: dict, **overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config({**template, **overrides})


def tiny_sd1(seed: int = 0) -> dict:
    """StableDiffusionPipeline components: 3 UNet levels (attention at two), layers 1, 8 heads."""
    from diffusers import UNet2DConditionModel

    t = family_template("sd1")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{
        **{k: v for k, v in t["unet"].items() if not k.startswith("_")},
        "sample_size": 8, "block_out_channels": (32, 64, 64), "layers_per_block": 1, "cross_attention_dim": 64,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")})
    return dict(unet=unet, vae=_vae(t["vae"], seed + 1), text_encoder=_text(t["text_encoder"], "CLIPTextModel", 64, seed + 2),
                tokenizer=_tokenizer(t["tokenizer"]["pad_token"]), scheduler=_scheduler(t["scheduler"]))


def tiny_sd2(seed: int = 0) -> dict:
    """An SD 2.x-shaped family: linear projections, 64 channels per head, OpenCLIP-style gelu text tower, v-prediction."""
    from diffusers import UNet2DConditionModel

    t = family_template("sd2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{
        **{k: v for k, v in t["unet"].items() if not k.startswith("_")},
        "sample_size": 8, "block_out_channels": (64, 64, 128), "layers_per_block": 1, "cross_attention_dim": 64,
        "attention_head_dim": (1, 1, 2),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")})
    return dict(unet=unet, vae=_vae(t["vae"], seed + 1), text_encoder=_text(t["text_encoder"], "CLIPTextModel", 64, seed + 2),
                tokenizer=_tokenizer(t["tokenizer"]["pad_token"]), scheduler=_scheduler(t["scheduler"]))


def tiny_sdxl(seed: int = 0) -> dict:
    """StableDiffusionXLPipeline components with SDXL's layout: no attention at the top level, 2 and 3
    transformer layers per block below it (SDXL: 2 and 10), two text towers, text_time conditioning."""
    from diffusers import UNet2DConditionModel

    t = family_template("sdxl")
    pooled = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{
        **{k: v for k, v in t["unet"].items() if not k.startswith("_")},
        "sample_size": 8, "block_out_channels": (32, 64, 64), "layers_per_block": 2, "cross_attention_dim": 64 + 128,
        "attention_head_dim": (1, 1, 1), "transformer_layers_per_block": (1, 2, 3), "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": pooled + 6 * 8})
    return dict(unet=unet, vae=_vae(t["vae"], seed + 1),
                text_encoder=_text(t["text_encoder"], "CLIPTextModel", 64, seed + 2),
                text_encoder_2=_text(t["text_encoder_2"], "CLIPTextModelWithProjection", 128, seed + 3,
                                     projection_dim=pooled),
                tokenizer=_tokenizer(t["tokenizer"]["pad_token"]), tokenizer_2=_tokenizer(t["tokenizer_2"]["pad_token"]),
                scheduler=_scheduler(t["scheduler"]))


def diffusers_pipeline(components: dict):
    """The diffusers pipeline of a tiny family (SD or SDXL, chosen by its components)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
