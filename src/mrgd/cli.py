"""The `mrgd` command line: generate, edit, invert, bench, import-webui, train-toy.

Exit codes: 0 done, 2 bad input (one line naming the field and the fix), 1 internal failure. Outputs are written
to a hidden staging folder and moved into place only when everything succeeded, so an interrupted or failed run
never leaves a half-written folder, and existing files are kept unless --force.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-region, text-driven image generation and editing with diffusion models (MRGD).")

ModelOpt = Annotated[Optional[str], typer.Option("--model", help="diffusers folder, hub id or .safetensors file; default: the embedded shapes-world model")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="override the file's seed")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="override the file's number of DDIM steps")]
ContextOpt = Annotated[Optional[float], typer.Option("--region-context", help="override the file's region_context "
                                                     "(canvas each region crop sees around its box, x box side)")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="output folder")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite files that already exist in the output folder")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="allow pickle weights (.ckpt/.bin): only for files you trust")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"mrgd: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _staged_output(out: Path, names: list[str], force: bool):
    """Yield a staging folder; on success move its files into `out` (refusing to overwrite unless forced)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"-o: {out} exists and is not a folder; choose another output path")
    clashes = [n for n in names if (out / n).exists()]
    if clashes and not force:
        raise InputError(f"-o: {out / clashes[0]} already exists; choose another folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    stage.mkdir(parents=True, exist_ok=True)
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for item in stage.iterdir():
            item.replace(out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _load_pipe(model: str | None, device: str, dtype: str, allow_pickle: bool, guidance_model: str | None = None):
    from .models import DEFAULT_MODEL, load_pipeline, parse_device, parse_dtype

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    path = model or str(DEFAULT_MODEL)
    if model is None and not (DEFAULT_MODEL / "model_index.json").exists():
        raise InputError("--model: the embedded model is missing from this install; reinstall mrgd or pass --model")
    return load_pipeline(path, device=dev, dtype=dt, allow_pickle=allow_pickle, guidance_model=guidance_model)


def _progress(total_steps: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="denoising", disable=not sys.stderr.isatty(), leave=False)

    def callback(state: dict) -> None:
        bar.update(1)

    return bar, callback


def _write_info(stage: Path, info: dict, extra: dict) -> None:
    (stage / "info.json").write_text(json.dumps({**info, **extra}, indent=2, default=str) + "\n")


def _apply_overrides(edit, seed, steps, method=None, region_context=None):
    update = {k: v for k, v in (("seed", seed), ("steps", steps), ("region_context", region_context)) if v is not None}
    if method is not None:
        update["mrgd"] = {**edit.mrgd.model_dump(), "method": method}
    if not update:
        return edit
    from .layout import Edit

    return Edit.from_dict({**edit.to_dict(), **update}, source="command line")


@app.command()
def generate(
    layout_file: Annotated[Path, typer.Argument(help="layout file (.json/.yaml): regions with prompts, no target_prompt")],
    output: OutOpt = Path("out"), model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    seed: SeedOpt = None, steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False,
    region_context: ContextOpt = None,
) -> None:
    """Generate one image from a multi-region layout (MultiDiffusion). Writes image.png, layout.json, info.json."""
    from .layout import Edit, Layout
    from .render import save_png

    t0 = time.perf_counter()
    layout = Layout.load(layout_file)
    edit = _apply_overrides(Edit.from_layout(layout), seed, steps, region_context=region_context)
    layout = edit.source()
    with _staged_output(output, ["image.png", "layout.json", "info.json"], force) as stage:
        pipe = _load_pipe(model, device, dtype, allow_pickle)
        bar, callback = _progress(layout.steps)
        result = pipe.generate(layout, callback=callback)
        bar.close()
        config = layout.to_dict()
        save_png(result.image, stage / "image.png", config, pipe.name)
        layout.save(stage / "layout.json")
        _write_info(stage, result.info, {"wall_seconds": round(time.perf_counter() - t0, 3)})
    typer.echo(f"wrote {output}/image.png, layout.json, info.json in {time.perf_counter() - t0:.1f} s")


@app.command()
def edit(
    edit_file: Annotated[Path, typer.Argument(help="edit file (.json/.yaml) in mrgd's format")],
    output: OutOpt = Path("out"), model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    method: Annotated[Optional[str], typer.Option("--method", help="multidiffusion | p2p | mrgd")] = None,
    seed: SeedOpt = None, steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False,
    region_context: ContextOpt = None,
    keywords: Annotated[Optional[int], typer.Option("--keywords", help="keywords kept per region (0: no selection)")] = None,
    keyword_entropy: Annotated[Optional[str], typer.Option(
        "--keyword-entropy", help="how keyword maps are scored: spatial (over pixels) | histogram (method.md §4)")] = None,
    no_kssa: Annotated[bool, typer.Option("--no-kssa", help="turn keyword-selected self-attention off")] = False,
    no_total: Annotated[bool, typer.Option("--no-total", help="leave the full-canvas r_total region out")] = False,
    no_guidance: Annotated[bool, typer.Option("--no-guidance", help="turn multi-region guidance off")] = False,
    lambda_rs: Annotated[Optional[float], typer.Option("--lambda-rs")] = None,
    lambda_is: Annotated[Optional[float], typer.Option("--lambda-is")] = None,
    lambda_ip: Annotated[Optional[float], typer.Option("--lambda-ip")] = None,
    guidance_every: Annotated[Optional[int], typer.Option("--guidance-every", help="guide every K-th step (cheaper)")] = None,
    guidance_model: Annotated[Optional[str], typer.Option("--guidance-model", help="CLIPSeg folder or hub id")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="also write keywords.json/.png, masks.png, metrics.png")] = False,
    from_inversion: Annotated[Optional[Path], typer.Option("--from-inversion", help="inversion.safetensors from `mrgd invert`: edit that real image")] = None,
) -> None:
    """Edit: denoise source and target side by side. Writes source.png, target.png, grid.png, edit.json, info.json."""
    from typing import get_args

    from .layout import Edit, Settings
    from .render import edit_grid, save_png

    t0 = time.perf_counter()
    if method is not None and method not in ("multidiffusion", "p2p", "mrgd"):
        raise InputError(f"--method: unknown method {method!r}; use multidiffusion, p2p or mrgd")
    rules = get_args(Settings.model_fields["keyword_entropy"].annotation)  # one list of rules: the settings'
    if keyword_entropy is not None and keyword_entropy not in rules:
        raise InputError(f"--keyword-entropy: unknown rule {keyword_entropy!r}; use {' or '.join(rules)}")
    the_edit = _apply_overrides(Edit.load(edit_file), seed, steps, method, region_context)
    switches = {"keywords": keywords, "keyword_entropy": keyword_entropy, "lambda_rs": lambda_rs, "lambda_is": lambda_is, "lambda_ip": lambda_ip,
                "guidance_every": guidance_every, "kssa": False if no_kssa else None,
                "use_total": False if no_total else None, "guidance": False if no_guidance else None}
    switches = {k: v for k, v in switches.items() if v is not None}
    if switches:
        the_edit = Edit.from_dict({**the_edit.to_dict(), "mrgd": {**the_edit.mrgd.model_dump(), **switches}},
                                  source="command line")
    names = ["source.png", "target.png", "grid.png", "edit.json", "info.json"]
    if explain:
        names += ["keywords.json", "keywords.png", "masks.png", "metrics.png"]
    with _staged_output(output, names, force) as stage:
        pipe = _load_pipe(model, device, dtype, allow_pickle, guidance_model)
        bar, callback = _progress(the_edit.steps)
        start = {}
        if from_inversion is not None:
            from .inversion import Inversion

            inversion = Inversion.load(from_inversion)
            inversion.check(the_edit)
            start = inversion.edit_kwargs()
        result = pipe.edit(the_edit, callback=callback, **start)
        bar.close()
        config = the_edit.to_dict()
        save_png(result.source, stage / "source.png", config, pipe.name, "source")
        save_png(result.target, stage / "target.png", config, pipe.name, "target")
        save_png(edit_grid(result.source, result.target, the_edit), stage / "grid.png", config, pipe.name, "target")
        the_edit.save(stage / "edit.json")
        if explain:
            _write_explain(stage, result, the_edit)
        _write_info(stage, result.info, {"wall_seconds": round(time.perf_counter() - t0, 3)})
    for note in result.info.get("notes", []):
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {output}/source.png, target.png, grid.png, edit.json, info.json "
               f"in {time.perf_counter() - t0:.1f} s ({result.info['unet_calls']} UNet calls)")


def _write_explain(stage: Path, result, the_edit) -> None:
    """keywords.json / keywords.png (§4), masks.png (Φ's masks, §6), metrics.png (the §8 masks)."""
    from .metrics import explain_masks
    from .render import keyword_picture, masks_picture

    images = {"source": result.source, "target": result.target}
    keywords = result.info.get("keywords", {})
    (stage / "keywords.json").write_text(json.dumps(keywords, indent=2) + "\n")
    if "keyword_maps" in result.explain:
        keyword_picture(result.explain["keyword_maps"], result.explain["keyword_hw"], images).save(stage / "keywords.png")
    else:
        result.info.setdefault("notes", []).append("no keyword selection in this run (method, --keywords 0 or no r_total)")
    if "masks" in result.explain:
        masks_picture(result.explain["masks"], the_edit, images).save(stage / "masks.png")
    explain_masks(the_edit).save(stage / "metrics.png")


@app.command()
def invert(
    image_file: Annotated[Path, typer.Argument(help="the real image (PNG/JPEG); fitted to the edit's size")],
    edit_file: Annotated[Path, typer.Argument(help="edit file: its source layout describes the image")],
    output: OutOpt = Path("out"), model: ModelOpt = None, device: DeviceOpt = "auto",
    method: Annotated[Optional[str], typer.Option("--method", help="multidiffusion | p2p | mrgd")] = None,
    steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False,
    region_context: ContextOpt = None,
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="null-text Adam steps per DDIM step")] = 10,
    min_psnr: Annotated[float, typer.Option("--min-psnr", help="warn when the reconstruction is below this")] = 24.0,
    guidance_model: Annotated[Optional[str], typer.Option("--guidance-model")] = None,
) -> None:
    """Invert a real image (multi-region null-text inversion), then edit it to the target layout."""
    from .inversion import invert as run_inversion
    from .inversion import load_image
    from .layout import Edit
    from .metrics import psnr, ssim
    from .render import edit_grid, save_png

    t0 = time.perf_counter()
    if method is not None and method not in ("multidiffusion", "p2p", "mrgd"):
        raise InputError(f"--method: unknown method {method!r}; use multidiffusion, p2p or mrgd")
    the_edit = _apply_overrides(Edit.load(edit_file), None, steps, method, region_context)
    image, message = load_image(image_file, the_edit.size)
    if message:
        typer.echo(f"note: {message}", err=True)
    names = ["reconstruction.png", "target.png", "grid.png", "inversion.safetensors", "edit.json", "info.json"]
    with _staged_output(output, names, force) as stage:
        pipe = _load_pipe(model, device, "float32", allow_pickle, guidance_model)
        t1 = time.perf_counter()
        inversion, _ = run_inversion(pipe, image, the_edit, inner_steps)
        invert_seconds = time.perf_counter() - t1
        result = pipe.edit(the_edit, **inversion.edit_kwargs())
        quality = {"psnr_db": round(psnr(image, result.source), 3), "ssim": round(ssim(image, result.source), 4)}
        config = the_edit.to_dict()
        save_png(result.source, stage / "reconstruction.png", config, pipe.name, "source")
        save_png(result.target, stage / "target.png", config, pipe.name, "target")
        grid = edit_grid(result.source, result.target, the_edit, titles=("reconstruction", "target"),
                         before=[("input", image)])
        save_png(grid, stage / "grid.png", config, pipe.name, "target")
        inversion.save(stage / "inversion.safetensors")
        the_edit.save(stage / "edit.json")
        _write_info(stage, result.info, {"reconstruction": quality, "inversion_seconds": round(invert_seconds, 2),
                                         "null_text_losses": inversion.losses, "wall_seconds": round(time.perf_counter() - t0, 3)})
    typer.echo(f"reconstruction: PSNR {quality['psnr_db']:.2f} dB, SSIM {quality['ssim']:.4f} "
               f"(inversion {invert_seconds:.1f} s)")
    if quality["psnr_db"] < min_psnr:
        typer.echo(f"warning: reconstruction PSNR {quality['psnr_db']:.2f} dB is below --min-psnr {min_psnr}: "
                   "the layout may not describe the image well, or the model cannot represent it; outputs written anyway",
                   err=True)
    typer.echo(f"wrote {output}/reconstruction.png, target.png, grid.png, inversion.safetensors, edit.json, info.json "
               f"in {time.perf_counter() - t0:.1f} s")


@app.command("import-webui")
def import_webui_cmd(
    config_file: Annotated[Path, typer.Argument(help="the WebUI extension's {\"bbox_controls\": [...]} JSON file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="edit file to write (.json/.yaml)")],
    prompt: Annotated[str, typer.Option("--prompt", help="global prompt (kept outside the WebUI file)")] = "",
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    size: Annotated[tuple[int, int], typer.Option("--size", help="W H in pixels")] = (512, 512),
    force: ForceOpt = False,
) -> None:
    """Convert a WebUI extension region file into an mrgd edit file."""
    from .webui_import import import_webui, load_webui

    if output.exists() and not force:
        raise InputError(f"-o: {output} already exists; choose another path or pass --force")
    edit_obj, warnings = import_webui(load_webui(config_file), prompt=prompt, negative_prompt=negative_prompt,
                                      seed=seed, size=size)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    edit_obj.save(output)
    roles = edit_obj.roles()
    summary = ", ".join(f"{k} ({v})" for k, v in roles.items())
    typer.echo(f"wrote {output}: {len(roles)} regions: {summary}")


@app.command("bench")
def bench_cmd(
    suite: Annotated[Path, typer.Argument(help="suite folder (suite.json, or the edit files in it) or a suite .json list")],
    output: Annotated[Path, typer.Option("-o", "--output", help="bench folder; run again to resume (finished jobs are skipped)")],
    methods: Annotated[str, typer.Option("--methods", help="comma-separated: multidiffusion, p2p, mrgd")] = "multidiffusion,p2p,mrgd",
    ablations: Annotated[bool, typer.Option("--ablations", help="also MRGD with no guidance / no KSSA / no r_total / no keyword selection")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="at most N pairs, taken in turn from each task")] = None,
    steps: StepsOpt = None, model: ModelOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N; default auto, or each process's own device under accelerate launch")] = None,
    dtype: DtypeOpt = "auto",
    scorer: Annotated[Optional[str], typer.Option("--scorer", help="CLIP folder or hub id for CLIP-in-box; default: the model family's clip/")] = None,
    guidance_model: Annotated[Optional[str], typer.Option("--guidance-model", help="CLIPSeg folder or hub id for guidance; default: the model family's clipseg/")] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Benchmark methods and ablations on a suite (paper Table 1). Writes records.jsonl, results.json, results.md,
    sheet-<task>.png and images/. Under `accelerate launch -m mrgd bench ...` the jobs are split between processes."""
    from . import bench

    t0 = time.perf_counter()
    chosen = bench.variants(bench.parse_methods(methods), ablations)
    pairs = bench.load_suite(suite, limit=limit, steps=steps)  # bad input fails before the model loads
    from .models import DEFAULT_MODEL, parse_device, parse_dtype

    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    state = bench.process_state()
    if state.num_processes > 1 and device in (None, "auto", "cuda"):
        # one accelerator per process; CPU processes say "cpu" (accelerate's "cpu:0" changes float rounding)
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    device = device or "auto"
    resolved_dtype = parse_dtype(dtype, parse_device(device))
    bench.check_out_dir(output, bench.bench_config(suite, model or str(DEFAULT_MODEL), resolved_dtype, steps, scorer))
    pipe = _load_pipe(model, device, dtype, allow_pickle, guidance_model)
    score_model = score_tok = None
    if scorer is not None:
        score_model, score_tok = bench.load_scorer(scorer, pipe.device)
    results = bench.run_bench(pipe, suite, output, chosen, limit=limit, steps=steps, scorer=score_model,
                              scorer_tokenizer=score_tok, scorer_name=scorer, state=state,
                              log=lambda message: typer.echo(message, err=True))
    if results is None:  # not the main process: the main one writes the tables
        return
    typer.echo(f"{len(pairs)} pairs x {len(chosen)} variants: wrote {output}/results.md, results.json, "
               f"records.jsonl, sheet-*.png in {time.perf_counter() - t0:.1f} s")


@app.command("train-toy")
def train_toy(
    output: Annotated[Path, typer.Option("-o", "--output", help="training folder (resumable)")],
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="pause (resumably) after this many minutes")] = None,
    stages: Annotated[str, typer.Option("--stages", help="comma-separated subset of data,tokenizer,clip,vae,unet,clipseg,assemble")] = "data,tokenizer,clip,vae,unet,clipseg,assemble",
    threads: Annotated[int, typer.Option("--threads")] = 2,
    steps: Annotated[Optional[str], typer.Option(
        "--steps", help="step counts, e.g. clip=2000,unet=12000; raising a finished stage's count extends it "
                        "(a warm restart of its learning-rate schedule)")] = None,
) -> None:
    """Train the embedded shapes-world model family from nothing (fixed seeds, resumable)."""
    from .toyworld.train import STAGES, TrainConfig, train

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise InputError(f"--stages: unknown stage {unknown[0]!r}; use some of {', '.join(STAGES)}")
    config = TrainConfig(out=str(output), stages=chosen, minutes=minutes, threads=threads)
    for item in filter(None, (steps or "").split(",")):
        stage, _, count = item.partition("=")
        if not hasattr(config, f"{stage.strip()}_steps") or not count.strip().isdigit():
            raise InputError(f"--steps: {item!r} is not STAGE=N with STAGE one of clip, vae, unet, clipseg")
        setattr(config, f"{stage.strip()}_steps", int(count))
    done = train(config)
    typer.echo(f"{'finished' if done else 'paused (run again to resume)'}: {output}"
               + (f"; the model folder is {output}/model" if done and "assemble" in chosen else ""))


def main() -> None:
    """Console entry point: turn our errors into one line and an exit code."""
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except InputError as err:
        _fail(str(err), 2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command-line tool
        # usage errors of the CLI library (typer vendors its own click): its one-line message, its exit code 2
        if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            _fail(f"{message}; see mrgd --help", err.exit_code)
        if os.environ.get("MRGD_DEBUG"):
            raise
        _fail(f"internal failure: {type(err).__name__}: {err} (set MRGD_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
