"""Re-tune the guidance λ's for our gradient convention (∇ w.r.t. x̂0, not x̂0/0.18215; method.md §6).

    python benchmarks/tune_guidance.py [--model DIR] [--limit 12] [--scales 0,0.03,0.1,0.3,1]

Runs a balanced subset of the shapes suite with MRGD at several multiples of the research-code λ's
(1000, 2000, 300) and records CLIP / SSIM-e / SSIM-i per task, plus P2P* as the reference, into
benchmarks/results/guidance_tuning.{json,md}. Uses the bench harness, so runs resume.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrgd.bench import Variant, run_bench
from mrgd.models import DEFAULT_MODEL, load_pipeline

RESEARCH = {"lambda_rs": 1000.0, "lambda_is": 2000.0, "lambda_ip": 300.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--suite", default="benchmarks/suites/shapes-61")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--scales", default="0.03,0.1,0.3,1")
    parser.add_argument("--work", default="runs/tune-guidance")
    parser.add_argument("--out", default="benchmarks/results/guidance_tuning")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    variants = [Variant("p2p", "P2P*", {"method": "p2p"})]
    for scale in [float(s) for s in args.scales.split(",")]:
        overrides = {"method": "mrgd", **{k: v * scale for k, v in RESEARCH.items()}}
        variants.append(Variant(f"mrgd-x{scale:g}", f"MRGD, λ × {scale:g}", overrides))
    summary = run_bench(pipe, args.suite, args.work, variants, limit=args.limit, scorer=pipe.scorer,
                        scorer_tokenizer=pipe.scorer_tokenizer, scorer_name="embedded CLIP")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"variants": [v.__dict__ for v in variants],
                                                    "summary": summary["summary"]}, indent=2, default=str) + "\n")
    table = Path(args.work) / "results.md"
    out.with_suffix(".md").write_text(f"# Guidance λ tuning ({args.limit} pairs of {args.suite})\n\n"
                                      "Scales multiply the research code's λ = (1000, 2000, 300).\n\n"
                                      + table.read_text())
    print(table.read_text())


if __name__ == "__main__":
    main()
