"""MultiDiffusion region fusion as small pure tensor functions (docs/method.md §1, §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Box fractions times a pixel size pick up float error (0.3 * 128 / 8 = 4.800000000000001);
# rounding to this many decimals before floor/ceil keeps exact values exact.
_ROUND_DECIMALS = 6


@dataclass(frozen=True)
class LatentBox:
    """A region's box in latent pixels, half-open: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def size(self) -> tuple[int, int]:
        return (self.h, self.w)

    @property
    def slices(self) -> tuple:
        """Index for the last two dims of any tensor: ``x[box.slices]`` is ``x[..., y0:y1, x0:x1]``."""
        return (Ellipsis, slice(self.y0, self.y1), slice(self.x0, self.x1))


def latent_box(
    box: tuple[float, float, float, float], image_size: tuple[int, int], factor: int = 8
) -> LatentBox:
    """Map a fractional box (x, y, w, h) on a (W, H) pixel canvas to latent pixels (method.md §1, "Box to latent").

    x0 = floor(x·W/f), y0 = floor(y·H/f), w = ceil(w·W/f), h = ceil(h·H/f), clamped to the latent canvas
    and at least one latent pixel wide and high.
    """
    x, y, w, h = box
    width, height = image_size
    latent_w, latent_h = width // factor, height // factor

    def scaled(fraction: float, size: int) -> float:
        return round(fraction * size / factor, _ROUND_DECIMALS)

    x0 = min(max(math.floor(scaled(x, width)), 0), latent_w - 1)
    y0 = min(max(math.floor(scaled(y, height)), 0), latent_h - 1)
    box_w = max(math.ceil(scaled(w, width)), 1)
    box_h = max(math.ceil(scaled(h, height)), 1)
    return LatentBox(y0=y0, y1=min(y0 + box_h, latent_h), x0=x0, x1=min(x0 + box_w, latent_w))


def feather_mask(h: int, w: int, ratio: float) -> Tensor:
    """Feather mask of an h×w box (method.md §2, "Feather mask"), float32 [h, w].

    r = floor(min(w, h)/2 · ratio); d = distance to the nearest box edge (edge pixels d = 0);
    weight (d/r)² where d < r, else 1; r = 0 gives all ones.
    """
    radius = math.floor(round(min(w, h) / 2 * ratio, _ROUND_DECIMALS))
    if radius <= 0:
        return torch.ones(h, w, dtype=torch.float32)
    rows = torch.arange(h, dtype=torch.float32)
    cols = torch.arange(w, dtype=torch.float32)
    dist_y = torch.minimum(rows, h - 1 - rows)
    dist_x = torch.minimum(cols, w - 1 - cols)
    dist = torch.minimum(dist_y[:, None], dist_x[None, :])
    return torch.where(dist < radius, (dist / radius) ** 2, torch.ones_like(dist))


def initial_noise(
    shape: tuple[int, ...],
    generator: torch.Generator,
    region_noise: list[tuple[LatentBox, int]],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial latent z_T with per-region seeded noise (method.md §2, "Initial noise").

    The global draw is exactly diffusers' ``prepare_latents`` for a CPU generator. Each (box, seed) draws
    N(0,1) noise of shape (B, C, box.h, box.w) from its own CPU generator; overlaps combine as
    Σ n_i / sqrt(count) so the variance stays 1. Pixels under no seeded box keep the global noise.
    """
    # Imported here so the rest of this module does not pay for importing diffusers.
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(shape, generator=generator, dtype=dtype)
    if not region_noise:
        return latents
    batch, channels = shape[0], shape[1]
    noise_sum = torch.zeros(shape, dtype=torch.float32)
    count = torch.zeros(shape[-2:], dtype=torch.float32)
    for box, seed in region_noise:
        region_generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((batch, channels, box.h, box.w), generator=region_generator, dtype=dtype)
        noise_sum[box.slices] += noise.float()
        count[box.slices] += 1
    covered = count > 0
    combined = (noise_sum / count.clamp(min=1).sqrt()).to(dtype)
    return torch.where(covered, combined, latents)


def composite(
    canvas: Tensor,
    backgrounds: list[tuple[LatentBox, Tensor]],
    foregrounds: list[tuple],
) -> Tensor:
    """Layered MultiDiffusion composite of region outputs (method.md §2, "Fusion").

    bg(p) = mean of covering background crops, or ``canvas`` (the global prompt's full-canvas output)
    where none covers p. Where foregrounds cover p: fg(p) = mean of their crops, m(p) = mean of their
    feather masks, z = (1 − m)·bg + m·fg; elsewhere z = bg. Crops are [B, C, h, w], masks [h, w].
    When ``needs_canvas_fallback`` is False the canvas values are never used (zeros will do).

    A foreground may be ``(box, crop, mask, weight)``, ``weight`` [h, w] in [0, 1] (ours; see `under_weights` and
    `clear_mask`): then fg(p) = Σ w_i·crop_i / Σ w_i and m(p) = Σ w_i·m_i / max(Σ w_i, 1), so weights of 1 give the
    means above exactly, a crop of weight 0 drops out, and where the weights sum below 1 the foreground fades
    towards the background.
    """
    # Accumulate in at least float32 so fp16 crops are averaged without extra rounding.
    acc_dtype = torch.promote_types(canvas.dtype, torch.float32)
    device = canvas.device
    hw = canvas.shape[-2:]

    bg_sum = torch.zeros(canvas.shape, dtype=acc_dtype, device=device)
    bg_count = torch.zeros(hw, dtype=acc_dtype, device=device)
    for box, crop in backgrounds:
        bg_sum[box.slices] += crop.to(acc_dtype)
        bg_count[box.slices] += 1
    background = torch.where(bg_count > 0, bg_sum / bg_count.clamp(min=1), canvas.to(acc_dtype))

    fg_sum = torch.zeros(canvas.shape, dtype=acc_dtype, device=device)
    mask_sum = torch.zeros(hw, dtype=acc_dtype, device=device)
    fg_count = torch.zeros(hw, dtype=acc_dtype, device=device)
    for box, crop, mask, *weight in foregrounds:
        if tuple(mask.shape) != box.size or tuple(crop.shape[-2:]) != box.size:
            raise ValueError(f"crop {tuple(crop.shape)} / mask {tuple(mask.shape)} do not match box {box.size}")
        w = weight[0] if weight and weight[0] is not None else None
        if w is None:
            fg_sum[box.slices] += crop.to(acc_dtype)
            mask_sum[box.slices] += mask.to(device=device, dtype=acc_dtype)
            fg_count[box.slices] += 1
            continue
        if tuple(w.shape) != box.size:
            raise ValueError(f"weight {tuple(w.shape)} does not match box {box.size}")
        w = w.to(device=device, dtype=acc_dtype)
        fg_sum[box.slices] += w * crop.to(acc_dtype)
        mask_sum[box.slices] += w * mask.to(device=device, dtype=acc_dtype)
        fg_count[box.slices] += w
    foreground = fg_sum / torch.where(fg_count > 0, fg_count, torch.ones_like(fg_count))
    mask = mask_sum / fg_count.clamp(min=1)
    blended = (1 - mask) * background + mask * foreground
    return torch.where(fg_count > 0, blended, background).to(canvas.dtype)


def grow_box(box: LatentBox, margin: float, hw: tuple[int, int]) -> LatentBox:
    """The box grown on every side by ceil(margin × its larger side) latent pixels, clamped to the canvas."""
    return pad_box(box, math.ceil(round(margin * max(box.h, box.w), _ROUND_DECIMALS)), hw)


def pad_box(box: LatentBox, pad: int, hw: tuple[int, int]) -> LatentBox:
    """The box grown on every side by `pad` latent pixels, clamped to the canvas."""
    return LatentBox(max(box.y0 - pad, 0), min(box.y1 + pad, hw[0]), max(box.x0 - pad, 0), min(box.x1 + pad, hw[1]))


def clear_mask(hw: tuple[int, int], boxes: list[LatentBox], ratio: float) -> Tensor:
    """1 everywhere but a feathered hole (`feather_mask` of ``ratio``) over each box: r_total's weight in the
    target over the boxes of removed regions (`Settings.total_clears_removed`). [h, w]"""
    weight = torch.ones(hw)
    for box in boxes:
        weight[box.slices] = torch.minimum(weight[box.slices], 1 - feather_mask(box.h, box.w, ratio))
    return weight


def cover_mask(hw: tuple[int, int], boxes: list[tuple[LatentBox, Tensor]]) -> Tensor:
    """The largest feather mask over each pixel of the given (box, mask) pairs, 0 where none lies: r_total's weight
    when it may draw only where the layout has objects (`Settings.total_within` "objects"). [h, w]"""
    cover = torch.zeros(hw)
    for box, mask in boxes:
        cover[box.slices] = torch.maximum(cover[box.slices], mask.to(cover))
    return cover


def under_weights(hw: tuple[int, int], above: list[tuple[LatentBox, Tensor]], below: list[LatentBox]) -> list[Tensor]:
    """Weights of the ``below`` boxes' crops where the ``above`` boxes (with their feather masks) lie over them:
    1 − the largest covering mask, so an edited object is composited over an inherent one instead of averaged with
    it (`Settings.edited_on_top`). One [h, w] weight per ``below`` box, in its order."""
    cover = cover_mask(hw, above)
    return [1 - cover[box.slices] for box in below]


def needs_canvas_fallback(latent_hw: tuple[int, int], background_boxes: list[LatentBox]) -> bool:
    """True when some latent pixel lies under no background box (method.md §2: the caller must then run
    the global prompt on the full canvas so no pixel is left undenoised)."""
    covered = torch.zeros(latent_hw, dtype=torch.bool)
    for box in background_boxes:
        covered[box.slices] = True
    return not bool(covered.all())


def context_window(box: LatentBox, canvas_hw: tuple[int, int], multiple: int, context: float = 0.0) -> LatentBox:
    """The window the UNet denoises for ``box``: each side grown by ceil(context × the box's length) latent pixels,
    then to the next multiple of ``multiple``, centred on the box and shifted to lie inside the canvas (clipped
    where the canvas is smaller; ``pad_to_multiple`` covers the rest).

    Ours, not the research code's (method.md §2 pads a crop it cannot take): the extra rows are the canvas's real
    latent rather than a replicated border, so the region's prompt sees what surrounds its box. The growth is
    relative to the box because a region prompt draws its object filling most of its window, as in the crops the
    model learnt from: a window much larger than the box puts the object partly outside it. Only the box's part of
    the output is used.
    """
    canvas_h, canvas_w = canvas_hw

    def grow(start: int, end: int, size: int) -> tuple[int, int]:
        margin = math.ceil(round(context * (end - start), _ROUND_DECIMALS))
        length = end - start + 2 * margin
        length = min(-(-length // multiple) * multiple, size)
        lo = start - (length - (end - start)) // 2
        lo = min(max(lo, 0), size - length)
        return lo, lo + length

    y0, y1 = grow(box.y0, box.y1, canvas_h)
    x0, x1 = grow(box.x0, box.x1, canvas_w)
    return LatentBox(y0=y0, y1=y1, x0=x0, x1=x1)


def within(box: LatentBox, window: LatentBox) -> tuple:
    """Index of ``box`` inside a tensor that holds ``window`` (last two dims)."""
    return (Ellipsis, slice(box.y0 - window.y0, box.y1 - window.y0), slice(box.x0 - window.x0, box.x1 - window.x0))


def spared_mask(boxes: list[LatentBox], window: LatentBox, padded: tuple[int, int],
                device: torch.device | str = "cpu") -> Tensor | None:
    """[h, w] over a crop's padded window: 0 inside ``boxes`` (canvas latent pixels), 1 elsewhere; None when no box
    reaches into the window (Settings.own_attention_in)."""
    mask = torch.ones(padded, device=device)
    hit = False
    for box in boxes:
        y0, y1 = max(box.y0, window.y0) - window.y0, min(box.y1, window.y1) - window.y0
        x0, x1 = max(box.x0, window.x0) - window.x0, min(box.x1, window.x1) - window.x0
        if y1 > y0 and x1 > x0:
            mask[y0:y1, x0:x1] = 0
            hit = True
    return mask if hit else None


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad the last two dims at the bottom/right up to the next multiple (method.md §2: crops the UNet
    cannot take are padded and cropped back). Returns the padded tensor and the original (h, w)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    # The UNet's downsamplings need sides divisible by 2**levels; replicating the border (not zeros)
    # keeps the padded strip statistically like the latent, so it disturbs the real pixels least.
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate"), (h, w)


def unpad(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Crop the last two dims back to hw = (h, w), undoing ``pad_to_multiple``."""
    return x[..., : hw[0], : hw[1]]


def group_by_size(boxes: list[LatentBox]) -> dict[tuple[int, int], list[int]]:
    """Indices of boxes sharing a crop size, in first-seen order (method.md §2, "Batching": equal-size
    crops can share one UNet call)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, box in enumerate(boxes):
        groups.setdefault(box.size, []).append(index)
    return groups
