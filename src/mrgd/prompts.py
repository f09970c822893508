"""Prompt encoding: text -> the embedding the UNet sees, and what sits at each of its positions.

Prompts are written as in the WebUI (method.md §4, last lines): `(word:1.3)` emphasis and prompts longer than the
text encoder's 75-token window. Attention control (word swap, refine) and keyword selection index attention maps
by token position, so every per-position list of `EncodedPrompt` is aligned with the rows of `embeds`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

CHUNK = 75  # prompt tokens per text-encoder window; each window is BOS + 75 tokens + EOS/padding = 77
WORD_END = "</w>"  # CLIP's BPE marks the last piece of every word with it

# The WebUI's emphasis tokens: escapes, brackets, an explicit weight closing a round bracket, plain text.
_EMPHASIS = re.compile(r"""
      \\[()\[\]\\]                              # escaped bracket or backslash: literal
    | \( | \[
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)      # (text:1.3)
    | \) | \]
    | [^\\()\[\]:]+
    | [\\:]                                     # a lone backslash or colon is literal text
""", re.VERBOSE)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split WebUI emphasis syntax into (text, weight) runs (method.md §4).

    `(a)` ×1.1, `((a))` ×1.21, `(a:1.3)` ×1.3, `[a]` ÷1.1, nesting multiplies, `\\(` is a literal bracket;
    unclosed brackets apply to the end of the text and stray closing brackets are literal, as in the WebUI.
    Adjacent runs of equal weight are merged, so text without syntax comes back as one run of weight 1.
    """
    runs: list[list] = []  # [text, weight]
    round_open: list[int] = []  # index of the first run inside each open bracket
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _EMPHASIS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            runs.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            runs.append([token, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)

    merged: list[tuple[str, float]] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


@dataclass
class EncodedPrompt:
    """An encoded prompt; every list has one entry per position of `embeds` (chunk BOS/EOS/padding included)."""

    embeds: torch.Tensor  # [1, L, D], what the UNet's cross-attention reads; L = 77 · chunks
    token_ids: list[int]  # position i <-> embeds[:, i]
    length: int  # prompt tokens + 2 (BOS, EOS): equal lengths let word swap pair positions one to one
    weights: list[float] = field(default_factory=list)  # emphasis weight, 1.0 at BOS/EOS/padding
    tokens: list[str] = field(default_factory=list)  # BPE pieces, e.g. "red</w>", "<|endoftext|>"
    part_of: list[str | None] = field(default_factory=list)  # named part a token comes from; None elsewhere
    real_positions: list[int] = field(default_factory=list)  # prompt tokens: not BOS/EOS/padding
    pooled: torch.Tensor | None = None  # [1, P]: the pooled text embedding of families that use one (SDXL)
    zero: bool = False  # all-zero embeddings (SDXL's empty negative prompt): padded with zeros, not with ""

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


class PromptEncoder:
    """Encode prompts like the WebUI (emphasis, 75-token chunks), with a per-run cache.

    A prompt of at most 75 tokens without emphasis gives exactly diffusers' embedding: StableDiffusionPipeline's
    with one text tower, StableDiffusionXLPipeline's with SDXL's two (`families.StableDiffusionXLFamily.towers`:
    each tower's hidden states concatenated, the pooled embedding from the first chunk of the pooled tower, as
    the WebUI does for long prompts). `zero_empty_negative`: an empty negative prompt is all zeros (SDXL).
    """

    def __init__(self, tokenizer, text_encoder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 *, towers: Sequence | None = None, zero_empty_negative: bool = False):
        from .families import TextTower

        self.towers = list(towers) if towers else [TextTower(tokenizer, text_encoder)]
        self.tokenizer = self.towers[0].tokenizer  # all towers share CLIP's vocabulary; they differ in padding
        self.device, self.dtype = torch.device(device), dtype
        self.zero_empty_negative = zero_empty_negative
        self._cache: dict[tuple, EncodedPrompt] = {}

    def encode(self, text: str) -> EncodedPrompt:
        """Encode one prompt; its tokens get `part_of` None."""
        return self.encode_parts([(None, text)])

    @torch.no_grad()
    def encode_parts(self, parts: Sequence[tuple[str | None, str]], sep: str = ", ") -> EncodedPrompt:
        """Encode `sep.join` of the non-empty part texts, remembering which named part each token comes from.

        r_total's prompt is `[(None, global), (region id, region prompt), ...]` (method.md §1): keyword candidates
        are then `positions_of(encoded, region id)` (§4). Emphasis is parsed per part; separators weigh 1.
        """
        key = (tuple((name, text) for name, text in parts), sep)
        if key in self._cache:
            return self._cache[key]
        ids, weights, owners = self._tokenize(parts, sep)
        tok = self.tokenizer
        all_ids, all_weights, all_owners, real, embeds, pooled = [], [], [], [], [], None
        for start in range(0, max(len(ids), 1), CHUNK):
            chunk = ids[start : start + CHUNK]
            pad = CHUNK - len(chunk)
            chunk_ids = [tok.bos_token_id, *chunk, tok.eos_token_id] + [tok.pad_token_id] * pad
            chunk_weights = [1.0, *weights[start : start + CHUNK], 1.0] + [1.0] * pad
            real += range(len(all_ids) + 1, len(all_ids) + 1 + len(chunk))
            all_ids += chunk_ids
            all_weights += chunk_weights
            all_owners += [None, *owners[start : start + CHUNK], None] + [None] * pad
            chunk_embeds, chunk_pooled = self._encode_chunk(chunk_ids, len(chunk) + 2, chunk_weights)
            embeds.append(chunk_embeds)
            pooled = chunk_pooled if pooled is None else pooled
        encoded = EncodedPrompt(torch.cat(embeds, dim=1), all_ids, len(ids) + 2, all_weights,
                                tok.convert_ids_to_tokens(all_ids), all_owners, real, pooled)
        self._cache[key] = encoded
        return encoded

    def encode_negative(self, text: str) -> EncodedPrompt:
        """A negative prompt: as `encode`, except that an empty one is all zeros where the family says so."""
        if text or not self.zero_empty_negative:
            return self.encode(text)
        empty = self.encode("")
        return replace(empty, embeds=torch.zeros_like(empty.embeds),
                       pooled=None if empty.pooled is None else torch.zeros_like(empty.pooled), zero=True)

    def pad_to_same_length(self, prompts: Sequence[EncodedPrompt]) -> list[EncodedPrompt]:
        """`pad_to_same_length` with this encoder's empty prompt as the padding chunk."""
        return pad_to_same_length(prompts, self.encode(""))

    def words(self, encoded: EncodedPrompt, positions: list[int]) -> list[str]:
        """Readable BPE pieces at the given positions (see `word_spans` for whole words)."""
        return [_readable([encoded.tokens[p]]) for p in positions]

    def _tokenize(self, parts, sep: str) -> tuple[list[int], list[float], list[str | None]]:
        """Prompt token ids (no BOS/EOS), their weights and owning parts."""
        runs: list[tuple[str, float, str | None]] = []
        for name, text in parts:
            if not text:  # skipped like layout's join, so the tokens equal those of the joined prompt
                continue
            if runs:
                runs.append((sep, 1.0, None))
            runs += [(piece, weight, name) for piece, weight in parse_weighted(text)]
        if not runs:
            return [], [], []
        # Each run is tokenized alone, as the WebUI does; for one run this is the tokenization of the whole text.
        pieces = self.tokenizer([r[0] for r in runs], add_special_tokens=False, verbose=False).input_ids
        ids, weights, owners = [], [], []
        for (_, weight, name), run_ids in zip(runs, pieces):
            ids += run_ids
            weights += [weight] * len(run_ids)
            owners += [name] * len(run_ids)
        return ids, weights, owners

    def _encode_chunk(self, ids: list[int], used: int, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One 77-token window through every tower: ([1, 77, ΣD], pooled [1, P] or None)."""
        hidden, pooled = [], None
        for tower in self.towers:
            # the towers' tokenizers differ only in the padding token (SDXL's second pads with "!")
            tower_ids = ids[:used] + [tower.tokenizer.pad_token_id] * (len(ids) - used)
            input_ids = torch.tensor([tower_ids]).to(self.device)
            mask = None
            if getattr(tower.encoder.config, "use_attention_mask", False):
                mask = (torch.arange(len(ids)) < used).long()[None].to(self.device)  # BOS..EOS, as the tokenizer's
            out = tower.encoder(input_ids, attention_mask=mask, output_hidden_states=tower.hidden_layer is not None)
            z = out[0] if tower.hidden_layer is None else out.hidden_states[tower.hidden_layer]
            if tower.pooled:
                pooled = out.text_embeds.to(self.dtype)
            hidden.append(_emphasise(z, weights).to(self.dtype))
        return (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)), pooled


def _emphasise(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """WebUI emphasis: scale each token's vector, then restore the chunk's mean so the overall scale holds."""
    if all(w == 1.0 for w in weights):
        return z
    z = z.float()
    mean = z.mean()
    z = z * torch.tensor(weights, device=z.device)[None, :, None]
    return z * (mean / z.mean())


def pad_to_same_length(prompts: Sequence[EncodedPrompt], empty: EncodedPrompt) -> list[EncodedPrompt]:
    """Append `empty` chunks (the encoded "") to shorter prompts so all can share one UNet batch (WebUI behaviour);
    an all-zero prompt (`zero`) is padded with zeros.

    `length`, `real_positions` and the original positions are unchanged.
    """
    target = max(p.embeds.shape[1] for p in prompts)
    padded = []
    for p in prompts:
        missing, rest = divmod(target - p.embeds.shape[1], empty.embeds.shape[1])
        if rest:
            raise ValueError(f"prompt lengths {p.embeds.shape[1]} and {target} are not whole chunks apart")
        if not missing:
            padded.append(p)
            continue
        chunk = torch.zeros_like(empty.embeds) if p.zero else empty.embeds
        padded.append(replace(
            p, embeds=torch.cat([p.embeds, *[chunk.to(p.embeds)] * missing], dim=1),
            token_ids=p.token_ids + empty.token_ids * missing, weights=p.weights + empty.weights * missing,
            tokens=p.tokens + empty.tokens * missing, part_of=p.part_of + [None] * (len(empty.token_ids) * missing)))
    return padded


def word_spans(encoded: EncodedPrompt) -> list[tuple[str, list[int]]]:
    """Readable words with their positions: BPE pieces merged up to the piece ending a word (method.md §4).

    A word cut by a chunk boundary keeps pieces on both sides; BOS/EOS/padding are never part of a word.
    """
    spans: list[tuple[str, list[int]]] = []
    pieces: list[str] = []
    positions: list[int] = []
    for position in encoded.real_positions:
        pieces.append(encoded.tokens[position])
        positions.append(position)
        if pieces[-1].endswith(WORD_END):
            spans.append((_readable(pieces), positions))
            pieces, positions = [], []
    if pieces:
        spans.append((_readable(pieces), positions))
    return spans


def positions_of(encoded: EncodedPrompt, part: str) -> list[int]:
    """Positions of the tokens of a named part of `encode_parts` (separators excluded); [] if it has none."""
    return [i for i, owner in enumerate(encoded.part_of) if owner == part]


def _readable(pieces: list[str]) -> str:
    """BPE pieces -> text: CLIP spells bytes as printable characters (GPT-2's table), so map them back."""
    decoder = _byte_decoder()
    data = bytearray()
    for char in "".join(pieces).replace(WORD_END, ""):
        if char in decoder:
            data.append(decoder[char])
        else:
            data += char.encode()
    return data.decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(moved)})
    return table
