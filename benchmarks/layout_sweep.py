"""Text control (model_quality.py's oracle) across feather ratios and region-context windows: how the fusion's
two layout knobs trade colour against shape on one model.

    python benchmarks/layout_sweep.py [--model DIR] [--layouts 100] [--feather 0.2 0.4 ...] [--context 0 ...]
                                      [--out benchmarks/results/feather]

Every (feather, context) pair runs the same seeded layouts (a background and one object box of 0.4-0.55 of the
canvas, 128 px), so the rows differ only by the knob. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_quality import text_control  # noqa: E402

from mrgd.models import DEFAULT_MODEL, load_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--layouts", type=int, default=100)
    parser.add_argument("--feather", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 1.0])
    parser.add_argument("--context", type=float, nargs="+", default=[0.0])
    parser.add_argument("--out", default="benchmarks/results/feather")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    rows = []
    for context in args.context:
        for feather in args.feather:
            t0 = time.perf_counter()
            result = text_control(pipe, args.layouts, feather=feather, region_context=context)
            rows.append({"feather": feather, "region_context": context, "seconds": round(time.perf_counter() - t0, 1)}
                        | {k: result[k] for k in ("colour", "background", "shape")})
            print(rows[-1], file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "layouts": args.layouts,
                                                    "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    lines = [f"# Text control by feather ratio and region context ({args.layouts} layouts, model `{args.model}`)", "",
             "`python benchmarks/layout_sweep.py` (model_quality.py's oracle: colour and background read from pixels, "
             "shape by the CLIP scorer).", "", "| feather | region_context | colour | background | shape |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['feather']} | {r['region_context']} | {r['colour']:.2f} | {r['background']:.2f} | {r['shape']:.2f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
