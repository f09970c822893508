"""Speed of a 3-region edit per method, against plain StableDiffusionPipeline for the same S+T pair.

    python benchmarks/speed.py [--model DIR] [--edit examples/three_regions.json] [--repeats 3]

Writes benchmarks/results/speed.json and speed.md. The plain SD baseline denoises the source and target prompts
(global prompt + every region prompt of that image) as one batch of two, on the same model and steps: what a user
pays for two unrelated images without any region control.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mrgd.layout import Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline


def time_it(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--edit", default=str(Path(__file__).parents[1] / "examples" / "three_regions.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="multidiffusion,p2p,mrgd")
    parser.add_argument("--out", default="benchmarks/results/speed")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    edit = Edit.load(args.edit)
    rows = {}
    for method in args.methods.split(","):
        variant = Edit.from_dict({**edit.to_dict(), "mrgd": {**edit.mrgd.model_dump(), "method": method}})
        seconds, result = time_it(lambda: pipe.edit(variant), args.repeats)
        rows[method] = {"seconds": round(seconds, 3), "unet_calls": result.info["unet_calls"],
                        "unet_rows": sum(result.info["unet_batch_sizes"]),
                        "phases": {k: round(v, 3) for k, v in result.info["seconds"].items()}}

    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                 scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    prompts = [edit.source().total_prompt(), edit.target().total_prompt()]
    calls = {"n": 0}
    hook = pipe.unet.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    seconds, _ = time_it(lambda: sd(prompts, height=edit.size[1], width=edit.size[0], num_inference_steps=edit.steps,
                                     guidance_scale=edit.guidance_scale,
                                     generator=torch.Generator("cpu").manual_seed(edit.seed)), args.repeats)
    hook.remove()
    rows["plain SD (S+T batch)"] = {"seconds": round(seconds, 3), "unet_calls": calls["n"] // (args.repeats + 1),
                                    "unet_rows": 4 * edit.steps}
    report = {"model": args.model, "edit": args.edit, "steps": edit.steps, "size": list(edit.size),
              "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Speed of one 3-region edit ({edit.size[0]}x{edit.size[1]}, {edit.steps} steps, "
             f"{torch.get_num_threads()} CPU threads)", "", "| method | seconds | UNet calls | UNet rows |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds']:.2f} | {r['unet_calls']} | {r['unet_rows']} |" for name, r in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
