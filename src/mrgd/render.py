"""Pictures for people: grids with labelled region boxes, and PNGs that carry their full config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

ROLE_COLORS = {"inherent": (235, 235, 235), "added": (40, 200, 80), "removed": (230, 50, 50),
               "modified": (255, 170, 0), "background": (150, 150, 150)}
MIN_SIDE = 256  # small pictures are enlarged (nearest) so labels stay legible


def a1111_parameters(config: dict[str, Any], model: str, image: str = "source") -> str:
    """An A1111-style `parameters` text, so tools that read WebUI PNGs show something sensible."""
    regions = config.get("regions", [])
    key = "prompt" if image == "source" else "target_prompt"
    prompt = ", ".join(p for p in [config.get("prompt", "")] + [r.get(key) or "" for r in regions] if p)
    return (f"{prompt}\nNegative prompt: {config.get('negative_prompt', '')}\n"
            f"Steps: {config.get('steps')}, Sampler: DDIM, CFG scale: {config.get('guidance_scale')}, "
            f"Seed: {config.get('seed')}, Size: {config['size'][0]}x{config['size'][1]}, Model: {model}, "
            f"MRGD method: {config.get('mrgd', {}).get('method', '')}")


def save_png(image: Image.Image, path: str | Path, config: dict[str, Any], model: str, which: str = "source") -> None:
    """Write a PNG with the resolved config in a `mrgd` text chunk and an A1111-style `parameters` chunk."""
    meta = PngInfo()
    meta.add_text("mrgd", json.dumps(config, sort_keys=True))
    meta.add_text("parameters", a1111_parameters(config, model, which))
    image.save(path, pnginfo=meta)


def read_png_config(path: str | Path) -> dict[str, Any]:
    """The resolved config stored in an mrgd PNG."""
    with Image.open(path) as image:
        return json.loads(image.text["mrgd"])


def _enlarge(image: Image.Image) -> tuple[Image.Image, int]:
    scale = max(1, -(-MIN_SIDE // min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST), scale


def draw_boxes(image: Image.Image, regions: list[dict[str, Any]]) -> Image.Image:
    """Enlarge a picture and draw each region's box and label (`id: prompt`) in its role's colour."""
    canvas, _ = _enlarge(image.convert("RGB"))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for region in regions:
        x, y, w, h = region["box"]
        x0, y0 = x * canvas.width, y * canvas.height
        x1, y1 = min(canvas.width - 1, (x + w) * canvas.width), min(canvas.height - 1, (y + h) * canvas.height)
        color = ROLE_COLORS.get(region.get("role", "inherent"), (255, 255, 255))
        if region.get("kind") == "background" and region.get("role", "inherent") == "inherent":
            color = ROLE_COLORS["background"]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        label = f"{region['id']}: {region.get('label', '')}"[:40]
        tw = draw.textlength(label, font=font)
        draw.rectangle([x0 + 2, y0 + 2, x0 + 6 + tw, y0 + 14], fill=(0, 0, 0))
        draw.text((x0 + 4, y0 + 2), label, fill=color, font=font)
    return canvas


def edit_grid(source: Image.Image, target: Image.Image | None, edit, titles=("source", "target"),
              extra: list[tuple[str, Image.Image]] | None = None,
              before: list[tuple[str, Image.Image]] | None = None) -> Image.Image:
    """Panels side by side (source | target, optionally more), each with its image's boxes drawn and labelled."""
    panels = [(title, _enlarge(image.convert("RGB"))[0]) for title, image in before or []]
    for title, image, key in ((titles[0], source, "prompt"), (titles[1], target, "target_prompt")):
        if image is None:
            continue
        regions = [dict(id=r.id, kind=r.kind, box=r.box, role=r.role, label=getattr(r, key) or "")
                   for r in edit.regions if getattr(r, key) is not None or r.role == "removed"]
        panels.append((title, draw_boxes(image, regions)))
    for title, image in extra or []:
        panels.append((title, _enlarge(image.convert("RGB"))[0]))
    return _row(panels)


def _row(panels: list[tuple[str, Image.Image]], gap: int = 6, header: int = 16) -> Image.Image:
    height = max(p.height for _, p in panels) + header
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    grid = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    x = 0
    for title, panel in panels:
        draw.text((x + 4, 2), title, fill=(230, 230, 230), font=ImageFont.load_default())
        grid.paste(panel, (x, header))
        x += panel.width + gap
    return grid


def _heat(values, size: tuple[int, int]) -> Image.Image:
    """A [h, w] map (any scale) as a heat picture of `size`."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = (v - v.min()) / (v.max() - v.min() + 1e-12)
    rgb = np.stack([v, v**2, 1 - v], axis=-1) * 255
    return Image.fromarray(rgb.astype("uint8")).resize(size, Image.NEAREST)


def _tile_rows(rows: list[tuple[str, list[tuple[str, Image.Image]]]], tile: int = 96) -> Image.Image:
    """Rows of labelled tiles: [(row label, [(tile label, picture)])]."""
    font = ImageFont.load_default()
    cols = max((len(t) for _, t in rows), default=1)
    label_w, header = 110, 14
    sheet = Image.new("RGB", (label_w + cols * (tile + 4), max(1, len(rows)) * (tile + header + 4)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (row_label, tiles) in enumerate(rows):
        y = r * (tile + header + 4)
        draw.text((4, y + tile // 2), row_label[:18], fill=(230, 230, 230), font=font)
        for c, (label, picture) in enumerate(tiles):
            x = label_w + c * (tile + 4)
            sheet.paste(picture.resize((tile, tile), Image.NEAREST), (x, y + header))
            draw.text((x + 2, y + 1), label[:16], fill=(230, 230, 230), font=font)
    return sheet


def keyword_picture(keyword_maps: dict, hw: tuple[int, int], images: dict[str, Image.Image]) -> Image.Image:
    """Each selected word's averaged r_total attention map, labelled, one row per image and region."""
    rows = []
    for which, regions in keyword_maps.items():
        for rid, words in regions.items():
            tiles = [("image", images[which])]
            tiles += [(word, _heat(m.reshape(hw).numpy(), images[which].size)) for word, m in words]
            rows.append((f"{which}: {rid}", tiles))
    return _tile_rows(rows)


def masks_picture(masks: dict, edit, images: dict[str, Image.Image]) -> Image.Image:
    """Φ's final mask for each region on source and target, the region's box drawn over it."""
    boxes = {r.id: r.box for r in edit.regions}
    rows = []
    for which, entries in masks.items():
        tiles = [("image", images[which])]
        for rid, text, mask in entries:
            picture = _heat(mask.numpy(), (192, 192))
            draw = ImageDraw.Draw(picture)
            x, y, w, h = boxes[rid]
            draw.rectangle([x * 192, y * 192, min(191, (x + w) * 192), min(191, (y + h) * 192)], outline=(255, 255, 255))
            tiles.append((f"{rid}: {text}", picture))
        rows.append((which, tiles))
    return _tile_rows(rows)
