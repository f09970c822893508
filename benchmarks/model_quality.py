"""Acceptance measurements of the embedded shapes-world model (issue: the embedded default).

    python benchmarks/model_quality.py [--model DIR] [--layouts 100] [--out benchmarks/results/model_quality.json]

- VAE reconstruction PSNR on held-out generated scenes (never seen in training: another seed).
- Text control: layouts of a background and one object box with a random prompt, generated with the same code
  path as `mrgd generate`, judged by an oracle: colour and background read from pixels, shape by the CLIP scorer.
- CLIP scorer: object crop <-> phrase top-1 accuracy among all colour x shape phrases.
- CLIPSeg: mean IoU at a 0.5 threshold on held-out scenes, queried by object phrases.
- Speed: a 3-region edit at the native size, 20 steps, method p2p.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrgd.layout import Edit, Layout
from mrgd.models import DEFAULT_MODEL, load_pipeline
from mrgd.toyworld.oracle import box_pixels, read_background, read_colour
from mrgd.toyworld.world import BACKGROUNDS, COLORS, SHAPES, make_object_crop, make_scene

HELDOUT_SEED = 10_000  # training pools use seeds 0..99


def vae_psnr(pipe, n: int = 64) -> float:
    rng = np.random.default_rng(HELDOUT_SEED)
    images = np.stack([make_scene(rng).image for _ in range(n)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    a = ((x + 1) * 127.5).round()
    b = ((rec + 1) * 127.5).round()
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255**2 / mse)).mean())


def clip_logits(pipe, crops: list[np.ndarray], texts: list[str]) -> torch.Tensor:
    from mrgd.guidance import clip_pixels

    size = pipe.scorer.config.vision_config.image_size
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = pipe.scorer_tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = pipe.scorer.get_image_features(pixel_values=clip_pixels(x, size))
        txt = pipe.scorer.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


def text_control(pipe, n: int, feather: float | None = None, region_context: float | None = None) -> dict:
    """Shape, colour and background right on n seeded layouts; `feather` / `region_context` override the defaults
    (benchmarks/layout_sweep.py), None keeps them."""
    rng = np.random.default_rng(HELDOUT_SEED + 1)
    obj_extra = {} if feather is None else {"feather": feather}
    canvas_extra = {} if region_context is None else {"region_context": region_context}
    right = {"colour": 0, "background": 0, "shape": 0}
    examples = []
    for i in range(n):
        colour, shape, bg = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(BACKGROUNDS)
        side = rng.uniform(0.4, 0.55)
        x, y = rng.uniform(0, 1 - side, 2)
        layout = Layout.from_dict({"size": [128, 128], "seed": int(rng.integers(1 << 30)), **canvas_extra, "regions": [
            {"id": "bg", "kind": "background", "box": [0, 0, 1, 1], "prompt": str(bg)},
            {"id": "obj", "box": [float(x), float(y), float(side), float(side)], "prompt": f"a {colour} {shape}",
             **obj_extra}]})
        image = np.asarray(pipe.generate(layout).image)
        x0, y0, x1, y1 = box_pixels((x, y, side, side), (128, 128))
        crop = image[y0:y1, x0:x1]
        got_colour = read_colour(crop.reshape(-1, 3))
        got_bg = read_background(image, [(x0, y0, x1, y1)])
        phrases = [f"a {got_colour or colour} {s}" for s in SHAPES]
        got_shape = SHAPES[int(clip_logits(pipe, [crop], phrases)[0].argmax())]
        right["colour"] += got_colour == colour
        right["background"] += got_bg == bg
        right["shape"] += got_shape == shape
        if i < 8:
            examples.append({"prompt": f"a {colour} {shape} on {bg}", "read": [got_colour, got_shape, got_bg]})
    return {k: v / n for k, v in right.items()} | {"n": n, "examples": examples}


def scorer_accuracy(pipe, n: int = 300) -> float:
    rng = np.random.default_rng(HELDOUT_SEED + 2)
    phrases = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    crops, truth = [], []
    for _ in range(n):
        image, obj, _ = make_object_crop(rng, 64)
        crops.append(image)
        truth.append(phrases.index(obj.phrase))
    pred = clip_logits(pipe, crops, phrases).argmax(1).numpy()
    return float((pred == np.array(truth)).mean())


def clipseg_iou(pipe, n: int = 150) -> float:
    from mrgd.guidance import Segmenter

    seg = Segmenter(pipe.guidance_model, pipe.guidance_tokenizer)
    rng = np.random.default_rng(HELDOUT_SEED + 3)
    ious = []
    for _ in range(n):
        scene = make_scene(rng)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        same = [o for o in scene.objects if o.phrase == obj.phrase]
        truth = np.any([o.mask for o in same], axis=0)
        x = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            pred = seg(x, [obj.phrase], (128, 128))[0].numpy() > 0.5
        union = (pred | truth).sum()
        ious.append((pred & truth).sum() / union if union else 1.0)
    return float(np.mean(ious))


def edit_speed(pipe) -> dict:
    edit = Edit.load(Path(__file__).parents[1] / "examples" / "three_regions.json")
    edit.mrgd.method = "p2p"
    pipe.edit(edit)  # warm-up
    t0 = time.perf_counter()
    result = pipe.edit(edit)
    return {"seconds": round(time.perf_counter() - t0, 2), "unet_calls": result.info["unet_calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--layouts", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/model_quality.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    results = {"model": args.model, "threads": torch.get_num_threads()}
    for name, fn in [("vae_psnr_db", lambda: vae_psnr(pipe)), ("scorer_top1", lambda: scorer_accuracy(pipe)),
                     ("clipseg_miou", lambda: clipseg_iou(pipe)), ("text_control", lambda: text_control(pipe, args.layouts)),
                     ("edit_speed_p2p", lambda: edit_speed(pipe))]:
        t0 = time.perf_counter()
        results[name] = fn()
        print(f"{name}: {results[name] if not isinstance(results[name], dict) else {k: v for k, v in results[name].items() if k != 'examples'}}"
              f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    targets = {"vae_psnr_db": 26, "scorer_top1": 0.85, "clipseg_miou": 0.7}
    results["targets_met"] = {k: results[k] >= v for k, v in targets.items()} | {
        "colour": results["text_control"]["colour"] >= 0.9, "background": results["text_control"]["background"] >= 0.9,
        "shape": results["text_control"]["shape"] >= 0.75, "speed": results["edit_speed_p2p"]["seconds"] <= 20}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
