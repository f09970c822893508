"""Multi-region inversion of real images, measured (method.md §7): reconstruction and one edit per image.

    python benchmarks/inversion.py [--model DIR] [--n 10] [--steps 20] [--inner-steps 10] [--method p2p]
                                   [--seed 0] [--out benchmarks/results/inversion]

The images are drawn by the shapes-world generator (`make_scene`, 128x128, held-out seeds), not by the model; each
layout comes from the scene's ground truth: a full-canvas background region named after the background and one
region "a {color} {shape}" per object, boxed by the object's box. Each image is inverted (DDIM inversion + per-region
null-text optimisation, CFG 7) and edited with one object recoloured (`target_prompt`):
- reconstruction (the edit's source) vs input: PSNR and SSIM; PSNR of plain DDIM inversion (the same edit's source
  from the last pivot, no null embeddings) and of the VAE alone (encode + decode: the ceiling);
- the edit: CLIP-in-box of the recoloured box against the target prompt before (on the reconstruction) and after
  (on the target), SSIM-i between reconstruction and target; seconds per inversion.
Writes <out>.json, <out>.md and <out>.png (rows: input | reconstruction | target, at most 10).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrgd.inversion import encode_image, invert
from mrgd.layout import Edit
from mrgd.metrics import clip_in_box, psnr, ssim, ssim_i
from mrgd.models import DEFAULT_MODEL, load_pipeline
from mrgd.toyworld.world import COLORS, make_scene

HELDOUT_SEED = 20_000  # the model's training pools use seeds 0..99


def scene_edit(scene, rng: np.random.Generator, steps: int, method: str) -> tuple[Edit, str]:
    """The scene's ground-truth layout as an edit that recolours one object."""
    regions = [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": scene.background}]
    edited = int(rng.integers(len(scene.objects)))
    for i, obj in enumerate(scene.objects):
        region = {"id": f"obj{i + 1}", "box": [float(v) for v in obj.box], "prompt": obj.phrase}
        if i == edited:
            new = str(rng.choice([c for c in COLORS if c != obj.color]))
            region["target_prompt"] = f"a {new} {obj.shape}"
            what = f"{obj.phrase} -> a {new} {obj.shape}"
        regions.append(region)
    edit = Edit.from_dict({"size": [128, 128], "seed": 0, "steps": steps, "guidance_scale": 7.0,
                           "regions": regions, "mrgd": {"method": method}})
    return edit, what


@torch.no_grad()
def vae_round_trip(pipe, image: Image.Image) -> Image.Image:
    return pipe.decode(encode_image(pipe, image))


def mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--method", default="p2p", choices=["multidiffusion", "p2p", "mrgd"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/inversion")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    rng = np.random.default_rng(HELDOUT_SEED + args.seed)
    rows, sheet = [], []
    for i in range(args.n):
        scene = make_scene(rng, 128)
        image = Image.fromarray(scene.image)
        edit, what = scene_edit(scene, rng, args.steps, args.method)
        t0 = time.perf_counter()
        inversion, pivots = invert(pipe, image, edit, inner_steps=args.inner_steps)
        seconds = time.perf_counter() - t0
        result = pipe.edit(edit, start_latents=inversion.z_T, null_embeds=inversion.null_embeds_for())
        plain = pipe.edit(edit, start_latents=pivots[-1], images=(0,)).source
        recon, target = result.source, result.target
        row = {"image": i, "background": scene.background, "objects": [o.phrase for o in scene.objects],
               "edit": what, "psnr_null_text": psnr(recon, image), "psnr_ddim": psnr(plain, image),
               "psnr_vae": psnr(vae_round_trip(pipe, image), image), "ssim": ssim(recon, image),
               "ssim_i": ssim_i(recon, target, edit), "clip_before": None, "clip_after": None,
               "inversion_seconds": round(seconds, 2), "null_text_final_loss": inversion.losses[-1]}
        if pipe.scorer is not None:
            row["clip_before"] = mean(clip_in_box(recon, edit, pipe.scorer, pipe.scorer_tokenizer).values())
            row["clip_after"] = mean(clip_in_box(target, edit, pipe.scorer, pipe.scorer_tokenizer).values())
        rows.append(row)
        sheet.append((image, recon, target))
        print(f"image {i + 1}/{args.n}: PSNR {row['psnr_null_text']:.2f} dB (DDIM {row['psnr_ddim']:.2f}), "
              f"{seconds:.1f} s", flush=True)

    keys = ["psnr_null_text", "psnr_ddim", "psnr_vae", "ssim", "clip_before", "clip_after", "ssim_i", "inversion_seconds"]
    means = {k: mean(r[k] for r in rows) for k in keys}
    report = {"model": args.model, "images": args.n, "steps": args.steps, "inner_steps": args.inner_steps,
              "method": args.method, "guidance_scale": 7.0, "size": [128, 128], "seed": args.seed,
              "scorer": "the model family's clip/" if pipe.scorer is not None else None,
              "threads": torch.get_num_threads(), "mean": means,
              "inversion_seconds_median": statistics.median(r["inversion_seconds"] for r in rows), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    fmt = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"# Multi-region inversion ({args.n} shapes-world images, 128x128, {args.steps} steps, "
             f"{args.inner_steps} inner steps, CFG 7, edit with {args.method}; model `{args.model}`)", "",
             "PSNR in dB against the input; CLIP in the recoloured box against the target prompt, before (on the "
             "reconstruction) and after (on the target); SSIM-i between reconstruction and target.", "",
             "| image | edit | PSNR null-text | PSNR DDIM | PSNR VAE | SSIM | CLIP before | CLIP after | SSIM-i | s/inversion |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows + [{"image": "mean", "edit": "", **means}]:
        lines.append(f"| {r['image']} | {r['edit']} | {fmt(r['psnr_null_text'])} | {fmt(r['psnr_ddim'])} | "
                     f"{fmt(r['psnr_vae'])} | {fmt(r['ssim'], 3)} | {fmt(r['clip_before'])} | {fmt(r['clip_after'])} | "
                     f"{fmt(r['ssim_i'], 3)} | {fmt(r['inversion_seconds'], 1)} |")
    lines += ["", f"Median seconds per inversion: {report['inversion_seconds_median']:.1f} "
              f"({torch.get_num_threads()} threads; the first one includes warm-up)."]
    if pipe.scorer is None:
        lines += ["", "CLIP: n/a, the model folder has no clip/ scorer."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    side = 128
    picture = Image.new("RGB", (3 * side, side * min(len(sheet), 10)), "white")
    for y, images in enumerate(sheet[:10]):
        for x, im in enumerate(images):
            picture.paste(im.resize((side, side)), (x * side, y * side))
    picture.save(out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
