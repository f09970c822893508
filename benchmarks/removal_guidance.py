"""Which part of multi-region guidance hurts removals? MRGD on the shapes suite's removal pairs with the source
guided (method.md §6, the research code) or not, and with each loss switched off.

    python benchmarks/removal_guidance.py [--model DIR] [--pairs 10] [--work runs/removal-guidance]
                                          [--out benchmarks/results/removal-guidance]

Uses the bench harness (resumable; the paper's Table 1 metrics). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrgd.bench import Variant, run_bench
from mrgd.models import DEFAULT_MODEL, load_pipeline

VARIANTS = [
    Variant("both", "source and target guided (§6)", {"method": "mrgd", "guide_source_on_removal": True}),
    Variant("both-noip", "both guided, λ_ip 0", {"method": "mrgd", "guide_source_on_removal": True, "lambda_ip": 0.0}),
    Variant("both-nors", "both guided, λ_rs 0", {"method": "mrgd", "guide_source_on_removal": True, "lambda_rs": 0.0}),
    Variant("target", "target guided (default)", {"method": "mrgd"}),
    Variant("target-nois", "target guided, λ_is 0", {"method": "mrgd", "lambda_is": 0.0}),
    Variant("none", "no guidance", {"method": "mrgd", "guidance": False}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--suite", default="benchmarks/suites/shapes-61")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--work", default="runs/removal-guidance")
    parser.add_argument("--out", default="benchmarks/results/removal-guidance")
    args = parser.parse_args()
    suite = Path(args.suite).resolve()
    entries = [e for e in json.loads((suite / "suite.json").read_text()) if e["task"] == "remove"][: args.pairs]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "suite.json"  # absolute file paths: the listing lives outside the suite folder
    listing.write_text(json.dumps([dict(e, file=str(suite / e["file"])) for e in entries], indent=1) + "\n")
    results = run_bench(load_pipeline(args.model), listing, work / "bench", VARIANTS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = (work / "bench" / "results.md").read_text()
    out.with_suffix(".md").write_text(f"# Guidance on removals ({len(entries)} removal pairs of {args.suite})\n\n"
                                      f"`python benchmarks/removal_guidance.py --pairs {args.pairs}`\n\n" + table)


if __name__ == "__main__":
    main()
