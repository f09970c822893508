"""Keyword selection rules compared offline, on r_total's maps dumped from the keyword benchmark's edits.

    python benchmarks/keyword_rules.py --dump runs/kwmaps-quality.pt [--filler quality|held-out] [--n 40] [--seed 0]

The first run samples the edits of `benchmarks/keywords.py` (same generator, same seeds, guidance off) and keeps,
at the last selection step, every region's candidate positions and r_total's averaged maps; later runs only read the
dump. Each rule ranks a region's candidate *words* (pieces merged as the pipeline merges them, a word scored by its
best piece) and keeps as many as the region has right words; precision as in keywords.py. Rules:

- `spatial`: entropy over pixels (the default), `histogram`: §4's 256-level histogram entropy;
- `lift`: the share of the word's attention inside the region's own area (its box; for a background region the
  canvas outside every foreground box) over that area's share of the canvas;
- `spatial+lift`: words with lift above 1 first (spatial order), then the rest.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from keywords import RIGHT, TASKS, Roles, make_edit  # noqa: E402

from mrgd import keywords as kw  # noqa: E402
from mrgd.models import DEFAULT_MODEL, load_pipeline  # noqa: E402
from mrgd.prompts import word_spans  # noqa: E402
from mrgd.toyworld.world import HELD_OUT_FILLERS, QUALITY_WORDS  # noqa: E402


def dump(args) -> list[dict]:
    pipe = load_pipeline(args.model)
    roles = Roles(pipe.tokenizer)
    fillers = QUALITY_WORDS if args.filler == "quality" else HELD_OUT_FILLERS
    rng = random.Random(args.seed)
    captured: dict = {}
    original = kw.KeywordTracker.after_step

    def after_step(self, step):
        done = original(self, step)
        if done:
            captured.update({i: (acc.maps().clone(), self.hw, self.candidates[i], word_spans(self.totals[i]))
                             for i, acc in self.accumulators.items() if acc.count})
        return done

    kw.KeywordTracker.after_step = after_step
    items = []
    for i in range(args.n):
        edit = make_edit(rng, TASKS[i % len(TASKS)], 20, fillers)
        captured.clear()
        pipe.edit(edit)
        layouts = (edit.source(), edit.target())
        for image, (maps, hw, candidates, spans) in captured.items():
            regions = layouts[image].regions_by_id()
            fg = [r.box for r in layouts[image].regions if r.kind == "foreground"]
            for rid, positions in candidates.items():
                words = [(w, [p for p in ps if p in positions]) for w, ps in spans]
                words = [(w, ps) for w, ps in words if ps]
                region = regions[rid]
                items.append({"edit": i, "image": image, "region": rid, "kind": region.kind, "box": region.box,
                              "foreground_boxes": fg, "hw": hw, "k": region.keyword_count,
                              "words": [(w, roles(w), maps[ps].clone()) for w, ps in words]})
        print(f"edit {i + 1}/{args.n}", flush=True)
    return items


def area_mask(item: dict) -> torch.Tensor:
    h, w = item["hw"]
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w

    def inside(box):
        x, y, bw, bh = box
        return ((ys >= y) & (ys < y + bh))[:, None] & ((xs >= x) & (xs < x + bw))[None, :]

    if item["kind"] == "background":
        mask = torch.ones(h, w, dtype=torch.bool)
        for box in item["foreground_boxes"]:
            mask &= ~inside(box)
    else:
        mask = inside(item["box"])
    return mask.flatten()


def scores(item: dict, rule: str) -> list[float]:
    """Lower is better."""
    out = []
    mask = area_mask(item)
    share = mask.float().mean().clamp_min(1e-6)
    for _, _, maps in item["words"]:
        spatial = kw.spatial_entropy(maps).min().item()
        hist = kw.map_entropy(maps).min().item()
        p = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
        lift = ((p[:, mask].sum(-1)) / share).max().item() if mask.any() else 1.0
        if rule == "spatial":
            out.append(spatial)
        elif rule == "histogram":
            out.append(hist)
        elif rule == "lift":
            out.append(-lift)
        elif rule == "spatial+lift":
            out.append(spatial + (0 if lift > 1 else 100))
        else:
            raise ValueError(rule)
    return out


def evaluate(items: list[dict], rule: str) -> dict:
    right = total = 0
    per_kind = {"background": [0, 0], "foreground": [0, 0]}
    for item in items:
        s = scores(item, rule)
        order = sorted(range(len(s)), key=lambda j: s[j])
        picked = [item["words"][j][1] for j in order[: item["k"]] if math.isfinite(s[j])]
        good = sum(r in RIGHT for r in picked)
        right += good
        total += len(picked)
        per_kind[item["kind"]][0] += good
        per_kind[item["kind"]][1] += len(picked)
    return {"all": right / max(total, 1), **{k: v[0] / max(v[1], 1) for k, v in per_kind.items()}, "picked": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dump", required=True)
    parser.add_argument("--filler", default="quality", choices=["quality", "held-out"])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = Path(args.dump)
    if path.exists():
        items = torch.load(path, weights_only=False)
    else:
        items = dump(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(items, path)
    for rule in ("spatial", "histogram", "lift", "spatial+lift"):
        r = evaluate(items, rule)
        print(f"{rule:14s} all {r['all']:.3f}  background {r['background']:.3f}  foreground {r['foreground']:.3f}"
              f"  ({r['picked']} picks)")


if __name__ == "__main__":
    main()
