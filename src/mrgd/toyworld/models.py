"""Configs of the shapes-world model family: the same classes as Stable Diffusion, scaled down."""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPSegConfig, CLIPSegForImageSegmentation

IMAGE_SIZE = 128  # native size of the embedded model: 16 x 16 latents
CLIP_SIZE = 64  # CLIP input size
CLIPSEG_SIZE = 64  # CLIPSeg input size; 128 (16 x 16 patches) measured no better (0.59 vs 0.61 mIoU at a 0.2 threshold)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77)
VISION = dict(image_size=CLIP_SIZE, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)


def text_config(vocab_size: int, bos: int, eos: int) -> dict:
    return dict(TEXT, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def make_clip(vocab_size: int, bos: int, eos: int) -> CLIPModel:
    config = CLIPConfig(text_config=text_config(vocab_size, bos, eos), vision_config=VISION, projection_dim=128)
    return CLIPModel(config)


def make_clipseg(vocab_size: int, bos: int, eos: int) -> CLIPSegForImageSegmentation:
    config = CLIPSegConfig(
        text_config=text_config(vocab_size, bos, eos), vision_config=dict(VISION, image_size=CLIPSEG_SIZE),
        projection_dim=128,
        extract_layers=[1, 2, 3], reduce_dim=64, decoder_num_attention_heads=4, decoder_intermediate_size=256,
    )
    return CLIPSegForImageSegmentation(config)


def make_vae() -> AutoencoderKL:
    # Fully convolutional (no mid attention) so it trains on small crops; 4 groups: equal to the channel
    # count trained slowly and shifted colours in the probe.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False, sample_size=IMAGE_SIZE,
    )


def make_tiny_vae() -> AutoencoderTiny:
    # TAESD's layout at a quarter of its width: 16 channels suffice for what guidance needs (CLIPSeg reads 64 x 64
    # pixels), and its backward pass costs about a fifth of the VAE decoder's at 128 x 128.
    return AutoencoderTiny(encoder_block_out_channels=(16,) * 4, num_encoder_blocks=(1, 1, 1, 1),
                           decoder_block_out_channels=(16,) * 4, num_decoder_blocks=(2, 2, 1, 1))


def make_unet() -> UNet2DConditionModel:
    # Cross-attention at 16x16, 8x8 and the 4x4 mid block: three attention resolutions, as SD has
    # (64, 32, 16 and its 8x8 mid block at 512 px), so "second-lowest resolution" means the same thing.
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=TEXT["hidden_size"],
        attention_head_dim=4, norm_num_groups=16,
    )


def make_noise_scheduler() -> DDPMScheduler:
    # Stable Diffusion's training schedule, so DDIM defaults carry over unchanged.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1)
