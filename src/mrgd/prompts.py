"""Prompt encoding: text -> the embedding the UNet sees, and the token ids at the same positions.

Attention control (word swap, refine) and keyword selection index attention maps by token position, so every
consumer takes positions from `EncodedPrompt.token_ids`, which are exactly the rows of `EncodedPrompt.embeds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [1, L, D], what the UNet's cross-attention reads
    token_ids: list[int]  # L ids, position i <-> embeds[:, i]
    length: int  # tokens up to and including EOS (the rest is padding)


class PromptEncoder:
    """Encode prompts the way diffusers' StableDiffusionPipeline does, with a per-run cache."""

    def __init__(self, tokenizer, text_encoder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self._cache: dict[str, EncodedPrompt] = {}

    @torch.no_grad()
    def encode(self, text: str) -> EncodedPrompt:
        if text in self._cache:
            return self._cache[text]
        tok = self.tokenizer
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != tok.pad_token_id).long().to(self.device)
        embeds = self.text_encoder(ids.to(self.device), attention_mask=mask)[0].to(self.dtype)
        unpadded = tok(text, truncation=True, max_length=tok.model_max_length).input_ids
        encoded = EncodedPrompt(embeds, ids[0].tolist(), len(unpadded))
        self._cache[text] = encoded
        return encoded

    def words(self, encoded: EncodedPrompt, positions: list[int]) -> list[str]:
        """Readable tokens at the given positions."""
        return [self.tokenizer.convert_ids_to_tokens(encoded.token_ids[p]).replace("</w>", "") for p in positions]
