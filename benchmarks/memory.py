"""Memory over many edits in one process: does it stay flat?

    python benchmarks/memory.py [--edits 50] [--method mrgd] [--steps 20] [--out benchmarks/results/memory]

Runs `examples/three_regions.json` on the embedded model `--edits` times in one process (seed varied per edit) and
records the resident set after each (CPU), or the CUDA allocator's allocated and peak bytes (GPU). Flat means the
last edits hold within ±5 % of the level after the first few (warm-up: allocator pools, import-time caches).
For the peak of one edit against the plain pipeline on SD 1.5's architecture, see `speed.py --arch sd15 --size 512`.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from mrgd.layout import Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline, parse_device, parse_dtype

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--method", default="mrgd")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory"))
    args = parser.parse_args()
    device = parse_device(args.device)
    pipe = load_pipeline(str(DEFAULT_MODEL), device=device, dtype=parse_dtype("auto", device))
    base = Edit.load(ROOT / "examples" / "three_regions.json")
    levels, t0 = [], time.perf_counter()
    for n in range(args.edits):
        data = {**base.to_dict(), "seed": base.seed + n, "mrgd": {**base.mrgd.model_dump(), "method": args.method}}
        if args.steps:
            data["steps"] = args.steps
        pipe.edit(Edit.from_dict(data))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            levels.append({"edit": n + 1, "allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
                           "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "rss_mb": resident_mb()})
        else:
            levels.append({"edit": n + 1, "rss_mb": resident_mb()})
        print(f"edit {n + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in levels[-1].items() if k != "edit"), flush=True)
    key = "allocated_mb" if device.type == "cuda" else "rss_mb"
    reference = levels[min(WARMUP, len(levels)) - 1][key]
    after = [level[key] for level in levels[WARMUP:]] or [reference]
    drift = (max(after) - reference) / reference, (min(after) - reference) / reference
    report = {"edits": args.edits, "method": args.method, "device": str(device), "measure": key,
              "after_warmup_mb": round(reference, 1), "max_mb": round(max(after), 1), "min_mb": round(min(after), 1),
              "drift_up": round(drift[0], 4), "drift_down": round(drift[1], 4), "flat": abs(drift[0]) <= 0.05 and abs(drift[1]) <= 0.05,
              "seconds": round(time.perf_counter() - t0, 1), "levels": levels}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Memory over {args.edits} consecutive `{args.method}` edits in one process ({device}, embedded model)", "",
             "`python benchmarks/memory.py`", "",
             f"- {key} after {WARMUP} warm-up edits: {reference:.1f} MB; afterwards between {min(after):.1f} and "
             f"{max(after):.1f} MB ({100 * drift[1]:+.1f} % / {100 * drift[0]:+.1f} %): "
             f"{'flat (within ±5 %)' if report['flat'] else 'NOT flat'}",
             f"- first edit: {levels[0][key]:.1f} MB; last: {levels[-1][key]:.1f} MB; {report['seconds']:.0f} s in all"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
