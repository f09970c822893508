"""`mrgd bench`: the paper's Table 1 protocol (method.md §8) over a suite of edit files, resumable and split
across processes with accelerate (design.md, "Scale out").

A *job* is one (pair, variant): a suite's edit file run with one method or ablation. Every finished job is one
JSON line in ``OUT/records.jsonl`` (``records.rank<k>.jsonl`` per process under ``accelerate launch``), written
the moment it finishes, so an interrupted bench resumes where it stopped. At the end the main process merges the
records and writes ``results.json``, ``results.md`` and one contact sheet per task.

Every variant of a pair uses the pair's seed, and the pipeline seeds each edit from its file, so the numbers do
not depend on how the jobs were split between processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import InputError
from .layout import Edit, read_config_file

METHODS = ("multidiffusion", "p2p", "mrgd")
METHOD_LABELS = {"multidiffusion": "MultiDiffusion", "p2p": "P2P*", "mrgd": "MRGD"}
TASKS = ("add", "remove", "attribute")  # the paper's column order; other task names follow
ROLE_TASKS = {"added": "add", "removed": "remove", "modified": "attribute"}
RECORDS = "records.jsonl"
CONFIG = "bench.json"
MAX_SHEET_ROWS = 25
METRICS = ("clip", "ssim_e", "ssim_i")
REFERENCE = "mrgd"  # the variant every other one is compared with, pair by pair (`paired_differences`)
# Each task's pairs split by `metrics.overlaps_inherent`: an edited box intersects an inherent foreground box.
CLASSES = ("overlap", "separate")


# ---------------------------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: a name (used in file names and records), a table label and the overrides
    applied to each edit's ``mrgd`` settings block."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


ABLATIONS = (
    Variant("mrgd-no-guidance", "MRGD, no guidance", {"method": "mrgd", "guidance": False}),
    Variant("mrgd-no-kssa", "MRGD, no KSSA", {"method": "mrgd", "kssa": False}),
    Variant("mrgd-no-total", "MRGD, no r_total", {"method": "mrgd", "use_total": False}),
    Variant("mrgd-no-keywords", "MRGD, no keyword selection", {"method": "mrgd", "keywords": 0}),
)


def parse_methods(text: str) -> list[str]:
    """``"multidiffusion,p2p"`` -> the method names, checked; errors are one-line :class:`InputError`."""
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods:
        raise InputError("--methods: no method given; use some of multidiffusion, p2p, mrgd")
    for method in methods:
        if method not in METHODS:
            raise InputError(f"--methods: unknown method {method!r}; use some of multidiffusion, p2p, mrgd")
    return list(dict.fromkeys(methods))


def variants(methods: Sequence[str] = METHODS, ablations: bool = False) -> list[Variant]:
    """The variants of a bench: each method as is, then (with ``ablations``) MRGD with one component off."""
    chosen = [Variant(m, METHOD_LABELS[m], {"method": m}) for m in parse_methods(",".join(methods))]
    return chosen + (list(ABLATIONS) if ablations else [])


# ---------------------------------------------------------------------------------------------------------------
# Suites


@dataclass
class Pair:
    """One edit of a suite."""

    name: str  # the file's stem; unique in a suite
    file: str  # as written in suite.json, relative to the suite folder
    task: str
    description: str
    edit: Edit

    def edit_for(self, variant: Variant) -> Edit:
        """The pair's edit with the variant's settings; same seed, canvas and regions for every variant."""
        data = self.edit.to_dict()
        data["mrgd"] = {**data["mrgd"], **variant.overrides}
        return Edit.from_dict(data, source=f"{self.file} ({variant.name})")


def job_digest(edit: Edit) -> str:
    """What a job's record was made from: a digest of its edit with every setting resolved. A record counts as done
    only while its variant still resolves to the same edit: a default changed since, or a variant name reused with
    other overrides, runs the job again instead of reporting the old pictures under the new settings."""
    return hashlib.sha256(json.dumps(edit.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _task_of(edit: Edit, path: Path) -> str:
    tasks = {ROLE_TASKS[role] for role in edit.roles().values() if role in ROLE_TASKS}
    if not tasks:
        raise InputError(f"{path}: changes nothing; a bench pair must add, remove or modify a region")
    return tasks.pop() if len(tasks) == 1 else "mixed"


def _suite_entries(suite: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(base folder, entries) of a suite folder, a suite .json list (or a ``{"pairs": [...], ...}`` object that
    also says what the suite is for, see :func:`suite_info`), or a folder of edit files."""
    if suite.is_file():
        base, listing = suite.parent, suite
    elif suite.is_dir():
        base, listing = suite, suite / "suite.json"
    else:
        raise InputError(f"SUITE: {suite} not found; give a folder holding suite.json or edit files")
    if not listing.exists():
        files = sorted(p for p in base.iterdir() if p.suffix.lower() in (".json", ".yaml", ".yml") and p.is_file())
        if not files:
            raise InputError(f"SUITE: {base} holds no suite.json and no edit files (.json/.yaml); "
                             "give a folder holding suite.json or edit files")
        return base, [{"file": p.name} for p in files]
    try:
        entries = json.loads(listing.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{listing}: cannot read it as JSON ({type(err).__name__}); fix the file") from None
    if isinstance(entries, dict):
        entries = entries.get("pairs")
    if not isinstance(entries, list) or not entries:
        raise InputError(f'{listing}: expected a non-empty list of {{"file": ..., "task": ...}} entries')
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise InputError(f'{listing}: [{i}].file: missing; give each entry {{"file": "add-00.json", "task": "add"}}')
    return base, entries


def suite_info(suite: str | Path) -> dict[str, Any]:
    """What a suite's suite.json says about itself when it is an object: ``role`` ("tuning", "test") and
    ``about``; empty for a plain list or a folder of edit files."""
    suite = Path(suite)
    listing = suite if suite.is_file() else suite / "suite.json"
    try:
        data = json.loads(listing.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: data[k] for k in ("role", "about") if isinstance(data, dict) and isinstance(data.get(k), str)}


def load_suite(suite: str | Path, limit: int | None = None, steps: int | None = None) -> list[Pair]:
    """The pairs of a suite, each edit validated (and with ``steps`` DDIM steps when given).

    ``limit`` keeps at most that many pairs, chosen in turn from each task (add, remove, attribute, add, ...) so
    that even a short run fills every column of the table, and kept in suite order.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit: {limit} is not a positive number of pairs; use e.g. --limit 6")
    if steps is not None and steps < 1:
        raise InputError(f"--steps: {steps} is not a positive number of steps; use e.g. --steps 20")
    base, entries = _suite_entries(Path(suite))
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for entry in entries:
        path = base / entry["file"]
        data = read_config_file(path)
        if steps is not None:
            data = {**data, "steps": steps}
        edit = Edit.from_dict(data, source=str(path))
        name = Path(entry["file"]).stem
        if name in seen:
            raise InputError(f"SUITE: {entry['file']} and {seen[name]} share the name {name!r}; rename one")
        seen[name] = entry["file"]
        task = _task_of(edit, path)  # also refuses a pair that changes nothing, whatever task it claims
        task = entry.get("task") or task
        pairs.append(Pair(name, entry["file"], str(task), str(entry.get("description", "")), edit))
    if limit is None or limit >= len(pairs):
        return pairs
    by_task: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_task.setdefault(pair.task, []).append(pair)
    queues = [by_task[t] for t in _task_order(by_task)]
    chosen: set[str] = set()
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.add(queue.pop(0).name)
    return [pair for pair in pairs if pair.name in chosen]  # in suite order


def _task_order(tasks: Iterable[str]) -> list[str]:
    tasks = list(dict.fromkeys(tasks))
    return [t for t in TASKS if t in tasks] + [t for t in tasks if t not in TASKS]


# ---------------------------------------------------------------------------------------------------------------
# Records


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file; a line cut short by an interrupted run is skipped (its job runs again)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "pair" in record and "variant" in record:
            records.append(record)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line and flush it to disk at once."""
    with open(path, "ab") as handle:
        if handle.tell() and _last_byte(path) != b"\n":
            handle.write(b"\n")  # the previous run died mid-line; start a clean line
        handle.write((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _rank_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("records.rank*.jsonl"))


def _all_records(out_dir: Path) -> list[dict[str, Any]]:
    """records.jsonl then every rank file, one record per (pair, variant, edit digest) (the first one wins)."""
    merged: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for path in [out_dir / RECORDS, *_rank_files(out_dir)]:
        for record in read_records(path):
            merged.setdefault((record["pair"], record["variant"], record.get("digest")), record)
    return list(merged.values())


def _digests(jobs: Sequence[tuple[Pair, Variant]]) -> dict[tuple[str, str], str]:
    return {(pair.name, variant.name): job_digest(pair.edit_for(variant)) for pair, variant in jobs}


def _is_current(record: dict[str, Any], digests: dict[tuple[str, str], str]) -> bool:
    return record.get("digest") is not None and digests.get((record["pair"], record["variant"])) == record["digest"]


def bench_config(suite_dir: str | Path, model: str, dtype, steps: int | None, scorer: str | None) -> dict[str, Any]:
    """What a bench folder's records depend on (kept in bench.json); a resumed run must match it.
    ``scorer`` None means the model family's own CLIP, if it has one."""
    return {"suite": str(Path(suite_dir).resolve()), "model": model, "dtype": str(dtype).replace("torch.", ""),
            "steps": steps, "scorer": scorer}


def check_out_dir(out_dir: str | Path, config: dict[str, Any] | None = None) -> None:
    """Refuse an output that is a file, a folder holding other things than a bench (no records.jsonl), or a
    bench run with other settings than ``config``."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"-o: {out_dir} exists and is not a folder; choose another output path")
    if (out_dir / RECORDS).exists() or (out_dir / CONFIG).exists() or _rank_files(out_dir):
        if config is not None:
            _check_config(out_dir, config)
        return  # a bench folder: resumed in place
    if any(out_dir.iterdir()):
        raise InputError(f"-o: {out_dir} holds other files and no {RECORDS}; choose a new or empty folder "
                         "(a bench folder is resumed in place)")


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / CONFIG
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    for key, value in config.items():
        if key in before and before[key] != value:
            raise InputError(f"-o: {out_dir} holds a bench run with {key} {before[key]!r}, this run has {value!r}; "
                             "resume with the same settings or choose another folder")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Running


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def image_paths(pair: str, variant: str, digest: str | None = None) -> tuple[str, str]:
    """Source and target image paths of a job, relative to the bench folder (a variant named after a setting's
    value may hold a folder path: its separators become "_"). With `digest`: the paths of a job re-run under new
    settings, beside the pictures its older record still points to."""
    variant = re.sub(r"[/\\:\x00-\x1f]", "_", variant)
    stem = f"images/{pair}__{variant}" + (f"__{digest}" if digest else "")
    return f"{stem}__source.png", f"{stem}__target.png"


def run_job(pipe, pair: Pair, variant: Variant, out_dir: Path, scorer=None, scorer_tokenizer=None,
            taken: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run one (pair, variant), save its two pictures and return its record. `taken`: pictures other records
    point to, which are not written over."""
    from .metrics import clip_in_box, overlaps_inherent, ssim_e, ssim_i
    from .render import save_png

    edit = pair.edit_for(variant)
    t0 = time.perf_counter()
    result = pipe.edit(edit)
    seconds = time.perf_counter() - t0
    digest = job_digest(edit)
    source_path, target_path = image_paths(pair.name, variant.name)
    if target_path in taken:
        source_path, target_path = image_paths(pair.name, variant.name, digest)
    config = edit.to_dict()
    save_png(result.source, out_dir / source_path, config, pipe.name, "source")
    save_png(result.target, out_dir / target_path, config, pipe.name, "target")
    clip_regions = clip_in_box(result.target, edit, scorer, scorer_tokenizer) if scorer is not None else None
    scores = [s for s in (clip_regions or {}).values() if math.isfinite(s)]
    return {
        "pair": pair.name, "variant": variant.name, "label": variant.label, "task": pair.task, "file": pair.file,
        "overlap": overlaps_inherent(edit), "seed": edit.seed, "steps": edit.steps, "size": list(edit.size),
        "clip": sum(scores) / len(scores) if scores else None,
        "clip_regions": clip_regions,
        "ssim_e": _number(ssim_e(result.source, result.target, edit)),
        "ssim_i": _number(ssim_i(result.source, result.target, edit)),
        "seconds": round(seconds, 4), "unet_calls": result.info["unet_calls"],
        "notes": result.info.get("notes", []), "source": source_path, "target": target_path,
        "digest": digest,
    }


def process_state():
    """accelerate's view of the processes (one, unless started with `accelerate launch`).

    Processes started by torchrun on a machine without an accelerator (``accelerate launch --multi_gpu
    --num_processes N`` there, or with ACCELERATE_USE_CPU=1) join as CPU processes over gloo; PartialState would
    otherwise take each for a lone process. The barrier timeout is long: a process that finished its share waits
    for the slowest one.
    """
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=use_cpu or not has_accelerator, timeout=timedelta(days=3))


def run_bench(pipe, suite_dir: str | Path, out_dir: str | Path, variants: Sequence[Variant], *,
              limit: int | None = None, steps: int | None = None, scorer=None, scorer_tokenizer=None,
              scorer_name: str | None = None, state=None,
              log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Run every (pair, variant) not yet in ``out_dir`` and write the tables.

    ``scorer``/``scorer_tokenizer`` (a transformers CLIPModel) default to the pipeline's; without any, CLIP is
    null. ``state`` is an accelerate ``PartialState``: with several processes the pending jobs are split between
    them and the main process merges their records. Returns the results (as in results.json) on the main
    process, None on the others.
    """
    out_dir = Path(out_dir)
    log = log or (lambda message: None)
    if scorer is None:
        scorer, scorer_tokenizer, scorer_name = pipe.scorer, pipe.scorer_tokenizer, None
    else:
        scorer_name = scorer_name or "custom"
    pairs = load_suite(suite_dir, limit=limit, steps=steps)
    jobs = [(pair, variant) for pair in pairs for variant in variants]
    config = bench_config(suite_dir, pipe.name, pipe.dtype, steps, scorer_name)
    distributed = state is not None and state.num_processes > 1
    is_main = state is None or state.is_main_process

    # Everyone reads before anyone writes, so every process computes the same pending list.
    check_out_dir(out_dir, config)
    digests, records = _digests(jobs), _all_records(out_dir)
    done = {(r["pair"], r["variant"]) for r in records if _is_current(r, digests)}
    taken = frozenset(r.get("target") for r in records)
    pending = [job for job in jobs if (job[0].name, job[1].name) not in done]
    if distributed:
        state.wait_for_everyone()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if is_main:
        _write_text(out_dir / CONFIG, json.dumps(config, indent=2) + "\n")
    if is_main and len(pending) < len(jobs):
        log(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} jobs already done")

    records_path = out_dir / (f"records.rank{state.process_index}.jsonl" if distributed else RECORDS)
    prefix = f"[rank {state.process_index}] " if distributed else ""
    split = state.split_between_processes(pending) if distributed else nullcontext(pending)
    with split as mine:
        for n, (pair, variant) in enumerate(mine, 1):
            record = run_job(pipe, pair, variant, out_dir, scorer, scorer_tokenizer, taken)
            append_record(records_path, record)
            clip = "n/a" if record["clip"] is None else f"{record['clip']:.2f}"
            log(f"{prefix}[{n}/{len(mine)}] {pair.name} {variant.name}: CLIP {clip}, SSIM-e {_fmt(record['ssim_e'], 4)}, "
                f"SSIM-i {_fmt(record['ssim_i'], 4)}, {record['seconds']:.1f} s, {record['unet_calls']} UNet calls")

    if distributed:
        state.wait_for_everyone()
    if not is_main:
        return None
    return finish(out_dir, jobs, config, digests)


def finish(out_dir: Path, jobs: Sequence[tuple[Pair, Variant]], config: dict[str, Any],
           digests: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    """Merge the rank files into records.jsonl, then write results.json, results.md and the contact sheets from the
    records of these jobs as they are now (`job_digest`); records of other jobs or older settings stay in the file."""
    order = {(pair.name, variant.name): i for i, (pair, variant) in enumerate(jobs)}
    digests = digests or _digests(jobs)
    records = _all_records(out_dir)
    records.sort(key=lambda r: (not _is_current(r, digests), order.get((r["pair"], r["variant"]), len(order))))
    _write_text(out_dir / RECORDS, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    for path in _rank_files(out_dir):
        path.unlink()
    current = [r for r in records if _is_current(r, digests)]
    from .metrics import overlaps_inherent

    pair_of = {pair.name: pair for pair, _ in jobs}
    for record in current:  # records written before the overlap class existed
        if "overlap" not in record:
            record["overlap"] = overlaps_inherent(pair_of[record["pair"]].edit)
    summary = summarise(current)
    variant_list = list({v.name: v for _, v in jobs}.values())
    results = {"config": config, "suite": suite_info(config["suite"]), "variants": [{"name": v.name, "label": v.label, "overrides": v.overrides}
                                              for v in variant_list],
               "records": current, "summary": summary}
    _write_text(out_dir / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_markdown(summary, out_dir / "results.md", config=config, records=current, suite=results["suite"])
    for task in summary["tasks"]:
        contact_sheet([r for r in current if r["task"] == task], out_dir, out_dir / f"sheet-{task}.png")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-task, per-variant means of CLIP, SSIM-e, SSIM-i, seconds and UNet calls (nulls left out of means).

    Returns ``{"tasks", "variants", "labels", "table": {variant: {task: {n, clip, ssim_e, ssim_i, seconds,
    unet_calls}}}, "split": {variant: {task: {"overlap" | "separate": {n, clip, ssim_e, ssim_i}}}},
    "cost": {variant: {n, seconds, unet_calls}}}``; variants and tasks in order of appearance (tasks: add, remove,
    attribute first). ``split`` divides each task by the records' ``overlap`` class (`metrics.overlaps_inherent`);
    records without one are left out of it.
    """
    tasks = _task_order(r["task"] for r in records)
    names = list(dict.fromkeys(r["variant"] for r in records))
    labels = {r["variant"]: r.get("label", r["variant"]) for r in records}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    split: dict[str, dict[str, dict[str, Any]]] = {}
    cost: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in records if r["variant"] == name]
        table[name] = {}
        for task in tasks:
            cell = [r for r in mine if r["task"] == task]
            table[name][task] = {"n": len(cell), **{m: _mean(r[m] for r in cell) for m in METRICS},
                                 "seconds": _mean(r["seconds"] for r in cell),
                                 "unet_calls": _mean(r["unet_calls"] for r in cell)}
        split[name] = {task: {cls: _cell([r for r in mine if r["task"] == task and "overlap" in r
                                          and r["overlap"] == (cls == "overlap")]) for cls in CLASSES}
                       for task in tasks}
        cost[name] = {"n": len(mine), "seconds": _mean(r["seconds"] for r in mine),
                      "unet_calls": _mean(r["unet_calls"] for r in mine)}
    reference = REFERENCE if REFERENCE in names else None
    return {"tasks": tasks, "variants": names, "labels": labels, "table": table, "split": split, "cost": cost,
            "reference": reference, "differences": paired_differences(records, reference) if reference else {}}


def paired_differences(records: Sequence[dict[str, Any]], reference: str, *, confidence: float = 0.95,
                       resamples: int = 2000) -> dict[str, Any]:
    """Each variant minus ``reference`` on the same pairs: the mean per-pair difference of every metric, with a
    percentile bootstrap interval over pairs (scipy; seeded, so the tables are reproducible).

    One pair's CLIP-in-box can move by tens of points between settings, so a gap between two means of 8-20 pairs
    says little by itself; the interval says whether it is more than that noise. Returns ``{variant: {task: {"all" |
    "overlap" | "separate": {"n", metric: {"mean", "low", "high"} | None}}}}``; classes without pairs are left out,
    and intervals need at least 3 pairs (low and high are then None).
    """
    import numpy as np
    from scipy.stats import bootstrap

    ref = {r["pair"]: r for r in records if r["variant"] == reference}
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        if name == reference:
            continue
        # in pair order, so that the seeded resampling does not depend on the order the records were written in
        mine = sorted(((r, ref[r["pair"]]) for r in records if r["variant"] == name and r["pair"] in ref),
                      key=lambda rb: rb[0]["pair"])
        out[name] = {}
        for task in _task_order(r["task"] for r, _ in mine):
            classes: dict[str, Any] = {}
            for cls in ("all", *CLASSES):
                pairs = [(r, b) for r, b in mine if r["task"] == task
                         and (cls == "all" or r.get("overlap") == (cls == "overlap"))]
                if not pairs or (cls != "all" and len(pairs) == classes["all"]["n"]):
                    continue  # no pairs, or the same pairs as the whole task
                cell: dict[str, Any] = {"n": len(pairs)}
                for metric in METRICS:
                    diffs = np.array([r[metric] - b[metric] for r, b in pairs
                                      if r[metric] is not None and b[metric] is not None], float)
                    diffs = diffs[np.isfinite(diffs)]
                    if not len(diffs):
                        cell[metric] = None
                        continue
                    low = high = None
                    if len(diffs) >= 3 and np.ptp(diffs) > 0:
                        ci = bootstrap((diffs,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                       method="percentile", rng=np.random.default_rng(0)).confidence_interval
                        low, high = float(ci.low), float(ci.high)
                    elif len(diffs) >= 3:
                        low = high = float(diffs[0])
                    cell[metric] = {"mean": float(diffs.mean()), "low": low, "high": high}
                classes[cls] = cell
            out[name][task] = classes
    return out


def _cell(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(records), **{m: _mean(r[m] for r in records) for m in METRICS}}


def _fmt(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def write_markdown(summary: dict[str, Any], path: str | Path, *, config: dict[str, Any] | None = None,
                   records: Sequence[dict[str, Any]] = (), suite: dict[str, Any] | None = None) -> str:
    """results.md: the paper's Table 1 layout (rows variants; per task CLIP / SSIM-e / SSIM-i), each task split
    into overlapping and separate pairs, then cost."""
    config, suite = config or {}, suite or {}
    tasks, names, labels = summary["tasks"], summary["variants"], summary["labels"]
    counts = {t: max((summary["table"][v][t]["n"] for v in names), default=0) for t in tasks}
    steps = sorted({r["steps"] for r in records})
    steps_text = ", ".join(map(str, steps)) or "?"
    lines = [
        "# MRGD benchmark",
        "",
        f"Model `{config.get('model', '?')}`, DDIM steps {steps_text}"
        f"{' (--steps)' if config.get('steps') else ''}, dtype {config.get('dtype', '?')}; "
        f"{sum(counts.values())} pairs ({', '.join(f'{t} {counts[t]}' for t in tasks)}); "
        "every variant of a pair uses the pair's seed. Metrics as in method.md §8.",
        "",
        *([f"Suite role: **{suite['role']}**. {suite.get('about', '')}".rstrip(), ""] if suite.get("role") else []),
        "| variant | " + " | ".join(f"{t} ({counts[t]}): CLIP / SSIM-e / SSIM-i" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name in names:
        cells = []
        for task in tasks:
            cell = summary["table"][name][task]
            cells.append("–" if not cell["n"] else
                         f"{_fmt(cell['clip'], 2)} / {_fmt(cell['ssim_e'], 4)} / {_fmt(cell['ssim_i'], 4)}")
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    split = summary.get("split")
    if split and any(split[v][t][c]["n"] for v in names for t in tasks for c in CLASSES):
        lines += ["", "Split by overlap: *overlap* = an edited box (added, removed, modified) intersects an inherent "
                      "foreground box with positive area (`mrgd.metrics.overlaps_inherent`); *separate* = none does. "
                      "Cells: CLIP / SSIM-e / SSIM-i.", "",
                  "| task | pairs | " + " | ".join(labels[n] for n in names) + " |", "|---|---|" + "---|" * len(names)]
        for task in tasks:
            for cls in CLASSES:
                n = max(split[v][task][cls]["n"] for v in names)
                if not n:
                    continue
                cells = [f"{_fmt(c['clip'], 2)} / {_fmt(c['ssim_e'], 4)} / {_fmt(c['ssim_i'], 4)}"
                         for c in (split[v][task][cls] for v in names)]
                lines.append(f"| {task}, {cls} | {n} | " + " | ".join(cells) + " |")
    lines += _difference_lines(summary)
    if records and all(r["clip"] is None for r in records):
        lines += ["", "CLIP: n/a, no scorer (the model folder has no clip/; pass --scorer, e.g. "
                      "openai/clip-vit-base-patch16 as in the paper)."]
    elif records:
        scorer = f"`{config['scorer']}`" if config.get("scorer") else "the model family's clip/"
        lines += ["", f"CLIP scorer: {scorer}."]
    lines += ["", "| variant | pairs | seconds / pair | UNet calls / pair |", "|---|---|---|---|"]
    for name in names:
        cost = summary["cost"][name]
        lines.append(f"| {labels[name]} | {cost['n']} | {_fmt(cost['seconds'], 2)} | {_fmt(cost['unet_calls'], 1)} |")
    notes = list(dict.fromkeys(note for r in records for note in r.get("notes", [])))
    if notes:
        lines += ["", "Notes from the pipeline:", ""]
        lines += [f"- {note}" for note in notes[:10]]
        if len(notes) > 10:
            lines.append(f"- ... and {len(notes) - 10} more (see records.jsonl)")
    text = "\n".join(lines) + "\n"
    _write_text(Path(path), text)
    return text


def _difference_lines(summary: dict[str, Any]) -> list[str]:
    differences, reference = summary.get("differences"), summary.get("reference")
    if not differences:
        return []
    labels = summary["labels"]
    return ["", f"Each variant minus {labels[reference]}, pair by pair: mean difference [95% bootstrap interval over "
                "pairs] (`mrgd.bench.paired_differences`). An interval that holds 0 is within the pairs' noise.", "",
            *difference_table(differences, labels)]


def difference_table(differences: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """Markdown rows of `paired_differences`: variant, task (and overlap class), pairs, then each metric's mean
    difference [interval]."""
    labels = labels or {}

    def show(value: dict[str, Any] | None, decimals: int) -> str:
        if value is None:
            return "n/a"
        text = f"{value['mean']:+.{decimals}f}"
        return text if value["low"] is None else text + f" [{value['low']:+.{decimals}f}, {value['high']:+.{decimals}f}]"

    lines = ["| variant | task | pairs | CLIP | SSIM-e | SSIM-i |", "|---|---|---|---|---|---|"]
    for name, tasks in differences.items():
        for task, classes in tasks.items():
            for cls, cell in classes.items():
                where = task if cls == "all" else f"{task}, {cls}"
                lines.append(f"| {labels.get(name, name)} | {where} | {cell['n']} | {show(cell['clip'], 2)} | "
                             f"{show(cell['ssim_e'], 4)} | {show(cell['ssim_i'], 4)} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Contact sheets


def contact_sheet(records: Sequence[dict[str, Any]], out_dir: str | Path, path: str | Path,
                  max_rows: int = MAX_SHEET_ROWS, thumb: int = 128) -> None:
    """One picture per task: a row per pair (at most ``max_rows``), columns the source (of the row's first
    variant) and each variant's target, with small labels."""
    from PIL import Image, ImageDraw, ImageFont

    out_dir = Path(out_dir)
    names = list(dict.fromkeys(r["variant"] for r in records))
    labels = {r["variant"]: r.get("label", r["variant"]) for r in records}
    pairs = list(dict.fromkeys(r["pair"] for r in records))
    hidden = max(0, len(pairs) - max_rows)
    pairs = pairs[:max_rows]
    by_key = {(r["pair"], r["variant"]): r for r in records}
    font = ImageFont.load_default()
    label_w, header, gap = 96, 16, 4
    columns = ["source"] + [labels[n] for n in names]
    width = label_w + len(columns) * (thumb + gap)
    height = header + len(pairs) * (thumb + gap) + (header if hidden else 0)
    sheet = Image.new("RGB", (width, max(height, header + 1)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    chars = max(4, thumb // 6)
    for c, title in enumerate(columns):
        draw.text((label_w + c * (thumb + gap) + 2, 2), title[:chars], fill=(230, 230, 230), font=font)
    for row, pair in enumerate(pairs):
        y = header + row * (thumb + gap)
        draw.text((4, y + 2), pair[:15], fill=(230, 230, 230), font=font)
        mine = [by_key[(pair, n)] for n in names if (pair, n) in by_key]
        tiles = [mine[0]["source"] if mine else None] + [by_key[(pair, n)]["target"] if (pair, n) in by_key else None
                                                         for n in names]
        for c, rel in enumerate(tiles):
            x = label_w + c * (thumb + gap)
            if rel is None or not (out_dir / rel).exists():
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(60, 60, 60))
                continue
            with Image.open(out_dir / rel) as image:
                tile = image.convert("RGB")
            tile.thumbnail((thumb, thumb), Image.BICUBIC if max(tile.size) > thumb else Image.NEAREST)
            if max(tile.size) < thumb:
                scale = thumb // max(tile.size)
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            sheet.paste(tile, (x, y))
    if hidden:
        draw.text((4, height - header + 2), f"... {hidden} more pairs not shown (see images/)", fill=(230, 230, 230),
                  font=font)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    sheet.save(tmp)
    tmp.replace(path)


def load_scorer(name: str, device="cpu"):
    """A transformers CLIPModel and its tokenizer from a folder or hub id, for the CLIP-in-box score."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # missing folder, no network, not a CLIP model: all the same to the user
        raise InputError(f"--scorer: cannot load {name!r} as a CLIP model ({type(err).__name__}); give a CLIP folder "
                         "or a reachable hub id such as openai/clip-vit-base-patch16") from None
    return model.to(device).eval().requires_grad_(False), tokenizer
