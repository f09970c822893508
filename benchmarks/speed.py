"""Speed and memory of a 3-region edit per method, as ratios to the plain diffusers pipeline drawing the same pair.

    python benchmarks/speed.py [--arch embedded,sd15,sdxl] [--size 256] [--steps 10] [--methods ...]
                               [--device auto] [--dtype auto] [--repeats 1] [--rounds 1] [--compile] [--fresh]
                               [--out benchmarks/results/speed]

`--arch embedded` is the shipped shapes-world family; `sd15` and `sdxl` are the full-size architectures with random
weights (`random_models.py`; CLIPSeg rd64 for guidance, a TAESD decoder), which is what time and memory depend on.
The plain baseline is diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the same components with
DDIM, denoising the source and target prompts (global prompt + every region prompt of that image) as one batch of
two, decoded by the same `decode_tensor` as mrgd's pictures (in the VAE's dtype: fp32 where its config asks to
upcast, which diffusers' SD 1.x pipeline would not do beside an fp16 UNet and fails on): what a user pays for the two
pictures without any region control. Each method row is one `pipe.edit` of
`examples/three_regions.json` at the given size and steps. `--methods` is a ";"-separated list of names with
optional settings, e.g. `p2p;mrgd:guidance_vae=full,guidance_every=2`. Peak memory: the process's resident set, sampled every 5 ms during the
run, above what it held before (CPU), or the CUDA allocator's peak (GPU). Runs unchanged on CUDA.

Seconds are wall-clock on CUDA; on a CPU they are the process's CPU time (`--clock cpu`, the default there), which
other jobs on a shared machine do not inflate; run with OMP_NUM_THREADS=1 for ratios that compare compute alone.
`--clock wall` measures wall-clock time on a CPU too. Both are recorded.

Every row is warmed up first, untimed, with the same shapes: on the embedded model the same edit, on CUDA 2 steps
(kernel selection; compilation with `--compile`), on a CPU with a full-size model 1 step (oneDNN's kernels for each
new crop shape, the allocator's growth: without it the first method after the plain pair paid them, p2p's UNet phase
at SD 1.5 256² 94 s against mrgd's 63-68 s for the same work). Their seconds are the "warm-up s" column. `benchmarks/gpu.sh` runs the GPU set in one go.

Writes <out>.json and <out>.md (one table per architecture, size, device and dtype; a run replaces the tables it
measured, row by row as it goes, and keeps the others).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from mrgd.layout import Edit
from mrgd.models import DEFAULT_MODEL, load_pipeline, parse_device, parse_dtype

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "multidiffusion;p2p;mrgd:guidance_vae=full;mrgd"


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator peak, or the sampled RSS of this process."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base, self.top, self.running = self._rss(), self._rss(), True

        def sample():
            while self.running:
                self.top = max(self.top, self._rss())
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, self._rss()) - self.base


def timed(fn, device: torch.device, repeats: int, warmup=None, clock: str = "wall"):
    """(median seconds on `clock`, median wall seconds, peak bytes of the first timed run, last result, warm-up
    seconds). ``warmup`` is run once first, untimed: the same work (on the embedded model) or the same shapes in
    2 steps (CUDA: kernel selection, and compilation with --compile)."""
    warm_seconds = None
    if warmup is not None:
        t0 = time.perf_counter()
        warmup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warm_seconds = time.perf_counter() - t0
    times, walls, peak, out = [], [], None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with PeakMemory(device) as memory:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - t0)
            times.append(time.process_time() - c0 if clock == "cpu" else walls[-1])
        peak = memory.peak if peak is None else peak
    return statistics.median(times), statistics.median(walls), peak, out, warm_seconds


def parse_method(text: str) -> tuple[str, str, dict]:
    """"mrgd:guidance_vae=full,guidance_every=2" -> (label, method, settings)."""
    method, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return text, method, settings


def build(arch: str, device: torch.device, dtype: torch.dtype):
    if arch == "embedded":
        return load_pipeline(str(DEFAULT_MODEL), device=device, dtype=dtype)
    from random_models import random_pipeline

    return random_pipeline(arch, device, dtype)


PLAIN = "plain pair (diffusers)"
_PIPES: dict = {}  # one pipeline per (arch, device, dtype) in this process


def _setup(arch: str, args, device: torch.device, dtype: torch.dtype):
    key = (arch, str(device), str(dtype))
    if key not in _PIPES:
        t0 = time.perf_counter()
        pipe = build(arch, device, dtype)
        if args.compile:
            pipe.compile()
        _PIPES[key] = (pipe, time.perf_counter() - t0)
    pipe, load_seconds = _PIPES[key]
    return pipe, load_seconds, _sized_edit(arch, args)


def _sized_edit(arch: str, args) -> Edit:
    """The benchmark edit at --size (default: the edit's own on the embedded model, 256 on the others) and --steps."""
    base = Edit.load(args.edit)
    size = args.size or (base.size[0] if arch == "embedded" else 256)
    return Edit.from_dict({**base.to_dict(), "size": [size, size], "steps": args.steps or base.steps})


def measure_row(arch: str, args, device: torch.device, dtype: torch.dtype, text: str, warm_up: bool = True) -> dict:
    """One row: the plain diffusers pair (``text`` = PLAIN) or one method of `parse_method`, timed."""
    from random_models import diffusers_pipeline

    pipe, _, edit = _setup(arch, args, device, dtype)
    size, steps = edit.size[0], edit.steps
    # the embedded model is small enough to warm up with the same work; on CUDA 2 steps of the same shapes do, on a
    # CPU one step (a full-size edit takes minutes there)
    warm_steps = (steps if arch == "embedded" else 2 if device.type == "cuda" else 1) if warm_up else None
    total_before = PeakMemory._rss() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    if text == PLAIN:
        plain = diffusers_pipeline(pipe)
        prompts = [edit.source().total_prompt(), edit.target().total_prompt()]
        negative = [edit.negative_prompt] * 2 if edit.negative_prompt or pipe.family.name != "sdxl" else None

        def draw(n_steps):
            # decoded as mrgd decodes (`decode_tensor`: in the VAE's dtype, fp32 where its config asks to upcast),
            # which diffusers' SD pipeline does not do for an fp32 VAE beside an fp16 UNet
            latents = plain(prompts, negative_prompt=negative, height=size, width=size, num_inference_steps=n_steps,
                            guidance_scale=edit.guidance_scale, generator=torch.Generator("cpu").manual_seed(edit.seed),
                            output_type="latent").images
            with torch.no_grad():
                return pipe.decode_tensor(latents)

        seconds, wall, peak, _, warm = timed(lambda: draw(steps), device, args.repeats,
                                             warm_steps and (lambda: draw(warm_steps)), args.clock)
        latent = size // pipe.latent_factor
        row = {"unet_calls": steps, "unet_pixel_rows": steps * 4 * latent * latent}  # (uncond, cond) x (S, T)
    else:
        _, method, settings = parse_method(text)
        variant = Edit.from_dict({**edit.to_dict(), "mrgd": {**edit.mrgd.model_dump(), "method": method, **settings}})
        warm_variant = warm_steps and Edit.from_dict({**variant.to_dict(), "steps": warm_steps})
        seconds, wall, peak, result, warm = timed(lambda: pipe.edit(variant), device, args.repeats,
                                                  warm_variant and (lambda: pipe.edit(warm_variant)), args.clock)
        info = result.info
        row = {"unet_calls": info["unet_calls"], "unet_pixel_rows": info["unet_pixel_rows"],
               "guidance_decoder": info.get("guidance_decoder"), "guidance_precision": info.get("guidance_precision"),
               "guidance_picture": info.get("guidance_picture"),
               "phases": {k: round(v, 3) for k, v in info["seconds"].items()}}
    row["warmup_seconds"] = None if warm is None else round(warm, 2)
    print(f"{arch} {text}: {seconds:.2f} s", flush=True)
    return {"seconds": round(seconds, 3), "wall_seconds": round(wall, 3), "peak_mb": round(peak / 2**20),
            "peak_total_mb": round((total_before + peak) / 2**20), **row}


def _row_in_child(arch, args, device, dtype, text) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(args.threads)
    return measure_row(arch, args, device, dtype, text)


def run_arch(arch: str, args, device: torch.device, dtype: torch.dtype, on_row=None) -> dict:
    """One architecture's table; ``on_row(report so far)`` after each row (a run cut short keeps its rows)."""
    texts = [PLAIN, *args.methods.split(";")]
    if args.fresh:  # each row in a new process: no row inherits another's cached allocations (peak memory)
        import multiprocessing

        rows = {}
        for text in texts:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows[text] = pool.apply(_row_in_child, (arch, args, device, dtype, text))
        load_seconds, edit = None, _sized_edit(arch, args)
        name = str(DEFAULT_MODEL) if arch == "embedded" else f"random {arch}"
        return _report(arch, args, device, dtype, rows, name, load_seconds, edit)
    # --rounds N: every method once per round, in turn, each row's seconds the median over the rounds: a machine whose
    # speed drifts during a run (shared CPUs: identical work moved by 10 %) then slows every row alike
    rows, times = {}, {text: [] for text in texts}
    for round_ in range(args.rounds):
        for text in texts:
            row = measure_row(arch, args, device, dtype, text, warm_up=round_ == 0)
            times[text].append((row["seconds"], row["wall_seconds"]))
            if round_:
                row["warmup_seconds"] = rows[text]["warmup_seconds"]
            rows[text] = {**row, "seconds": statistics.median(t for t, _ in times[text]),
                          "wall_seconds": statistics.median(w for _, w in times[text]),
                          "round_seconds": [t for t, _ in times[text]]}
            pipe, load_seconds, edit = _setup(arch, args, device, dtype)
            report = _report(arch, args, device, dtype, rows, pipe.name, load_seconds, edit)
            if on_row is not None:
                on_row(report)
    return report


def _report(arch, args, device, dtype, rows, name, load_seconds, edit) -> dict:
    size, steps = edit.size[0], edit.steps
    reference = rows[PLAIN]
    for row in rows.values():
        row["vs_plain"] = round(row["seconds"] / reference["seconds"], 3)
        row["pixel_rows_vs_plain"] = round(row["unet_pixel_rows"] / reference["unet_pixel_rows"], 3)
        row["peak_vs_plain"] = round(row["peak_mb"] / max(reference["peak_mb"], 1), 3)
        row["peak_total_vs_plain"] = round(row["peak_total_mb"] / max(reference["peak_total_mb"], 1), 3)
    return {"arch": arch, "model": name, "size": [size, size], "steps": steps, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "clock": args.clock, "threads": args.threads,
            "fresh_processes": bool(args.fresh), "compiled": bool(args.compile), "rounds": args.rounds,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_seconds": None if load_seconds is None else round(load_seconds, 1), "rows": rows}


def report_key(report: dict) -> str:
    """Which earlier table a run replaces: same architecture, size, device kind, dtype and compilation."""
    device = report.get("device", "cpu").split(":")[0]
    return f"{report['arch']}@{report['size'][0]} {device} {report.get('dtype')}" + (" compiled" * bool(report.get("compiled")))


def markdown(report: dict) -> list[str]:
    lines = [f"## {report['arch']}: {report['model']}, {report['size'][0]}², {report['steps']} steps, "
             f"{report['device']} {report['dtype']}, {report['threads']} threads, "
             f"{report.get('clock', 'wall')} seconds"
             + (f" ({report['gpu']})" if report.get("gpu") else "")
             + (", UNet blocks compiled (`--compile`; warm-up includes compiling)" if report.get("compiled") else "")
             + (", each row in a fresh process" if report.get("fresh_processes") else "")
             + (f", median of {report['rounds']} interleaved rounds" if report.get("rounds", 1) > 1 else ""), "",
             "| method | seconds | vs plain pair | UNet pixel-rows vs plain | guidance s | guidance vs p2p time | "
             "peak MB (run) | peak vs plain | peak MB (process) | process peak vs plain | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    p2p = report["rows"].get("p2p", {}).get("seconds")
    for name, r in report["rows"].items():
        guidance = r.get("phases", {}).get("guidance")
        extra = f"{r['seconds'] / p2p:.2f}x" if p2p and name.startswith("mrgd") else ""
        decoder = f" ({r['guidance_decoder']} decoder)" if r.get("guidance_decoder") else ""
        if r.get("guidance_picture") == "vae":  # the VAE's picture (forward only), the tiny decoder's gradient
            decoder = decoder.replace(" decoder)", " decoder's gradient, vae picture)")
        if r.get("guidance_precision") == "bfloat16":
            decoder = decoder.replace(")", " in bf16)")
        lines.append(f"| {name}{decoder} | {r['seconds']:.2f} | {r['vs_plain']:.2f} | {r['pixel_rows_vs_plain']:.2f} | "
                     f"{'' if guidance is None else f'{guidance:.2f}'} | {extra} | {r['peak_mb']} | {r['peak_vs_plain']:.2f} | "
                     f"{r.get('peak_total_mb', '')} | {r.get('peak_total_vs_plain', '')} | "
                     f"{'' if r.get('warmup_seconds') is None else r['warmup_seconds']} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="embedded", help="comma-separated: embedded, sd15, sdxl")
    parser.add_argument("--edit", default=str(ROOT / "examples" / "three_regions.json"))
    parser.add_argument("--size", type=int, default=None, help="canvas side; default: the edit's (embedded), 256")
    parser.add_argument("--steps", type=int, default=None, help="default: the edit's")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row, back to back (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method once per round, in turn; each row's seconds: the median over rounds")
    parser.add_argument("--fresh", action="store_true",
                        help="run each row in a new process, so its peak memory is its own (loads the model per row)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="process CPU time or wall-clock time; default: cpu on a CPU, wall on CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet's blocks first (MRGDPipeline.compile); the plain rows use them too")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed"))
    args = parser.parse_args()
    if args.fresh and args.rounds > 1:
        parser.error("--rounds takes rows in turn within one process; --fresh gives each row its own: choose one")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    args.threads = torch.get_num_threads()
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    reports = {report_key(r): r for r in previous.get("reports", [])}

    def save(report: dict) -> list[str]:
        reports[report_key(report)] = report
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"reports": list(reports.values())}, indent=2) + "\n")
        lines = ["# Speed of one 3-region edit (`examples/three_regions.json`) against the plain pipeline", "",
                 "`python benchmarks/speed.py --arch ...`; see the script's docstring for what each column measures.", ""]
        for each in reports.values():
            lines += markdown(each)
        out.with_suffix(".md").write_text("\n".join(lines))
        return lines

    for arch in args.arch.split(","):
        lines = save(run_arch(arch.strip(), args, device, dtype, on_row=save))
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
