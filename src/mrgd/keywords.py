"""Keyword selection by the entropy of cross-attention maps (method.md §4, Eq. 6).

A token whose map is concentrated on a few pixels (a low-entropy histogram) names something visible in the
picture; those tokens become each region's keywords for guidance (§6) and KSSA (§5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .prompts import EncodedPrompt, word_spans

LEVELS = 256


def map_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each map's 256-level histogram; `maps[..., P]` -> `[...]` (method.md §4).

    Each map is scaled to 0…255 by its maximum and floored to integers (as a uint8 cast does), so only the peak
    reaches level 255. A map with no positive value carries no information and gets +inf: never selected.
    """
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0).clamp_min(0)
    peak = maps.amax(dim=-1, keepdim=True)
    levels = torch.floor(maps / peak.clamp_min(torch.finfo(maps.dtype).tiny) * (LEVELS - 1))
    levels = levels.clamp(0, LEVELS - 1).long()
    counts = torch.zeros(*maps.shape[:-1], LEVELS, dtype=torch.float64, device=maps.device)
    counts.scatter_add_(-1, levels, torch.ones_like(levels, dtype=torch.float64))
    p = counts / maps.shape[-1]
    entropy = -torch.special.xlogy(p, p).sum(-1) / math.log(2)
    return torch.where(peak[..., 0] > 0, entropy, torch.inf).float()


def spatial_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each map read as a distribution over pixels, p(j) = A(j) / Σ A; `[..., P]` -> `[...]`.

    Ours, and the default (`Settings.keyword_entropy`), beside §4's histogram entropy: a focused map (an object)
    scores low, a flat map scores the most, log2 P, where the histogram entropy scores a flat map 0 bits, as if it
    marked one thing. On shapes-v3, whose quality words attend uniformly, precision is 1.00 here against 0.77 for
    the histogram (benchmarks/results/keywords*.md); on shapes-v2, whose quality words carried focused maps, both
    were near 0.69.
    """
    maps = torch.nan_to_num(maps.detach().float(), nan=0.0).clamp_min(0)
    total = maps.sum(dim=-1, keepdim=True)
    p = (maps / total.clamp_min(torch.finfo(maps.dtype).tiny)).double()
    entropy = -torch.special.xlogy(p, p).sum(-1) / math.log(2)
    return torch.where(total[..., 0] > 0, entropy, torch.inf).float()


ENTROPIES = {"histogram": map_entropy, "spatial": spatial_entropy}


def select_keywords(maps: torch.Tensor, candidates: dict[str, list[int]], k: int | Mapping[str, int],
                    entropy: str = "histogram", words: list[list[int]] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Per region, the k candidate positions with the lowest map entropy, lowest first (method.md §4, N_k = 15).

    `maps[T, P]` are r_total's averaged maps per token position; `candidates` maps a region id to the positions of
    its region-prompt tokens in r_total's prompt (never global-prompt tokens, separators, BOS/EOS/padding: the
    caller builds them with `prompts.positions_of`). `k` is one count for all regions or a count per region id.
    Fewer candidates than k: all of them; ties go to the earlier.

    With `words` (each word's positions, `prompts.word_spans`) the unit of selection is the word (ours,
    `Settings.keyword_unit`): a word scores the *highest* entropy of its pieces, k counts words, and every piece of
    a chosen word is returned with the word's score. A word the tokenizer does not know falls apart into byte-level
    pieces with embeddings no caption trained; one of several such pieces often has a focused map by chance, which
    per-token selection (§4) then takes for an object (precision 0.71 on held-out fillers, 0.99 by words:
    benchmarks/results/keywords-held-out.md).
    """
    counts = {region: (k[region] if isinstance(k, Mapping) else k) for region in candidates}
    negative = {region: n for region, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"k must be >= 0, got {negative}")
    entropy = ENTROPIES[entropy](maps).tolist()
    selected = {}
    for region, positions in candidates.items():
        outside = [p for p in positions if not 0 <= p < len(entropy)]
        if outside:
            raise ValueError(f"region {region!r}: positions {outside} outside the {len(entropy)} maps")
        if words is None:
            scored = sorted((entropy[p], p) for p in set(positions) if math.isfinite(entropy[p]))
            selected[region] = [(p, h) for h, p in scored[:counts[region]]]
            continue
        mine = set(positions)
        groups = [[p for p in word if p in mine] for word in words]
        groups += [[p] for p in sorted(mine - {p for word in words for p in word})]  # a position in no word
        scored = sorted((max(entropy[p] for p in g), g[0], g) for g in groups if g)
        scored = [item for item in scored if math.isfinite(item[0])]
        selected[region] = [(p, h) for h, _, g in scored[:counts[region]] for p in g]
    return selected


class MapAccumulator:
    """Running mean of cross-attention probability maps over rows, heads and calls (method.md §4).

    Feed it the cross-attention layers of one resolution (the caller filters: the second-lowest UNet level) and
    the rows of r_total's conditional pass of one image; every `add` counts as one call.
    """

    def __init__(self):
        self.hw: tuple[int, int] | None = None
        self.count = 0
        self._sum: torch.Tensor | None = None  # [tokens, N]

    def add(self, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """Add `probs[rows, heads, N, tokens]` of a layer whose N query pixels form an `hw` grid."""
        if probs.shape[2] != hw[0] * hw[1]:
            raise ValueError(f"{probs.shape[2]} query pixels do not form a {hw[0]}x{hw[1]} grid")
        if self.hw is not None and tuple(hw) != self.hw:
            raise ValueError(f"maps at {hw} mixed with maps at {self.hw}: collect one resolution")
        mean = probs.detach().float().mean(dim=(0, 1)).T  # [tokens, N]
        if self._sum is not None and mean.shape != self._sum.shape:
            raise ValueError(f"maps of {mean.shape[0]} tokens mixed with maps of {self._sum.shape[0]}")
        self._sum = mean if self._sum is None else self._sum + mean
        self.hw, self.count = tuple(hw), self.count + 1

    def maps(self) -> torch.Tensor:
        """The mean map per token, `[tokens, N]` (reshape to `hw` for pictures)."""
        if self._sum is None:
            raise ValueError("no attention maps collected")
        return self._sum / self.count


def keywords_to_words(encoded: EncodedPrompt, selected: list[tuple[int, float]]) -> list[dict]:
    """One region's selected positions as readable words `{"word", "entropy"}`, lowest entropy first (§4).

    A word chosen through several of its sub-word pieces, or appearing twice, is listed once with its lowest
    entropy: the list becomes guidance text, where repeats add nothing.
    """
    word_at = {p: word for word, positions in word_spans(encoded) for p in positions}
    best: dict[str, float] = {}
    for position, entropy in selected:
        if position not in word_at:
            raise ValueError(f"position {position} is not a prompt token")
        word = word_at[position]
        best[word] = min(best.get(word, math.inf), entropy)
    return [{"word": w, "entropy": h} for w, h in sorted(best.items(), key=lambda item: item[1])]


def word_positions(encoded: EncodedPrompt, positions: list[int]) -> list[int]:
    """The positions whose token carries a letter or digit: commas and other punctuation are never keywords (§4)."""
    return [p for p in positions if any(ch.isalnum() for ch in encoded.tokens[p].replace("</w>", ""))]


class KeywordTracker:
    """Keyword selection during sampling (method.md §4): collect r_total's maps, select at the chosen steps.

    The pipeline tells it, per UNet call, which batch rows are r_total's conditional rows and of which image;
    the attention processors hand it the probabilities of every cross-attention layer at `level`.
    """

    def __init__(self, level: int, hw: tuple[int, int], select_at: list[int], k: int | dict[int, dict[str, int]],
                 totals: dict[int, EncodedPrompt], candidates: dict[int, dict[str, list[int]]],
                 entropy: str = "histogram", unit: str = "token"):
        self.level, self.hw, self.select_at, self.k, self.entropy = level, hw, set(select_at), k, entropy
        self.unit = unit  # "word": select whole words (select_keywords' `words`), "token": §4's pieces
        self.totals, self.candidates = totals, candidates
        self.accumulators = {image: MapAccumulator() for image in totals}
        self.selected: dict[int, dict[str, list[tuple[int, float]]]] = {}
        self.row_images: list[int] = []  # image of each recorded row in the call in flight

    def record(self, name: str, level: int, probs: torch.Tensor) -> None:
        """Attention-processor callback: probs[rows, heads, N, tokens] of the recorded rows."""
        if level != self.level:
            return
        for n, image in enumerate(self.row_images):
            self.accumulators[image].add(probs[n : n + 1], self.hw)

    def after_step(self, step: int) -> bool:
        """Select keywords if this is a selection step; True when a selection was made."""
        if step not in self.select_at:
            return False
        for image, acc in self.accumulators.items():
            if acc.count:
                k = self.k[image] if isinstance(self.k, dict) else self.k
                words = [ps for _, ps in word_spans(self.totals[image])] if self.unit == "word" else None
                self.selected[image] = select_keywords(acc.maps(), self.candidates[image], k, self.entropy, words)
        return bool(self.selected)

    def positions(self, image: int) -> list[int]:
        """All selected token positions of an image's r_total prompt (for KSSA)."""
        return sorted({p for chosen in self.selected.get(image, {}).values() for p, _ in chosen})

    def words(self, image: int) -> dict[str, list[dict]]:
        """Region id -> selected words with entropies, lowest first."""
        return {rid: keywords_to_words(self.totals[image], chosen) for rid, chosen in self.selected.get(image, {}).items()}

    def word_maps(self, image: int) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """Region id -> (word, averaged map [N]) for each selected word (sub-word maps averaged)."""
        if not self.accumulators[image].count:
            return {}
        maps = self.accumulators[image].maps()
        spans = {p: (word, positions) for word, positions in word_spans(self.totals[image]) for p in positions}
        out: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for rid, chosen in self.selected.get(image, {}).items():
            seen = set()
            for p, _ in chosen:
                word, positions = spans[p]
                if word not in seen:
                    seen.add(word)
                    out.setdefault(rid, []).append((word, maps[positions].mean(0).cpu()))
        return out
