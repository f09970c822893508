"""Pictures of what issue 16 changed where boxes overlap: pairs of the tuning suite run by MRGD with the paper's rules
(§2 composite, §6 re-step, r_total over removed boxes, L_RS on every region, every keyword) and with the defaults.

    python benchmarks/overlap_pictures.py [--pairs add-01,add-04,remove-12,remove-15,attr-10] [--model DIR]
                                          [--out benchmarks/results/overlaps.png]

One row per pair: the source, the target with the paper's rules, the target with the defaults (each method's own
source is shown only once: the rules leave the source alone except where an edited box lies over another). Boxes:
white inherent, green added, red removed, orange modified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from mrgd.layout import PAPERS_RULES, Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline

COLOURS = {"added": (0, 220, 0), "removed": (235, 40, 40), "modified": (255, 160, 0), "inherent": (255, 255, 255)}


def draw(image: Image.Image, edit: Edit, side: int) -> Image.Image:
    image = image.convert("RGB").resize((side, side), Image.NEAREST)
    pen = ImageDraw.Draw(image)
    for region in edit.regions:
        if region.kind == "background":
            continue
        x, y, w, h = region.box
        pen.rectangle([x * side, y * side, (x + w) * side - 1, (y + h) * side - 1], outline=COLOURS[region.role])
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="add-01,add-04,remove-12,remove-15,attr-10")
    parser.add_argument("--suite", default="benchmarks/suites/shapes-61")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", default="benchmarks/results/overlaps.png")
    parser.add_argument("--side", type=int, default=192)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    side, gap = args.side, 4
    rows = []
    for name in args.pairs.split(","):
        data = json.loads((Path(args.suite) / f"{name}.json").read_text())
        tiles = []
        for i, rules in enumerate((PAPERS_RULES, {})):
            edit = Edit.from_dict({**data, "mrgd": {**data.get("mrgd", {}), **rules}})
            result = pipe.edit(edit)
            if i == 0:
                tiles.append(draw(result.source, edit, side))
            tiles.append(draw(result.target, edit, side))
        rows.append((name, tiles))
    label = 80
    sheet = Image.new("RGB", (label + 3 * (side + gap), 16 + len(rows) * (side + gap)), (24, 24, 24))
    pen = ImageDraw.Draw(sheet)
    for c, title in enumerate(("source (paper rules)", "target, paper rules", "target, defaults")):
        pen.text((label + c * (side + gap) + 2, 2), title, fill=(230, 230, 230))
    for r, (name, tiles) in enumerate(rows):
        y = 16 + r * (side + gap)
        pen.text((4, y + 4), name, fill=(230, 230, 230))
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (label + c * (side + gap), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
