"""Write the shapes-world benchmark suite: 61 seeded edits in the paper's proportions (method.md §8).

25 additions, 24 removals and 12 attribute modifications of coloured shapes on one of the world's backgrounds,
as edit files (design.md format) plus ``suite.json`` listing them. At least half the scenes have the edited box
overlapping another object and 60% pad their region prompts with quality words, because those are the cases the
method's keyword selection and guidance exist for; two thirds of the attribute edits recolour, the rest reshape.

    python benchmarks/make_shapes_suite.py --out benchmarks/suites/shapes-61 --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path

from mrgd.layout import Edit, write_config_file
from mrgd.toyworld.world import BACKGROUNDS, COLORS, QUALITY_WORDS, SHAPES

TASKS = {"add": 25, "remove": 24, "attribute": 12}  # paper Table 1
PREFIX = {"add": "add", "remove": "remove", "attribute": "attr"}
GLOBAL_PROMPTS = ("", "masterpiece, best quality")
MAX_SHARED = 0.4  # two boxes may share at most this fraction of the smaller one, so every object stays visible


def overlap(a, b) -> float:
    """Intersection area of two [x, y, w, h] boxes, as a fraction of the canvas."""
    dx = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


def random_box(rng: random.Random) -> list[float]:
    w, h = (round(rng.uniform(0.3, 0.5), 2) for _ in range(2))
    return [round(rng.uniform(0, 1 - w), 2), round(rng.uniform(0, 1 - h), 2), w, h]


def place_boxes(rng: random.Random, n: int, edited: int, overlapping: bool) -> list[list[float]]:
    """n boxes no two of which hide each other; when ``overlapping``, box ``edited`` overlaps another one."""
    while True:
        boxes = []
        for _ in range(n):
            for _ in range(100):
                box = random_box(rng)
                if all(overlap(box, b) <= MAX_SHARED * min(box[2] * box[3], b[2] * b[3]) for b in boxes):
                    boxes.append(box)
                    break
        if len(boxes) == n and (
            not overlapping or any(overlap(boxes[edited], b) > 0 for i, b in enumerate(boxes) if i != edited)
        ):
            return boxes


def pad(rng: random.Random, phrase: str) -> str:
    """The phrase with 1-4 quality words before and/or after it: 'masterpiece, a red circle, highly detailed'."""
    words = rng.sample(QUALITY_WORDS, rng.randint(1, 4))
    cut = rng.randint(0, len(words))
    return ", ".join(words[:cut] + [phrase] + words[cut:])


def make_edit(rng: random.Random, task: str, overlapping: bool, padded: bool, recolor: bool) -> tuple[dict, str]:
    """One edit file's content and a short description of it; an attribute edit changes the colour if
    ``recolor``, else the shape."""
    n = rng.randint(2 if overlapping else 1, 4)
    edited = rng.randrange(n)
    boxes = place_boxes(rng, n, edited, overlapping)
    objects = rng.sample(list(itertools.product(COLORS, SHAPES)), n)  # distinct, so every object can be named
    background = rng.choice(BACKGROUNDS)
    regions = [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": background}]
    for i, ((color, shape), box) in enumerate(zip(objects, boxes)):
        phrase = f"a {color} {shape}"
        prompt = pad(rng, phrase) if padded else phrase
        region = {"id": f"obj{i + 1}", "box": box, "prompt": prompt}
        if i == edited:
            if task == "add":
                region = {"id": region["id"], "box": box, "target_prompt": prompt}
                what = f"add {phrase}"
            elif task == "remove":
                region["target_prompt"] = None
                what = f"remove {phrase}"
            else:  # every colour and shape is one token, so the swap keeps the token count (word swap, §3)
                taken = set(objects)
                swaps = [(c, shape) for c in COLORS] if recolor else [(color, s) for s in SHAPES]
                new_color, new_shape = rng.choice([o for o in swaps if o not in taken])
                new_phrase = f"a {new_color} {new_shape}"
                region["target_prompt"] = prompt.replace(phrase, new_phrase)
                what = f"{phrase} -> {new_phrase}"
        regions.append(region)
    others = f", {n - 1} other object{'s' * (n != 2)}" if n > 1 else ""
    touching = any(overlap(boxes[edited], b) > 0 for b in boxes[:edited] + boxes[edited + 1:])
    description = f"{what} (obj{edited + 1}) on {background}{others}{', overlapping' * touching}"
    data = {
        "size": [128, 128],
        "prompt": rng.choice(GLOBAL_PROMPTS),
        "seed": rng.randrange(10**6),
        "steps": 20,
        "guidance_scale": 7.0,
        "regions": regions,
        "mrgd": {"method": "mrgd"},
    }
    return data, description


def flags(rng: random.Random, n: int, fraction: float) -> list[bool]:
    """Exactly ceil(fraction * n) True values in random order."""
    values = [i < math.ceil(fraction * n) for i in range(n)]
    rng.shuffle(values)
    return values


def make_suite(out: Path, seed: int = 0) -> list[dict]:
    """Write the suite's edit files and ``suite.json`` into ``out``; return the suite's entries."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for task, count in TASKS.items():
        plan = zip(flags(rng, count, 0.5), flags(rng, count, 0.6), flags(rng, count, 2 / 3))
        for i, (overlapping, padded, recolor) in enumerate(plan):
            data, description = make_edit(rng, task, overlapping, padded, recolor)
            name = f"{PREFIX[task]}-{i:02d}.json"
            Edit.from_dict(data, source=name)  # written minimal (defaults stay the code's), but always valid
            write_config_file(out / name, data)
            entries.append({"file": name, "task": task, "description": description})
    (out / "suite.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return entries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/suites/shapes-61"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    entries = make_suite(args.out, args.seed)
    print(f"wrote {len(entries)} edits and suite.json to {args.out}")


if __name__ == "__main__":
    main()
