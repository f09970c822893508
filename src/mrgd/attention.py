"""Per-region attention control through diffusers' attention-processor API (method.md §3, §5).

One UNet call denoises several crops at once (regions of equal crop size, source and target together).
`AttentionState` describes the batch rows of the call in flight: which job and image each row belongs to,
which target rows follow which source rows and how. `ControlledAttnProcessor` reads that state in every
attention layer; it computes an explicit attention matrix only where a row is edited or a map is recorded,
and keeps SDPA everywhere else. `controlled_attention` installs the processors for a run and restores the
UNet's own processors afterwards, also when the run fails.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .runtime import device_constant


# ---------------------------------------------------------------- schedules (pure)

def cross_alpha(call: int, fraction: float, steps: int, schedule: str = "linear") -> float:
    """Weight of the source's cross-attention at a region's call count (method.md §3).

    linear: α = 1 − c/E for c < E, else 0, with E = int(fraction·(N+1)); step: α = 1 for c < E, else 0.
    """
    end = int(fraction * (steps + 1))
    if call >= end:
        return 0.0
    return 1.0 if schedule == "step" else 1.0 - call / end


def self_replace_active(call: int, fraction: float, steps: int) -> bool:
    """Whether the target copies the source's self-attention at this call (c < int(s·N))."""
    return call < int(fraction * steps)


def refine_mapping(source_ids: list[int], target_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Align two token sequences globally; target token j takes source token mapper[j] where alpha[j] = 1.

    Target tokens with no source match (inserted or replaced words) get alpha 0: their own attention stays.
    """
    mapper = torch.arange(len(target_ids))
    alpha = torch.zeros(len(target_ids))
    matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            mapper[block.b + offset] = block.a + offset
            alpha[block.b + offset] = 1.0
    return mapper, alpha


# ---------------------------------------------------------------- the state of the call in flight

@dataclass
class Follow:
    """A target row following a source row in one UNet call."""

    source_row: int
    target_row: int
    cross_alpha: float  # blend weight of the edited source map in cross-attention
    self_replace: bool  # copy the source's self-attention (low-resolution layers only)
    mapper: torch.Tensor | None = None  # refine: target token j <- source token mapper[j]; None: same positions
    token_alpha: torch.Tensor | None = None  # refine: 1 for matched target tokens, 0 for new ones
    # [h, w] over the row's (padded) crop at latent resolution: where the row follows the source (1) or keeps its
    # own attention (0; Settings.own_attention_in). None: the whole row follows.
    follow_mask: torch.Tensor | None = None


def mask_at(mask: torch.Tensor, queries: int, level: int) -> torch.Tensor | None:
    """A latent-resolution [h, w] mask averaged to a layer `level` times downsampled, as [queries, 1]; None when the
    layer's query count is not that grid's."""
    h, w = -(-mask.shape[0] // 2**level), -(-mask.shape[1] // 2**level)
    if h * w != queries:
        return None
    return F.adaptive_avg_pool2d(mask[None, None], (h, w)).reshape(queries, 1)


@dataclass
class AttentionState:
    """What the processors need to know about the current UNet call."""

    low_levels: frozenset[int] = frozenset()  # UNet levels where self-attention may be replaced
    follows: list[Follow] = field(default_factory=list)
    # Called with (layer name, level, attention probs [B, heads, N, tokens]) for the cross-attention layers at
    # `record_level` when set and `record_rows` is not empty; used to collect maps for keyword selection. Maps
    # are computed only there: every other layer of the call keeps the fused SDPA path.
    recorder: Callable[[str, int, torch.Tensor], None] | None = None
    record_rows: list[int] = field(default_factory=list)
    record_level: int | None = None
    # KSSA: rows whose self-attention key columns are scaled, per level, and the keyword token positions.
    kssa_rows: list[int] = field(default_factory=list)
    kssa_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> keyword token positions
    kssa_scale: float = 1.5
    kssa_levels: frozenset[int] = frozenset()
    _kssa_pixels: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> [rows, N] bool
    # Rows touched per (kind, level) over the run: "cross" and "self" replacement, "record" (keyword maps),
    # "kssa_pick" (pixels chosen in cross-attention) and "kssa_scale" (key columns scaled in self-attention).
    # Cheap integer counts; they show which controls fired where (info.json, tests on other UNet layouts).
    fired: Counter = field(default_factory=Counter)

    def reset_call(self) -> None:
        self.follows, self.record_rows, self.kssa_rows = [], [], []
        self.kssa_tokens, self._kssa_pixels = {}, {}
        self.recorder = None


def layer_level(name: str, num_blocks: int) -> int:
    """How many times the UNet has downsampled before this attention layer (0 = full latent resolution)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_blocks - 1 - int(parts[1])
    return num_blocks - 1  # mid_block


def attention_levels(unet) -> list[int]:
    """Levels that hold attention layers, finest first."""
    n = len(unet.config.block_out_channels)
    return sorted({layer_level(name, n) for name in unet.attn_processors})


def map_level(unet) -> int | None:
    """The level whose attention maps the method reads: keyword maps (§4) are averaged there, and self-attention
    is replaced there and below (§3). None when the encoder has no attention at all.

    Chosen by the maps' resolution relative to the latent, not by block index: the encoder level whose maps are
    closest to a quarter of the latent's side (the finer on a tie). That is 16×16 for SD 1.x/2.x at 512² (method.md's
    "second-lowest resolution", and its self-replacement bound of (H/32)·(W/32) queries), 32×32 for SDXL at 1024²
    (whose encoder has attention at latent/2 and latent/4 only), and 8×8 of the embedded model's 16×16 latent (its
    encoder has attention at latent/1 and latent/2).
    """
    n = len(unet.config.block_out_channels)
    down = {layer_level(name, n) for name in unet.attn_processors if name.startswith("down_blocks")}
    return min(down, key=lambda level: (abs(level - 2), level)) if down else None


def self_replace_levels(unet) -> frozenset[int]:
    """Levels where self-attention may be replaced: the map level and every coarser one (§3)."""
    level = map_level(unet)
    return frozenset(l for l in attention_levels(unet) if level is not None and l >= level)


class ControlledAttnProcessor:
    """diffusers' SDPA attention, plus per-row cross/self-attention replacement, recording and KSSA."""

    def __init__(self, state: AttentionState, name: str, level: int, is_cross: bool, kssa_target: bool = True):
        self.state, self.name, self.level, self.is_cross = state, name, level, is_cross
        self.in_down = name.startswith("down_blocks")
        self.kssa_target = kssa_target  # may this self-attention layer receive KSSA (§5)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            seq = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self._attend(attn, query, key, value, attention_mask)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, attn, query, key, value, mask):
        state = self.state
        scale = attn.scale if hasattr(attn, "scale") else 1 / math.sqrt(query.shape[-1])
        if self.is_cross:
            follows = [f for f in state.follows if f.cross_alpha > 0]
            explicit = bool(follows) or self._records()
            if self._kssa_source():
                self._remember_kssa_pixels(query, key, mask, scale)
        else:
            follows = [f for f in state.follows if f.self_replace] if self.level in state.low_levels else []
            explicit = bool(follows)
            key = self._kssa_keys(key)
        if not explicit:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        # explicit maps in fp32: half-precision logits overflow in some models (SD 2.x asks for upcast_attention)
        logits = (query @ key.transpose(-1, -2)).float() * scale
        if mask is not None:
            logits = logits + mask
        probs = logits.softmax(dim=-1)
        if self.is_cross and self._records():
            state.recorder(self.name, self.level, probs[device_constant(tuple(state.record_rows), probs.device)])
            state.fired["record", self.level] += len(state.record_rows)
        if follows:
            probs = probs.clone()
            for f in follows:
                probs[f.target_row] = self._edit(probs[f.source_row], probs[f.target_row], f)
            state.fired["cross" if self.is_cross else "self", self.level] += len(follows)
        return probs.to(value.dtype) @ value

    def _records(self) -> bool:
        state = self.state
        return state.recorder is not None and bool(state.record_rows) and self.level == state.record_level

    def _edit(self, source: torch.Tensor, target: torch.Tensor, f: Follow) -> torch.Tensor:
        if not self.is_cross:
            edited = source
        else:
            edited = source
            if f.mapper is not None:
                edited = source[..., f.mapper] * f.token_alpha + target * (1 - f.token_alpha)
            edited = f.cross_alpha * edited + (1 - f.cross_alpha) * target
        keep = None if f.follow_mask is None else mask_at(f.follow_mask, target.shape[-2], self.level)
        if keep is None:
            return edited
        keep = keep.to(target)
        return keep * edited + (1 - keep) * target

    # KSSA (method.md §5): keyword logits in a down-block cross-attention pick the top half of pixels; the
    # next self-attention at that level scales those key columns, i.e. those key vectors, by the KSSA scale.
    def _kssa_source(self) -> bool:
        return bool(self.state.kssa_rows) and self.in_down and self.level in self.state.kssa_levels

    def _remember_kssa_pixels(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                              scale: float) -> None:
        """KSSA's pixels from the keyword columns of its rows' logits alone: the layer's output stays SDPA's, rather
        than every row's maps made explicit for a few columns of one or two rows (at SD's 64x64 level, 4096 x 77
        logits per head and row)."""
        state = self.state
        picked = []
        for row in state.kssa_rows:
            tokens = state.kssa_tokens[row]
            logits = (query[row] @ key[row][:, tokens].transpose(-1, -2)).float() * scale  # [heads, N, keywords]
            if mask is not None:
                logits = logits + mask[row][..., tokens]
            score = logits.sum(dim=(0, 2))  # over heads and keyword columns -> [N]
            top = score.topk(max(1, score.numel() // 2)).indices
            picked.append(torch.zeros_like(score, dtype=torch.bool).scatter_(0, top, True))
        state._kssa_pixels[self.level] = torch.stack(picked)
        state.fired["kssa_pick", self.level] += len(picked)

    def _kssa_keys(self, key: torch.Tensor) -> torch.Tensor:
        state = self.state
        # the next self-attention at this resolution: in SD the next down-block layer; with one layer per block
        # the decoder's layer at the same resolution
        pixels = state._kssa_pixels.pop(self.level, None) if self.kssa_target else None
        if pixels is None or pixels.shape[-1] != key.shape[-2]:
            return key
        factor = torch.ones(key.shape[0], 1, key.shape[2], 1, dtype=key.dtype, device=key.device)
        # arithmetic rather than boolean indexing, which would wait for the GPU to count the pixels
        rows = device_constant(tuple(state.kssa_rows), key.device)
        factor[rows, 0, :, 0] = 1 + (state.kssa_scale - 1) * pixels.to(key.dtype)
        state.fired["kssa_scale", self.level] += len(state.kssa_rows)
        return key * factor


def _kssa_target(name: str, names, num_blocks: int) -> bool:
    """KSSA lands on the next self-attention of the same resolution in the down blocks (§5). A down block with a
    single attention layer has no next one there, so its resolution's decoder layer takes it instead."""
    if name.endswith("attn2.processor"):
        return False
    if name.startswith("down_blocks"):
        return True
    if not name.startswith("up_blocks"):
        return False
    level = layer_level(name, num_blocks)
    down = [n for n in names if n.startswith(f"down_blocks.{level}.") and n.endswith("attn1.processor")]
    return len(down) == 1


@contextmanager
def controlled_attention(unet, state: AttentionState) -> Iterator[AttentionState]:
    """Install controlled processors on every attention layer for the duration of a run, then restore."""
    original = unet.attn_processors
    n = len(unet.config.block_out_channels)
    processors = {
        name: ControlledAttnProcessor(state, name, layer_level(name, n), name.endswith("attn2.processor"),
                                      _kssa_target(name, original, n))
        for name in original
    }
    unet.set_attn_processor(processors)
    try:
        yield state
    finally:
        unet.set_attn_processor(original)
