"""Multi-region inversion of real images, measured (method.md §7): reconstruction and one edit per image.

    python benchmarks/inversion.py [--model DIR] [--n 10] [--steps 20] [--inner-steps 10] [--method p2p]
                                   [--inversions direct,negative-prompt,null-text] [--seed 0]
                                   [--out benchmarks/results/inversion]

The images are drawn by the shapes-world generator (`make_scene`, 128x128, held-out seeds), not by the model; each
layout comes from the scene's ground truth: a full-canvas background region named after the background and one
region "a {color} {shape}" per object, boxed by the object's box. Each image is inverted with each inversion method
(`mrgd.inversion`: direct, negative-prompt, null-text; CFG 7) and edited with one object recoloured (`target_prompt`):
- reconstruction (the edit's source) vs input: PSNR and SSIM; PSNR of plain DDIM inversion (the same edit's source
  from the last pivot, no correction) and of the VAE alone (encode + decode: the ceiling);
- the edit: CLIP-in-box of the recoloured box against the target prompt before (on the reconstruction) and after
  (on the target), SSIM-i between reconstruction and target; seconds per inversion.
Writes <out>.json, <out>.md and <out>.png (rows: input | reconstruction | target, at most 10).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrgd.inversion import METHODS, encode_image, invert
from mrgd.layout import Edit
from mrgd.metrics import clip_in_box, psnr, ssim, ssim_i
from mrgd.models import DEFAULT_MODEL, load_pipeline, parse_device, parse_dtype
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
    parser.add_argument("--inversions", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 (default: the measured numbers), float16, bfloat16, auto")
    parser.add_argument("--out", default="benchmarks/results/inversion")
    args = parser.parse_args()
    inversions = [m.strip() for m in args.inversions.split(",") if m.strip()]
    device = parse_device(args.device)
    pipe = load_pipeline(args.model, device=device, dtype=parse_dtype(args.dtype, device))
    rng = np.random.default_rng(HELDOUT_SEED + args.seed)
    rows, sheet = [], []
    for i in range(args.n):
        scene = make_scene(rng, 128)
        image = Image.fromarray(scene.image)
        edit, what = scene_edit(scene, rng, args.steps, args.method)
        row = {"image": i, "background": scene.background, "objects": [o.phrase for o in scene.objects], "edit": what,
               "psnr_vae": psnr(vae_round_trip(pipe, image), image), "methods": {}}
        pictures = [image]
        for name in inversions:
            t0 = time.perf_counter()
            inversion, pivots = invert(pipe, image, edit, inner_steps=args.inner_steps, method=name)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels still queued belong to the inversion's time
            seconds = time.perf_counter() - t0
            result = pipe.edit(edit, **inversion.edit_kwargs())
            recon, target = result.source, result.target
            entry = {"psnr": psnr(recon, image), "ssim": ssim(recon, image), "ssim_i": ssim_i(recon, target, edit),
                     "ssim_i_input": ssim_i(image, target, edit),
                     "clip_before": None, "clip_after": None, "seconds": round(seconds, 3)}
            if pipe.scorer is not None:
                entry["clip_before"] = mean(clip_in_box(recon, edit, pipe.scorer, pipe.scorer_tokenizer).values())
                entry["clip_after"] = mean(clip_in_box(target, edit, pipe.scorer, pipe.scorer_tokenizer).values())
            row["methods"][name] = entry
            pictures += [recon, target]
        plain = pipe.edit(edit, start_latents=pivots[-1], images=(0,)).source
        row["psnr_ddim"] = psnr(plain, image)
        rows.append(row)
        sheet.append(pictures)
        print(f"image {i + 1}/{args.n}: " + ", ".join(f"{m} {e['psnr']:.2f} dB {e['seconds']:.1f} s"
                                                     for m, e in row["methods"].items()), flush=True)

    keys = ["psnr", "ssim", "clip_before", "clip_after", "ssim_i", "ssim_i_input", "seconds"]
    means = {m: {k: mean(r["methods"][m][k] for r in rows) for k in keys} for m in inversions}
    medians = {m: statistics.median(r["methods"][m]["seconds"] for r in rows) for m in inversions}
    baseline = {"psnr_ddim": mean(r["psnr_ddim"] for r in rows), "psnr_vae": mean(r["psnr_vae"] for r in rows)}
    report = {"command": "python benchmarks/inversion.py " + " ".join(sys.argv[1:]), "model": args.model, "images": args.n, "steps": args.steps, "inner_steps": args.inner_steps,
              "method": args.method, "guidance_scale": 7.0, "size": [128, 128], "seed": args.seed,
              "scorer": "the model family's clip/" if pipe.scorer is not None else None,
              "threads": torch.get_num_threads(), "device": str(device),
              "dtype": str(pipe.dtype).replace("torch.", ""), "mean": means, "median_seconds": medians, **baseline, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    fmt = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"# Multi-region inversion ({args.n} shapes-world images, 128x128, {args.steps} steps, CFG 7, edit with "
             f"{args.method}; null-text with {args.inner_steps} inner steps; model `{args.model}`)", "",
             f"`{report['command'].strip()}`. PSNR in dB against the "
             "input; CLIP in the recoloured box against the target prompt, before (on the reconstruction) and after "
             "(on the target); SSIM-i between reconstruction and target, and between the input photo and target (what "
             "the user keeps of the photo; a reconstruction that smooths the photo away scores the first one higher); "
             "seconds per inversion (median, "
             + (f"{device} {str(pipe.dtype).replace('torch.', '')})." if device.type == "cuda"
                else f"{torch.get_num_threads()} threads)."), "",
             "| inversion | PSNR | SSIM | CLIP before | CLIP after | SSIM-i | SSIM-i vs input | s/inversion | speed-up vs null-text |",
             "|---|---|---|---|---|---|---|---|---|"]
    reference = medians.get("null-text")
    for m in inversions:
        e = means[m]
        speed = f"{reference / medians[m]:.1f}x" if reference else "n/a"
        lines.append(f"| {m} | {fmt(e['psnr'])} | {fmt(e['ssim'], 3)} | {fmt(e['clip_before'])} | {fmt(e['clip_after'])} "
                     f"| {fmt(e['ssim_i'], 3)} | {fmt(e['ssim_i_input'], 3)} | {medians[m]:.2f} | {speed} |")
    lines += ["", f"Plain DDIM inversion (no correction, CFG 7): {fmt(baseline['psnr_ddim'])} dB; VAE round trip (the "
              f"ceiling): {fmt(baseline['psnr_vae'])} dB.", "", "Per image (PSNR dB / seconds):", "",
              "| image | edit | " + " | ".join(inversions) + " |", "|---|---|" + "---|" * len(inversions)]
    for r in rows:
        lines.append(f"| {r['image']} | {r['edit']} | " + " | ".join(
            f"{r['methods'][m]['psnr']:.2f} / {r['methods'][m]['seconds']:.1f}" for m in inversions) + " |")
    if pipe.scorer is None:
        lines += ["", "CLIP: n/a, the model folder has no clip/ scorer."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    side = 96
    columns = 1 + 2 * len(inversions)
    picture = Image.new("RGB", (columns * side, side * min(len(sheet), 10)), "white")
    for y, images in enumerate(sheet[:10]):
        for x, im in enumerate(images):
            picture.paste(im.resize((side, side)), (x * side, y * side))
    picture.save(out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
