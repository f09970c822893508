"""Keyword selection, measured (method.md §4 "Measured, not assumed"): does the entropy rule pick the object words
of region prompts padded with object-agnostic quality words?

    python benchmarks/keywords.py [--model DIR] [--n 40] [--steps 20] [--seed 0] [--out benchmarks/results/keywords]

Builds seeded shapes-world edits (additions, removals and attribute swaps of 1-3 objects on a background region,
128x128, method mrgd, KSSA on, guidance off for speed) whose every region prompt carries quality words before AND
after its phrase ("masterpiece, best quality, a red circle, highly detailed, 8k"). Each region's N_k
(`keyword_count`) is the number of its colour/shape/background words: 2 for "a red circle", 1 for "grass". Each
selected word is
classified with the world's ground truth (`word_roles`): object, colour and background words are right; quality
words, fillers ("a", "the") and punctuation are wrong. The random baseline is the precision expected from picking
the same number of words per region uniformly among that region's candidate words (punctuation excluded).
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

from mrgd.layout import Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline
from mrgd.layout import Settings
from mrgd.toyworld.world import BACKGROUNDS, COLORS, HELD_OUT_FILLERS, QUALITY_WORDS, SHAPES, TEST_FILLERS, word_roles

RIGHT = ("object", "color", "background")
# --filler held-out pads with HELD_OUT_FILLERS, words no training caption holds (its captions use QUALITY_WORDS):
# it asks whether "names nothing" generalises beyond the words the UNet was taught to spread.
TASKS = ("add", "remove", "attribute")
GLOBAL_PROMPTS = ("", "masterpiece, best quality")


def padded(rng: random.Random, phrase: str, fillers: tuple[str, ...] = QUALITY_WORDS) -> str:
    """1-2 quality words before and 1-2 after the phrase."""
    words = rng.sample(fillers, rng.randint(1, 2) + rng.randint(1, 2))
    cut = rng.randint(1, len(words) - 1)
    return ", ".join(words[:cut] + [phrase] + words[cut:])


def make_edit(rng: random.Random, task: str, steps: int, fillers: tuple[str, ...] = QUALITY_WORDS) -> Edit:
    n = rng.randint(1, 3)
    objects = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    background = rng.choice(BACKGROUNDS)
    regions = [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": padded(rng, background, fillers)}]
    edited = rng.randrange(n)
    for i, (color, shape) in enumerate(objects):
        side = rng.uniform(0.3, 0.5)
        box = [round(rng.uniform(0, 1 - side), 2), round(rng.uniform(0, 1 - side), 2), round(side, 2), round(side, 2)]
        prompt = padded(rng, f"a {color} {shape}", fillers)
        region = {"id": f"obj{i + 1}", "box": box, "prompt": prompt}
        if i == edited and task == "add":
            region = {"id": region["id"], "box": box, "target_prompt": prompt}
        elif i == edited and task == "remove":
            region["target_prompt"] = None
        elif i == edited:  # recolour: one token for another, so word swap applies
            new = rng.choice([c for c in COLORS if c != color])
            region["target_prompt"] = prompt.replace(f"a {color} {shape}", f"a {new} {shape}")
        regions.append(region)
    for region in regions:
        prompt = region.get("prompt") or region.get("target_prompt")
        region["keyword_count"] = sum(role in RIGHT for _, role in word_roles(prompt))
    n_k = max(region["keyword_count"] for region in regions)
    return Edit.from_dict({"size": [128, 128], "prompt": rng.choice(GLOBAL_PROMPTS), "seed": rng.randrange(10**6),
                           "steps": steps, "guidance_scale": 7.0, "regions": regions,
                           "mrgd": {"method": "mrgd", "guidance": False, "kssa": True, "keywords": n_k}})


class Roles:
    """Role of a word as the model's tokenizer splits it ("8k" is "8" + "k": pieces of quality words are quality)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.quality = {w for q in QUALITY_WORDS for w in self.words(q)}

    def words(self, text: str) -> list[str]:
        """Words as `prompts.word_spans` merges BPE pieces (up to the piece ending in </w>)."""
        out, piece = [], ""
        for token in self.tokenizer.tokenize(text):
            piece += token.replace("</w>", "")
            if token.endswith("</w>"):
                out.append(piece)
                piece = ""
        return out + ([piece] if piece else [])

    def __call__(self, word: str) -> str:
        roles = word_roles(word)
        if not roles:
            return "punctuation"
        role = roles[0][1]
        return "quality" if role == "filler" and word in self.quality else role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/keywords")
    parser.add_argument("--entropy", default="histogram", choices=["histogram", "spatial"],
                        help="method.md §4's histogram entropy, or entropy over pixels")
    parser.add_argument("--filler", default="quality", choices=["quality", "held-out", "test"],
                        help="pad with the training captions' quality words, with words the model never saw, or with "
                             "the test suite's unseen fillers (world.TEST_FILLERS; report only, never tune on it)")
    parser.add_argument("--unit", default=Settings().keyword_unit, choices=["word", "token"],
                        help="Settings.keyword_unit: select whole words (ours) or single tokens (§4)")
    args = parser.parse_args()
    fillers = {"quality": QUALITY_WORDS, "held-out": HELD_OUT_FILLERS, "test": TEST_FILLERS}[args.filler]
    pipe = load_pipeline(args.model)
    roles = Roles(pipe.tokenizer)
    rng = random.Random(args.seed)
    counts = {image: Counter() for image in ("source", "target")}
    by_kind = {kind: Counter() for kind in ("background", "foreground")}
    # expected right picks of the random baseline (without, with commas as candidates), most right picks possible
    expected = {"random": 0.0, "random_with_commas": 0.0, "best": 0.0, "wanted": 0.0}
    pooled = Counter()  # right and total candidate words (punctuation excluded)
    examples, n_k, missing, t0 = [], [], 0, time.perf_counter()
    for i in range(args.n):
        edit = make_edit(rng, TASKS[i % len(TASKS)], args.steps, fillers)
        edit.mrgd.keyword_entropy = args.entropy
        edit.mrgd.keyword_unit = args.unit
        n_k.extend(r.keyword_count for r in edit.regions)
        chosen = pipe.edit(edit).info.get("keywords")
        missing += chosen is None
        layouts = {"source": edit.source(), "target": edit.target()}
        for image, per_region in (chosen or {}).items():
            regions = layouts[image].regions_by_id()
            for rid, words in per_region.items():
                picked = [roles(w["word"]) for w in words]
                counts[image].update(picked)
                by_kind[regions[rid].kind].update(r in RIGHT for r in picked)
                with_commas = [roles(w) for w in roles.words(regions[rid].prompt)]
                candidates = [r for r in with_commas if r != "punctuation"]
                right = sum(r in RIGHT for r in candidates)
                expected["random"] += len(picked) * right / len(candidates)
                expected["random_with_commas"] += len(picked) * right / len(with_commas)
                expected["best"] += min(len(picked), right)
                expected["wanted"] += min(regions[rid].keyword_count, right)
                pooled.update({"right": right, "all": len(candidates)})
                if len(examples) < 8:
                    examples.append({"edit": i, "image": image, "region": rid, "prompt": regions[rid].prompt,
                                     "selected": [[w["word"], r, round(w["entropy"], 3)] for w, r in zip(words, picked)]})
        print(f"edit {i + 1}/{args.n} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def precision(counter: Counter) -> float | None:
        total = sum(counter.values())
        return sum(counter[r] for r in RIGHT) / total if total else None

    total = counts["source"] + counts["target"]
    picks = sum(total.values())
    report = {
        "model": args.model, "edits": args.n, "steps": args.steps, "seed": args.seed, "size": [128, 128],
        "settings": {"method": "mrgd", "guidance": False, "kssa": True, "keyword_entropy": args.entropy,
                     "keyword_unit": args.unit, "filler": args.filler, "keywords": "per region: its number of right words",
                     "keywords_used": dict(Counter(n_k))},
        "edits_without_keywords": missing, "selected_words": picks, "roles": dict(total),
        "precision": precision(total), "precision_per_image": {k: precision(v) for k, v in counts.items()},
        "roles_per_image": {k: dict(v) for k, v in counts.items()},
        "precision_per_region_kind": {k: (v[True] / (v[True] + v[False]) if v else None) for k, v in by_kind.items()},
        "random_baseline": expected["random"] / picks if picks else None,
        "random_baseline_with_commas": expected["random_with_commas"] / picks if picks else None,
        "best_possible": expected["best"] / picks if picks else None,
        # right words selected over the right words the regions asked for (N_k = their number)
        "recall": sum(total[r] for r in RIGHT) / expected["wanted"] if expected["wanted"] else None,
        "right_fraction_of_candidate_words": pooled["right"] / pooled["all"] if pooled["all"] else None,
        "seconds": round(time.perf_counter() - t0, 1), "examples": examples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"# Keyword selection precision ({args.n} edits, {args.steps} steps, model `{args.model}`)", "",
             f"`python benchmarks/keywords.py --entropy {args.entropy} --filler {args.filler} --unit "
             f"{args.unit}" + (f" --model {args.model}`" if args.model != str(DEFAULT_MODEL) else "`"), "",
             "| | precision | selected words |", "|---|---|---|",
             f"| all | {fmt(report['precision'])} | {picks} |"]
    lines += [f"| {k} | {fmt(precision(v))} | {sum(v.values())} |" for k, v in counts.items()]
    lines += [f"| {k} regions | {fmt(v)} | {sum(by_kind[k].values())} |"
              for k, v in report["precision_per_region_kind"].items()]
    lines += [f"| random baseline | {fmt(report['random_baseline'])} | |",
              f"| random baseline, commas as candidates too | {fmt(report['random_baseline_with_commas'])} | |",
              f"| best possible (N_k vs right words per region) | {fmt(report['best_possible'])} | |",
              f"| recall: right words selected / right words asked for | {fmt(report['recall'])} | |", "",
              "Selected words by role: " + ", ".join(f"{r} {c}" for r, c in total.most_common()) + ".",
              f"Edits without a keyword selection: {missing}."]
    if total["punctuation"]:
        lines += ["", "Commas were selected: the pipeline's candidates include the commas inside region prompts "
                  "(method.md §4 says commas never are)."]
    lines += ["", "## Examples", ""]
    lines += [f"- edit {e['edit']} {e['image']} `{e['region']}`: \"{e['prompt']}\" -> "
              + ", ".join(f"`{w}` ({r})" for w, r, _ in e["selected"]) for e in examples]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
