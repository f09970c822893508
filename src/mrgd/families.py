"""Model families: what differs between SD 1.x/2.x and SDXL, behind one small interface.

The sampler (`pipeline.py`) knows only the order of things. A family says three things it must not know:
how a prompt becomes the UNet's text conditioning (which text towers, which hidden layer, whether a pooled
embedding is kept), what extra conditioning every batch row of a UNet call needs, and whether an empty
negative prompt means "the empty prompt's embedding" or "zeros". The VAE's precision needs no family: any
VAE whose config asks for `force_upcast` runs in fp32 when the rest runs in fp16 (see `MRGDPipeline`).

Attention layers are not the family's business either: `attention.map_level` picks layers by the resolution
of their maps relative to the latent, which gives SD 1.x's 16×16 levels at 512² and SDXL's 32×32 at 1024²
from the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .runtime import device_constant


@dataclass
class TextTower:
    """One text encoder with its tokenizer, and which of its outputs the UNet reads."""

    tokenizer: Any
    encoder: Any
    hidden_layer: int | None = None  # None: the last hidden state (final layer norm applied); -2: penultimate
    pooled: bool = False  # this tower's projected end-of-text embedding conditions the UNet (SDXL's second)


class StableDiffusionFamily:
    """SD 1.x and 2.x: one CLIP text tower (last hidden state), text-only UNet conditioning.

    SD 2.x's "penultimate layer" is already baked into its diffusers text encoder (one layer fewer), so both
    versions read the last hidden state, exactly as `StableDiffusionPipeline` does.
    """

    name = "sd"
    zero_empty_negative = False

    def __init__(self, text_encoder, tokenizer):
        self.towers = [TextTower(tokenizer, text_encoder)]

    def unet_kwargs(self, pooled: list[torch.Tensor | None], offsets: list[tuple[int, int]],
                    canvas: tuple[int, int]) -> dict[str, Any]:
        """Extra keyword arguments of one UNet call (rows in batch order): none for SD 1.x/2.x."""
        return {}


class StableDiffusionXLFamily:
    """SDXL: two CLIP towers (penultimate hidden states concatenated; the pooled embedding of the second),
    and a UNet that also reads each row's pooled embedding and its size/crop `time_ids`.

    `time_ids` are (original H, W, crop top, crop left, target H, W) in pixels. A region's crop is a window cut
    from the canvas, which is what SDXL's crop conditioning describes: the sizes are the canvas's and the crop
    offset is the window's real place in it, so a full-canvas row gets diffusers' default (H, W, 0, 0, H, W).
    """

    name = "sdxl"

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt: bool = True):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise InputError("--model: an SDXL UNet needs its second text encoder (text_encoder_2, tokenizer_2); "
                             "load the whole SDXL pipeline folder or checkpoint")
        towers = [TextTower(tokenizer, text_encoder, -2)] if text_encoder is not None else []
        self.towers = towers + [TextTower(tokenizer_2, text_encoder_2, -2, pooled=True)]
        # diffusers' StableDiffusionXLPipeline: no negative prompt means zero embeddings, pooled included
        self.zero_empty_negative = force_zeros_for_empty_prompt

    def unet_kwargs(self, pooled: list[torch.Tensor | None], offsets: list[tuple[int, int]],
                    canvas: tuple[int, int]) -> dict[str, Any]:
        if any(p is None for p in pooled):
            raise ValueError("an SDXL UNet call needs a pooled text embedding for every row")
        text_embeds = torch.cat(pooled)
        height, width = canvas
        time_ids = device_constant(tuple((height, width, top, left, height, width) for top, left in offsets),
                                   text_embeds.device, text_embeds.dtype)
        return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


ModelFamily = StableDiffusionFamily | StableDiffusionXLFamily


def family_for(unet, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None,
               force_zeros_for_empty_prompt: bool = True) -> ModelFamily:
    """The family a UNet belongs to, read from its config: SDXL's UNet adds "text_time" conditioning."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return StableDiffusionXLFamily(text_encoder, tokenizer, text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt)
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise InputError(f"--model: UNet with addition_embed_type {unet.config.addition_embed_type!r} is not supported; "
                         "use an SD 1.x, SD 2.x or SDXL model")
    return StableDiffusionFamily(text_encoder, tokenizer)
