"""A token-grounding loss on the UNet's cross-attention, for training the shapes-world model only.

Stable Diffusion's cross-attention maps put an object word's attention on the object: keyword selection (method.md
§4) and KSSA (§5) rest on that. SD learned it from billions of pairs; a 5.9 M UNet trained for an hour on two cores
does not: its maps stay nearly flat (benchmarks/results/keywords.md, model v1). So, as TokenCompose (Wang et al.,
CVPR 2024) does for SD, the toy UNet is also taught, on whole scenes, that the attention of each colour, shape and
background word falls inside that thing's ground-truth mask: L = mean over (word, layer) of (1 − Σ_mask A / Σ A)².
Quality words got no term up to step 12600, and their maps came out as focused as object words' (a quality word after
an object phrase carries that object through the causal text encoder), so keyword selection could not tell them
apart (precision 0.68, benchmarks/results/keywords.md). SD's quality words spread their attention over the whole
picture, which is what the paper's entropy rule rests on; the toy UNet is taught that too: `diffuse_loss` pushes
the map of every word that names nothing (quality words, "a", "and") towards uniform.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, COLORS, SHAPES


class RecordingCrossAttention:
    """Cross-attention computed explicitly (the maps are needed with gradients); appends head-mean maps to `store`."""

    def __init__(self, store: list[torch.Tensor]):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # [batch * heads, pixels, tokens]
        batch = hidden_states.shape[0]
        self.store.append(probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def install(unet) -> list[torch.Tensor]:
    """Record every cross-attention layer above the 4x4 mid block; returns the list the maps go to."""
    store: list[torch.Tensor] = []
    processors = {}
    for name, processor in unet.attn_processors.items():
        grounded = name.endswith("attn2.processor") and not name.startswith("mid_block")
        processors[name] = RecordingCrossAttention(store) if grounded else processor
    unet.set_attn_processor(processors)
    return store


def word_targets(tokenizer, caption: str) -> list[tuple[int, int]]:
    """(token position, mask index) per grounded word: 0 the background, j + 1 the caption's j-th object.

    Objects are named in scene order ("a red circle and a blue star"), so the k-th colour and k-th shape word
    belong to object k. Token positions count the BOS at 0, as in the encoded prompt; words the tokenizer's
    truncation cuts off (past model_max_length − 2 tokens) have none.
    """
    targets, colors, shapes = [], 0, 0
    for position, token in _kept(tokenizer, caption):
        word = token.replace("</w>", "")
        if word in COLORS:
            colors += 1
            targets.append((position, colors))
        elif word in SHAPES:
            shapes += 1
            targets.append((position, shapes))
        elif word in BACKGROUNDS:
            targets.append((position, 0))
    return targets


def masks_at(labels: np.ndarray, size: int) -> torch.Tensor:
    """Label maps [B, H, W] (0 background, j + 1 object j) -> soft masks [B, 4, size * size] by area."""
    onehot = F.one_hot(torch.from_numpy(labels.astype(np.int64)), 4).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size).flatten(2)


def grounding_loss(maps: list[torch.Tensor], labels: np.ndarray, targets: list[list[tuple[int, int]]],
                   relative: bool = False) -> torch.Tensor:
    """mean (1 − attention mass inside the word's mask)² over grounded words and recorded layers.

    `maps[l]` is [B, pixels, tokens] for the batch whose rows have `labels[b]` and `targets[b]`. `relative` divides
    the miss by what a uniform map would miss, 1 − the mask's area: a background word's uniform map already puts
    70% of its mass on the background, so the plain loss barely asks it to avoid the objects; relative, every word
    scores 1 for a uniform map and 0 for a map inside its mask.
    """
    rows = [(b, position, index) for b, words in enumerate(targets) for position, index in words]
    if not rows or not maps:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    b, position, index = (torch.tensor(column) for column in zip(*rows))
    masks_by_size: dict[int, torch.Tensor] = {}  # several layers share a resolution: pool the labels once each
    losses = []
    for layer in maps:
        size = int(round(layer.shape[1] ** 0.5))
        if size not in masks_by_size:
            masks_by_size[size] = masks_at(labels, size)[b, index]  # [K, pixels]
        masks = masks_by_size[size]
        attention = layer[b, :, position]  # [K, pixels]
        inside = (attention * masks).sum(-1) / attention.sum(-1).clamp_min(1e-8)
        miss = 1 - inside
        if relative:  # a mask covering (nearly) everything asks for nothing
            miss = miss / (1 - masks.mean(-1)).clamp_min(0.05)
        losses.append(miss.pow(2).mean())
    return torch.stack(losses).mean()


def diffuse_positions(tokenizer, caption: str) -> list[int]:
    """Token positions (BOS at 0) of the caption's words that name nothing in the picture: every word token that is
    not a colour, shape or background (quality words and fillers). Punctuation is left alone: like EOS and padding,
    it is where attention may rest."""
    grounded = {position for position, _ in word_targets(tokenizer, caption)}
    return [position for position, token in _kept(tokenizer, caption)
            if position not in grounded and any(ch.isalnum() for ch in token.replace("</w>", ""))]


def _kept(tokenizer, caption: str) -> list[tuple[int, str]]:
    """(position, token) of the caption's tokens that survive truncation to model_max_length (BOS and EOS kept)."""
    tokens = tokenizer.tokenize(caption)[: tokenizer.model_max_length - 2]
    return list(enumerate(tokens, start=1))


def diffuse_loss(maps: list[torch.Tensor], positions: list[list[int]]) -> torch.Tensor:
    """mean (1 − H(p) / log P) over the given tokens and recorded layers, p a token's map read as a distribution
    over the P pixels: 0 for a uniform map, 1 for a map on one pixel.

    `maps[l]` is [B, pixels, tokens]; `positions[b]` are row b's tokens.
    """
    rows = [(b, position) for b, ps in enumerate(positions) for position in ps]
    if not rows or not maps:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    b, position = (torch.tensor(column) for column in zip(*rows))
    losses = []
    for layer in maps:
        attention = layer[b, :, position]  # [K, pixels]
        p = attention / attention.sum(-1, keepdim=True).clamp_min(1e-8)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        losses.append((1 - entropy / math.log(p.shape[-1])).mean())
    return torch.stack(losses).mean()
