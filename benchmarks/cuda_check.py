"""What the CUDA path does with the embedded model: pixels against the CPU's, repeatability, host-device syncs.

    python benchmarks/cuda_check.py [--edit examples/three_regions.json] [--dtypes float32,float16,bfloat16]
                                    [--out benchmarks/results/cuda-check]

For each dtype (float32, float16, bfloat16) one `mrgd` edit on CUDA, run twice: mean and largest absolute pixel
difference (0-255) of source and target against the same edit on the CPU in float32, whether the two CUDA runs
gave the same pixels, and with `--deterministic`'s settings (`mrgd.runtime.deterministic`) whether they are
bit-identical. Then one float16 edit under `torch.cuda.set_sync_debug_mode("warn")`: every operation that makes
the host wait for the device, counted by the line of mrgd (or of a library, when mrgd's stack does not show) that
asked for it. Needs a CUDA device; writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA work

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mrgd import runtime  # noqa: E402
from mrgd.layout import Edit  # noqa: E402
from mrgd.models import DEFAULT_MODEL, load_pipeline  # noqa: E402
from speed import timed  # noqa: E402  (beside this file)

ROOT = Path(__file__).resolve().parents[1]


def pixels(result) -> np.ndarray:
    return np.concatenate([np.asarray(result.source, np.int16), np.asarray(result.target, np.int16)], axis=1)


def sync_sites(pipe, edit) -> tuple[Counter, int]:
    """Host-device syncs of one edit, by the innermost frame in mrgd (else the innermost frame of all)."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f"{os.sep}mrgd{os.sep}" in f.filename and "benchmarks" not in f.filename]
        frame = (ours or stack)[-1]
        where = frame.filename.split(f"{os.sep}mrgd{os.sep}")[-1] if ours else Path(frame.filename).name
        sites[f"{where}:{frame.lineno} {(frame.line or '').strip()[:80]}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe.edit(edit)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved
    return sites, sum(sites.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edit", default=str(ROOT / "examples" / "three_regions.json"))
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--guidance-vae", default="auto", help="full: guidance through the VAE (bf16 autocast where "
                        "the GPU has bf16: its deterministic kernels and pixels)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda-check"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_check.py: no CUDA device; run it on a machine with one")
    edit = Edit.load(args.edit)
    edit = Edit.from_dict({**edit.to_dict(),
                           "mrgd": {**edit.mrgd.model_dump(), "method": "mrgd", "guidance_vae": args.guidance_vae}})
    reference = pixels(load_pipeline(str(DEFAULT_MODEL), device="cpu", dtype=torch.float32).edit(edit))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "edit": args.edit, "dtypes": {}}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        pipe = load_pipeline(str(DEFAULT_MODEL), device="cuda", dtype=dtype)
        pipe.edit(edit)  # warm-up
        seconds, _, _, first, _ = timed(lambda: pipe.edit(edit), pipe.device, repeats=1)
        second = pipe.edit(edit)
        try:
            with runtime.deterministic():
                same_deterministic = np.array_equal(pixels(pipe.edit(edit)), pixels(pipe.edit(edit)))
        except RuntimeError as err:  # an operation with no deterministic kernel: say which
            same_deterministic = f"error: {' '.join(str(err).split())[:200]}"
        diff = np.abs(pixels(first) - reference)
        report["dtypes"][name] = {"mean_abs_vs_cpu": round(float(diff.mean()), 3), "max_abs_vs_cpu": int(diff.max()),
                                  "pixels_off_by_more_than_8": round(float((diff > 8).mean()), 4),
                                  "repeat_same_pixels": bool(np.array_equal(pixels(first), pixels(second))),
                                  "deterministic_same_pixels": same_deterministic, "seconds": round(seconds, 3)}
        print(name, report["dtypes"][name], flush=True)
        if name == "float16":
            sites, total = sync_sites(pipe, edit)
            report["syncs"] = {"total": total, "unet_calls": first.info["unet_calls"], "steps": edit.steps,
                               "sites": dict(sites.most_common())}
            print("syncs", total, sites.most_common(12), flush=True)
        del pipe
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# The CUDA path on the embedded model ({report['gpu']}, torch {report['torch']})", "",
             f"`python benchmarks/cuda_check.py --dtypes {args.dtypes} --guidance-vae {args.guidance_vae}`: one `mrgd` edit of `examples/three_regions.json` per dtype against "
             "the CPU's float32 pixels (source and target, 0-255).", "",
             "| dtype | mean abs vs CPU | max abs | share > 8 | repeat same pixels | deterministic same pixels | s/edit |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["dtypes"].items():
        lines.append(f"| {name} | {r['mean_abs_vs_cpu']} | {r['max_abs_vs_cpu']} | {r['pixels_off_by_more_than_8']} | "
                     f"{r['repeat_same_pixels']} | {r['deterministic_same_pixels']} | {r['seconds']} |")
    if "syncs" in report:
        s = report["syncs"]
        lines += ["", f"Host-device syncs in one float16 edit ({s['steps']} steps, {s['unet_calls']} UNet calls): "
                  f"{s['total']}.", "", "| where | count |", "|---|---|"]
        lines += [f"| `{site}` | {n} |" for site, n in s["sites"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
