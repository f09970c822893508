"""How well a tiny guidance decoder stands in for the VAE: its pictures, its gradients and its cost.

    python benchmarks/tiny_decoder.py [--decoder DIR ...] [--model DIR] [--pairs 6] [--out benchmarks/results/tiny-decoder]

For each decoder (default: the embedded family's `vae_tiny/`; more with `--decoder`):
- PSNR against the VAE's own decoding of the x̂0 guesses guidance decodes (steps 5, 10 and 15 of the source and target
  of tuning-suite edits, `shapes-tune-60`);
- the cosine between L_IP's pixel-term gradient with respect to the target's x̂0 through the decoder and through the
  VAE, on the same x̂0 (guidance moves x̂0 along it: a decoder with good pictures but other gradients steers elsewhere);
  and the ratio of their norms;
- milliseconds for one decode + backward at the edit's size, 1 thread (process CPU time).

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mrgd import fusion
from mrgd.guidance import inherent_mask, scale_boxes
from mrgd.layout import Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suites" / "shapes-tune-60"


def guesses(pipe, edit: Edit, steps=(5, 10, 15)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source x̂0, target x̂0) at the given steps of an MRGD edit."""
    seen = {}
    pipe.edit(edit, callback=lambda s: seen.__setitem__(s["step"], {i: v.clone() for i, v in s["x0"].items()}))
    return [(seen[k][0], seen[k][1]) for k in steps]


def ip_gradient(decode, z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """∇ of L_IP's pixel term (method.md Eq. 4) with respect to the target's x̂0."""
    z = z_t.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = ((mask * (decode(z_s) - decode(z))) ** 2).mean()
        return torch.autograd.grad(loss, z)[0].flatten()


def cost_ms(decode, shape, repeats: int = 10) -> float:
    z = torch.randn(shape, requires_grad=True)
    for _ in range(2):
        decode(z).square().mean().backward()
    start = time.process_time()
    for _ in range(repeats):
        decode(z).square().mean().backward()
    return 1000 * (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", action="append", default=[], help="an AutoencoderTiny folder (repeatable)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--pairs", type=int, default=6, help="tuning-suite edits, taken in turn from each task")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny-decoder"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    decoders = {"vae": pipe.guidance_decoder("full")[1]}
    if pipe.guidance_vae is not None:
        decoders["vae_tiny (shipped)"] = pipe.guidance_decoder("tiny")[1]
    for folder in args.decoder:
        decoders[folder] = pipe.guidance_decoder(folder)[1]

    pairs = json.loads((SUITE / "suite.json").read_text())["pairs"]
    by_task = {task: [p["file"] for p in pairs if p["task"] == task] for task in ("add", "remove", "attribute")}
    files = [by_task[t][i] for i in range(args.pairs) for t in by_task if i < len(by_task[t])][: args.pairs]
    rows = {name: {"psnr": [], "cosine": [], "norm_ratio": []} for name in decoders}
    shape = None
    with torch.no_grad():
        for file in files:
            edit = Edit.load(SUITE / file)
            edited = [fusion.latent_box(r.box, edit.size, pipe.latent_factor) for r in edit.regions if r.role != "inherent"]
            mask = inherent_mask(scale_boxes(edited, pipe.latent_factor), (edit.size[1], edit.size[0]))
            for z_s, z_t in guesses(pipe, edit):
                shape = tuple(z_t.shape)
                reference = {i: decoders["vae"](z) for i, z in enumerate((z_s, z_t))}
                want = ip_gradient(decoders["vae"], z_s, z_t, mask)
                for name, decode in decoders.items():
                    for i, z in enumerate((z_s, z_t)):
                        mse = (decode(z).clamp(-1, 1) - reference[i].clamp(-1, 1)).pow(2).mean().item()
                        rows[name]["psnr"].append(10 * torch.log10(torch.tensor(4 / max(mse, 1e-10))).item())
                    got = ip_gradient(decode, z_s, z_t, mask)
                    rows[name]["cosine"].append(torch.nn.functional.cosine_similarity(got, want, dim=0).item())
                    rows[name]["norm_ratio"].append((got.norm() / want.norm()).item())
    results = {"model": args.model, "pairs": files, "latent_shape": list(shape), "decoders": {}}
    for name, decode in decoders.items():
        r = rows[name]
        results["decoders"][name] = {
            "psnr_vs_vae": round(statistics.mean(r["psnr"]), 2) if name != "vae" else None,
            "ip_gradient_cosine": round(statistics.mean(r["cosine"]), 3),
            "ip_gradient_cosine_min": round(min(r["cosine"]), 3),
            "ip_gradient_norm_ratio": round(statistics.mean(r["norm_ratio"]), 3),
            "decode_backward_ms": round(cost_ms(decode, shape), 1),
        }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Tiny guidance decoders against the VAE", "",
             f"`python benchmarks/tiny_decoder.py {' '.join('--decoder ' + d for d in args.decoder)} --pairs {args.pairs}`",
             "", f"{len(files)} tuning-suite edits (`shapes-tune-60`: {', '.join(files)}), x̂0 of source and target at "
             "steps 5, 10, 15; gradient = L_IP's pixel term with respect to the target's x̂0. 1 thread.", "",
             "| decoder | PSNR vs VAE (dB) | L_IP gradient cosine to VAE's (mean / min) | norm ratio | decode + backward (ms) |",
             "|---|---|---|---|---|"]
    for name, r in results["decoders"].items():
        psnr = "-" if r["psnr_vs_vae"] is None else f"{r['psnr_vs_vae']:.2f}"
        lines.append(f"| {name} | {psnr} | {r['ip_gradient_cosine']:.3f} / {r['ip_gradient_cosine_min']:.3f} | "
                     f"{r['ip_gradient_norm_ratio']:.3f} | {r['decode_backward_ms']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
