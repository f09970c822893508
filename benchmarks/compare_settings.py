"""MRGD with its defaults against MRGD with chosen settings changed, on a balanced subset of a suite: the quick way
to try a λ or a switch before changing a default.

    python benchmarks/compare_settings.py --set lambda_is=0 --set lambda_is=2 [--limit 12] [--model DIR]
                                          [--work runs/compare] [--out benchmarks/results/compare] [--papers-rules]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 benchmarks/compare_settings.py ...
                                                     # the jobs split over two CPU processes (on GPUs: no variable)

Each --set is one variant (several settings: --set "lambda_is=2,lambda_ip=150"); values are read as JSON
(numbers, true/false) and validated by the edit's settings. `--papers-rules` adds MRGD with every rule of ours that
changes the composite, r_total, attention control or L_IP set back to the research code's (`layout.PAPERS_RULES`). Uses the bench harness (resumable). Writes
<out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from mrgd.bench import Variant, process_state, run_bench
from mrgd.layout import PAPERS_RULES, Settings
from mrgd.models import DEFAULT_MODEL, load_pipeline


def parse_set(text: str) -> dict:
    """'lambda_is=2,guidance=false' -> {"lambda_is": 2, "guidance": False}, checked against Settings."""
    overrides = {}
    for item in re.split(r",(?=\s*\w+=)", text):  # commas inside a JSON value (a list) stay in it
        key, _, value = item.partition("=")
        if key.strip() not in Settings.model_fields or not value:
            raise SystemExit(f"--set: {item!r} is not SETTING=VALUE with SETTING a field of mrgd.layout.Settings")
        overrides[key.strip()] = json.loads(value)
    Settings(**overrides)  # fail here, not in the middle of a run
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], type=parse_set)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--suite", default="benchmarks/suites/shapes-61")
    parser.add_argument("--limit", type=int, default=12, help="pairs, taken in turn from each task; 0: all")
    parser.add_argument("--baselines", action="store_true", help="also MultiDiffusion and P2P* on the same pairs")
    parser.add_argument("--papers-rules", action="store_true", help="also MRGD with the research code's rules")
    parser.add_argument("--work", default="runs/compare")
    parser.add_argument("--out", default="benchmarks/results/compare")
    args = parser.parse_args()
    variants = [Variant("multidiffusion", "MultiDiffusion", {"method": "multidiffusion"}),
                Variant("p2p", "P2P*", {"method": "p2p"})] if args.baselines else []
    variants.append(Variant("mrgd", "MRGD (defaults)", {"method": "mrgd"}))
    if args.papers_rules:
        variants.append(Variant("mrgd-papers-rules", "MRGD, the paper's rules", {"method": "mrgd", **PAPERS_RULES}))
    for overrides in args.sets:
        label = ", ".join(f"{k} {v}" for k, v in overrides.items())
        variants.append(Variant("mrgd-" + "-".join(f"{k}{v}" for k, v in overrides.items()), label,
                                {"method": "mrgd", **overrides}))
    results = run_bench(load_pipeline(args.model), args.suite, Path(args.work), variants, limit=args.limit or None,
                        state=process_state())
    if results is None:  # not the main process
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    command = "python benchmarks/compare_settings.py " + " ".join(
        "--set " + shlex.quote(",".join(f"{k}={json.dumps(v)}" for k, v in o.items())) for o in args.sets) + f" --limit {args.limit}" + " --baselines" * args.baselines + " --papers-rules" * args.papers_rules
    if args.suite != parser.get_default("suite"):
        command += f" --suite {args.suite}"
    out.with_suffix(".md").write_text(f"# MRGD settings compared\n\n`{command}`\n\n"
                                      + (Path(args.work) / "results.md").read_text())


if __name__ == "__main__":
    main()
