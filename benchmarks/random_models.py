"""Full-size model families with random weights, from the architecture configs shipped in the package.

Real SD 1.5 / SDXL / CLIPSeg weights cannot be downloaded here; their architectures can be built from their public
config numbers (`src/mrgd/assets/families/*.json`), which is what speed and memory depend on. The guidance model is
CLIPSeg rd64 (transformers' default CLIPSegConfig: ViT-B/16, reduce_dim 64, read at 352 px as CIDAS/clipseg-rd64),
and the tiny decoder is diffusers' default AutoencoderTiny (TAESD's architecture, also TAESDXL's).
"""

from __future__ import annotations

import torch

from mrgd.checkpoint import TOKENIZER_DIR, family_template

FAMILIES = {"sd15": "sd1", "sdxl": "sdxl", "sd2": "sd2"}


def _text(spec: dict):
    import transformers

    cls = getattr(transformers, spec["_class"])
    return cls(cls.config_class(**spec["config"]))


def random_pipeline(arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    guidance: bool = True, tiny_decoder: bool = True, seed: int = 0):
    """An MRGDPipeline of a full-size architecture with random weights (and CLIPSeg rd64, a TAESD decoder)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer

    from mrgd.pipeline import MRGDPipeline

    template = family_template(FAMILIES[arch])
    torch.manual_seed(seed)
    # built where they will run: initialising SDXL's 2.6 G UNet parameters on a GPU takes a second, on a CPU minutes
    with torch.device(device):
        parts = {
            "unet": UNet2DConditionModel.from_config(template["unet"]),
            "vae": AutoencoderKL.from_config(template["vae"]),
            "text_encoder": _text(template["text_encoder"]),
        }
        if "text_encoder_2" in template:
            parts["text_encoder_2"] = _text(template["text_encoder_2"])
        if guidance:
            parts["guidance_model"] = CLIPSegForImageSegmentation(CLIPSegConfig())
        if tiny_decoder:
            parts["guidance_vae"] = AutoencoderTiny()
    # the scheduler's tables stay on the CPU, where diffusers keeps them
    parts["scheduler"] = DDIMScheduler.from_config(template["scheduler"])
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **template["tokenizer"])
    if "tokenizer_2" in template:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **template["tokenizer_2"])
    if guidance:
        parts["guidance_tokenizer"] = parts["tokenizer"]
    pipe = MRGDPipeline(**parts, device=device, dtype=dtype, name=f"{arch} (random weights)")
    if guidance:
        pipe.guidance_size = 352  # CIDAS/clipseg-rd64's processor size
    return pipe


def diffusers_pipeline(pipe):
    """The plain diffusers pipeline on the same components (DDIM), to compare against."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if pipe.family.name == "sdxl":
        plain = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                                          tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                                          scheduler=pipe.scheduler, add_watermarker=False)
    else:
        plain = StableDiffusionPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    return plain
