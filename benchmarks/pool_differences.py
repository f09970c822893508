"""Paired differences of variants against a reference, pooled over several bench folders (several tuning suites):
each pair counts once, whichever suite it comes from.

    python benchmarks/pool_differences.py --reference mrgd-guidance_max_step1.0 \
        --variant mrgd-guidance_every2-guidance_max_step1.0 runs/tune60-c runs/s61-c runs/attr40 [--out F.md]

Folders are bench work folders (their `results.json`: the records of the last run's settings, not older ones kept
in `records.jsonl`); variants are the record names (`compare_settings.py` writes them). Prints a Markdown table (`mrgd.bench.paired_differences`: mean difference [95% bootstrap interval]).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrgd.bench import difference_table, paired_differences

RESULTS = "results.json"


def pooled_table(folders: list[Path], reference: str, variants: list[str]) -> str:
    records = [{**r, "pair": f"{folder}/{r['pair']}"} for folder in folders
               for r in json.loads((folder / RESULTS).read_text())["records"] if r["variant"] in (reference, *variants)]

    lines = [f"Minus `{reference}`, pairs pooled over {', '.join(map(str, folders))}:", "",
             *difference_table(paired_differences(records, reference))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--variant", dest="variants", action="append", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for folder in args.folders:
        if not (folder / RESULTS).exists():
            raise SystemExit(f"{folder}: no {RESULTS}; give bench work folders of finished runs")
    table = pooled_table(args.folders, args.reference, args.variants)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
