"""Edit-quality metrics of the paper's Table 1 protocol (method.md §8): CLIP in box, SSIM-e, SSIM-i; plus PSNR
and SSIM for reconstructions.

Masks are boolean (H, W) arrays on the edit's pixel canvas; images are PIL images or uint8 (H, W, 3) arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from .layout import Edit, Layout
from .guidance import CLIP_MEAN, CLIP_STD

Box = Sequence[float]
EDITED_ROLES = ("added", "removed", "modified")


# ---------------------------------------------------------------------------------------------------------------
# Masks


def _pixel_bounds(box: Box, size: tuple[int, int], pad: float = 0.0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel bounds of a fractional box grown by ``pad`` pixels on every side, clamped."""
    width, height = size
    x, y, w, h = box
    # round, not floor/ceil: fractions like 0.1 + 0.3 carry float noise that ceil would turn into an extra pixel
    x0 = min(max(round(x * width - pad), 0), width)
    y0 = min(max(round(y * height - pad), 0), height)
    x1 = min(max(round((x + w) * width + pad), 0), width)
    y1 = min(max(round((y + h) * height + pad), 0), height)
    return x0, y0, x1, y1


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of a fractional [x, y, w, h] box on a (W, H) canvas, clamped to it (method.md §1, §8)."""
    x0, y0, x1, y1 = _pixel_bounds(box, size)
    mask = np.zeros((size[1], size[0]), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def dilate(mask: np.ndarray, boxes: Iterable[Box], size: tuple[int, int], ratio: float = 0.25) -> np.ndarray:
    """``mask`` united with every box grown on each side by ``ratio`` x its larger side in pixels (method.md §8).

    Each box is grown on its own (a rectangle stays a rectangle), so a large box gets a wide ring and a small
    one a narrow ring, as the protocol's dilate(E, 25% of each box's larger side) says.
    """
    width, height = size
    out = mask.copy()
    for box in boxes:
        pad = ratio * max(box[2] * width, box[3] * height)
        x0, y0, x1, y1 = _pixel_bounds(box, size, pad)
        out[y0:y1, x0:x1] = True
    return out


def edit_masks(edit: Edit) -> dict[str, np.ndarray]:
    """The masks of method.md §8: ``edited`` (E: boxes of added, removed and modified regions), ``ring``
    (dilate(E) minus E, where SSIM-e is read) and ``inherent`` (inherent foreground boxes minus dilate(E), or
    the whole image minus dilate(E) when there are no such boxes or nothing of them is left; SSIM-i)."""
    size = tuple(edit.size)
    empty = np.zeros((size[1], size[0]), bool)
    edited_boxes = [region.box for region in edit.regions if region.role in EDITED_ROLES]
    edited = empty.copy()
    for box in edited_boxes:
        edited |= box_mask(box, size)
    grown = dilate(edited, edited_boxes, size)
    inherent = empty.copy()
    for region in edit.regions:
        if region.role == "inherent" and region.kind == "foreground":
            inherent |= box_mask(region.box, size)
    inherent &= ~grown
    if not inherent.any():
        inherent = ~grown
    return {"edited": edited, "ring": grown & ~edited, "inherent": inherent}


def boxes_intersect(a: Box, b: Box) -> bool:
    """Whether two fractional [x, y, w, h] boxes share an area greater than zero (touching edges do not)."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return dx > 0 and dy > 0


def overlaps_inherent(edit: Edit) -> bool:
    """The bench's overlap class of a pair: True when an edited box (added, removed or modified region) intersects
    an inherent foreground box with positive area, in the edit's fractional boxes (before clamping to the canvas).
    Background regions never count: every box lies on one."""
    edited = [r.box for r in edit.regions if r.role in EDITED_ROLES]
    inherent = [r.box for r in edit.regions if r.role == "inherent" and r.kind == "foreground"]
    return any(boxes_intersect(a, b) for a in edited for b in inherent)


# ---------------------------------------------------------------------------------------------------------------
# SSIM and PSNR


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return array


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _rgb(a), _rgb(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
    return a, b


def _structural_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=-1, full=True,
    )


def ssim_map(a, b) -> np.ndarray:
    """Per-pixel SSIM (H, W) of two RGB images: Gaussian window sigma 1.5, data range 255, the map averaged
    over channels (method.md §8)."""
    return _structural_similarity(*_pair(a, b))[1].mean(axis=-1)


def ssim(a, b) -> float:
    """Whole-image mean SSIM (scikit-image's, which skips the window's half-width at the borders)."""
    return float(_structural_similarity(*_pair(a, b))[0])


def psnr(a, b, data_range: float = 255) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    a, b = (np.asarray(x.convert("RGB") if isinstance(x, Image.Image) else x, np.float64) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _masked_ssim(source, target, edit: Edit, which: str) -> float:
    source, target = _pair(source, target)
    if source.shape[:2] != (edit.size[1], edit.size[0]):
        raise ValueError(
            f"images are {source.shape[1]}x{source.shape[0]}, the edit's canvas {edit.size[0]}x{edit.size[1]}"
        )
    mask = edit_masks(edit)[which]
    return float(ssim_map(source, target)[mask].mean()) if mask.any() else math.nan


def ssim_e(source, target, edit: Edit) -> float:
    """SSIM-e: the SSIM map of source vs target averaged over the ring around the edited boxes (method.md §8);
    nan if the ring is empty."""
    return _masked_ssim(source, target, edit, "ring")


def ssim_i(source, target, edit: Edit) -> float:
    """SSIM-i: the SSIM map averaged over the inherent mask of :func:`edit_masks` (method.md §8); nan if empty."""
    return _masked_ssim(source, target, edit, "inherent")


# ---------------------------------------------------------------------------------------------------------------
# CLIP in box


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected embeds; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def removal_text(target: Layout, box: Box) -> str:
    """What covers a removed region's box in the target: the prompt of the (last) background region holding the
    box centre, else the target's r_total prompt (method.md §8)."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    covering = [
        r for r in target.regions
        if r.kind == "background" and r.box[0] <= cx < r.box[0] + r.box[2] and r.box[1] <= cy < r.box[1] + r.box[3]
    ]
    return covering[-1].prompt if covering else target.total_prompt()


def clip_texts(edit: Edit) -> dict[str, str]:
    """Region id -> the text each edited box is scored against: the target region prompt (without the global
    prompt), or for a removal :func:`removal_text`."""
    target = edit.target()
    return {
        region.id: removal_text(target, region.box) if region.role == "removed" else region.target_prompt
        for region in edit.regions if region.role in EDITED_ROLES
    }


@torch.no_grad()
def clip_in_box(image, edit: Edit, scorer, tokenizer) -> dict[str, float]:
    """CLIP score (cosine x 100) of the target image cropped to each edited box against that region's text
    (method.md §8; the paper used ``openai/clip-vit-base-patch16``). Returns region id -> score."""
    texts = clip_texts(edit)
    if not texts:
        return {}
    image = Image.fromarray(_rgb(image))
    side = scorer.config.vision_config.image_size
    param = next(scorer.parameters())
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    regions = edit.regions_by_id()
    crops = []
    for region_id in texts:
        x0, y0, x1, y1 = _pixel_bounds(regions[region_id].box, image.size)
        crop = image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))).resize((side, side), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(crop, np.float32) / 255).permute(2, 0, 1)
        crops.append((pixels - mean) / std)
    pixel_values = torch.stack(crops).to(param.device, param.dtype)
    tokens = tokenizer(list(texts.values()), padding=True, truncation=True, return_tensors="pt").to(param.device)
    image_embeds = _features(scorer.get_image_features(pixel_values=pixel_values)).float()
    text_embeds = _features(scorer.get_text_features(**tokens)).float()
    scores = 100 * torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return {region_id: float(score) for region_id, score in zip(texts, scores)}


# ---------------------------------------------------------------------------------------------------------------
# Picture


def explain_masks(edit: Edit, min_side: int = 256) -> Image.Image:
    """The masks of :func:`edit_masks` as a picture: edited boxes red, ring yellow, inherent mask green, the rest
    dark; scaled up (nearest) so the shorter side is at least ``min_side`` pixels."""
    masks = edit_masks(edit)
    picture = np.full((edit.size[1], edit.size[0], 3), 32, np.uint8)
    picture[masks["inherent"]] = (40, 170, 70)
    picture[masks["ring"]] = (230, 200, 40)
    picture[masks["edited"]] = (210, 40, 40)
    image = Image.fromarray(picture)
    scale = max(1, math.ceil(min_side / min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
