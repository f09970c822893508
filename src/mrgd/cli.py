"""The `mrgd` command line: generate, edit, invert, bench, import-webui, train-toy.

Exit codes: 0 done, 2 bad input (one line naming the field and the fix), 1 internal failure. Outputs are written
to a hidden staging folder and moved into place only when everything succeeded, so an interrupted or failed run
never leaves a half-written folder, and existing files are kept unless --force.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import runtime
from .errors import InputError, Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-region, text-driven image generation and editing with diffusion models (MRGD).")


@app.callback()
def _global_options(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", help="also show the libraries' warnings, log lines and loading "
                                                            "bars (as does MRGD_DEBUG=1)")] = False,
) -> None:
    """Options before the command name, for every command."""
    ctx.with_resource(runtime.library_output(verbose or bool(os.environ.get("MRGD_DEBUG"))))

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
PredictionOpt = Annotated[Optional[str], typer.Option(
    "--prediction-type", help="epsilon | v_prediction: what the model predicts, when its files cannot say (SD 2.x single files)")]


def _enter_deterministic(ctx: typer.Context, value: bool) -> bool:
    # entered while the options are read, so before the command touches CUDA; undone when the command ends
    if value:
        ctx.with_resource(runtime.deterministic())
    return value


CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the UNet's ResNet and feed-forward blocks: for many runs in one process on a GPU "
    "(the first runs pay the compilation; pixels change within float rounding)")]
DeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", callback=_enter_deterministic,
    help="bit-identical runs on CUDA too: torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8")]


def _fail(message: str, code: int, kind: str = "error: ") -> None:
    typer.echo(f"mrgd: {kind}{message}", err=True)
    sys.exit(code)


# Failures to write that are the output path's fault, whatever file they happen to: a full disk, a read-only mount.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


@contextmanager
def _output_errors(out: Path, *also: Path):
    """Turn an OSError writing `out` (or in `also`: its staging folder, folders made for it) into the user's error:
    exit 2 naming the path and the reason."""
    try:
        yield
    except OSError as err:
        touched = [Path(os.path.abspath(name)) for name in (err.filename, err.filename2) if isinstance(name, str)]
        mine = [Path(os.path.abspath(path)) for path in (out, *also)]
        if err.errno in _OUTPUT_ERRNOS or any(t == m or m in t.parents for t in touched for m in mine):
            raise InputError(f"-o: cannot write {out} ({err.strerror or type(err).__name__}); "
                             "choose a folder you can write to, with free space") from None
        raise


@contextmanager
def _staged_output(out: Path, names: list[str], force: bool):
    """Yield a staging folder; on success move its files into `out` (refusing to overwrite unless forced).

    A new `out` is staged beside it and renamed into place in one step; an existing one is staged inside it (the same
    file system, whatever is mounted where) and its files are replaced one by one, put back if a move fails. On any
    failure or Ctrl-C nothing is left behind: no staging folder, no half-filled `out`, no folders made on the way.
    """
    with _output_errors(out):  # even looking can fail: a name too long, a loop of links
        if out.exists() and not out.is_dir():
            raise InputError(f"-o: {out} exists and is not a folder; choose another output path")
        clashes = [n for n in names if (out / n).exists()]
        if clashes and not force:
            raise InputError(f"-o: {out / clashes[0]} already exists; choose another folder or pass --force")
        folders = [n for n in clashes if (out / n).is_dir()]
        if folders:  # --force replaces files, never a folder and what it holds
            raise InputError(f"-o: {out / folders[0]} is a folder; move it away or choose another output folder")
        existed = out.is_dir()
        made = [folder for folder in (out, *out.absolute().parents) if not folder.exists()]  # deepest first
    stage = out / f".mrgd-partial-{os.getpid()}" if existed else out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with _output_errors(out, stage, *made):
            shutil.rmtree(stage, ignore_errors=True)  # ours by its name: left by a killed run with this pid
            stage.mkdir(parents=True)
            yield stage
            if existed or out.exists():
                _move_files(stage, out)
            else:
                stage.rename(out)
    except KeyboardInterrupt:
        _remove_staging(stage, made)
        raise Interrupted(f"interrupted; {out} was left as it was" if existed else
                          f"interrupted; nothing was written to {out}") from None
    except BaseException:
        _remove_staging(stage, made)
        raise
    _remove_staging(stage, [])


def _move_files(stage: Path, out: Path) -> None:
    """Move the staged files into `out`; the files they replace wait in the stage until all are in place."""
    kept = stage / ".replaced"
    moved: list[str] = []
    try:
        for item in sorted(p for p in stage.iterdir() if p != kept):
            if (out / item.name).exists():
                kept.mkdir(exist_ok=True)
                (out / item.name).replace(kept / item.name)
            item.replace(out / item.name)
            moved.append(item.name)
    except BaseException:  # put `out` back as it was, then fail
        for name in moved:
            with suppress(OSError):
                (out / name).replace(stage / name)
        for item in kept.iterdir() if kept.exists() else ():
            with suppress(OSError):
                item.replace(out / item.name)
        raise


def _remove_staging(stage: Path, made: list[Path]) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    for folder in made:  # only empty ones: never what someone else put there meanwhile
        with suppress(OSError):
            folder.rmdir()


def _check_device(dev, name: str) -> None:
    """Refuse a device this machine lacks before any weights move (torch.device takes "meta", "mps", "xpu:7")."""
    import torch

    if dev.type == "cpu":
        return
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != dev.type:
        raise InputError(f"--device: {name} is not a device of this machine; use auto, cpu, cuda or cuda:N")
    if dev.index is not None and dev.index >= torch.accelerator.device_count():
        raise InputError(f"--device: {name}: this machine has {torch.accelerator.device_count()} {dev.type} "
                         f"device(s), numbered from 0; use e.g. {dev.type}:0")


def _is_local_path(model: str) -> bool:
    """Whether `--model` can only mean a path: a hub id is owner/name (one slash), never absolute or relative."""
    return Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model


def _load_pipe(model: str | None, device: str, dtype: str, allow_pickle: bool, guidance_model: str | None = None,
               prediction_type: str | None = None):
    from .models import DEFAULT_MODEL, load_pipeline, parse_device, parse_dtype

    dev = parse_device(device)
    _check_device(dev, device)
    dt = parse_dtype(dtype, dev)
    path = model or str(DEFAULT_MODEL)
    if model is not None and not Path(model).exists() and _is_local_path(model):
        raise InputError(f"--model: {model} not found; check the path (a hub id reads owner/name)")
    if model is None and not (DEFAULT_MODEL / "model_index.json").exists():
        raise InputError("--model: the embedded model is missing from this install; reinstall mrgd or pass --model")
    runtime.settle_libraries(load=True)  # before loading: diffusers' loading bars have no environment switch
    try:
        pipe = load_pipeline(path, device=dev, dtype=dt, allow_pickle=allow_pickle, guidance_model=guidance_model,
                             prediction_type=prediction_type)
        for note in pipe.load_notes:
            typer.echo(f"note: {note}", err=True)
        return pipe
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as err:
        if model is None or os.environ.get("MRGD_DEBUG"):
            raise  # the embedded model failing to load is ours to fix
        # a folder of the user's that the loaders reject (a broken model_index.json, a missing component)
        detail = " ".join(str(err).split())[:160]
        raise InputError(f"--model: cannot load {model} ({type(err).__name__}: {detail}); give a diffusers folder "
                         "saved by save_pretrained, a .safetensors file or a hub id") from None


def _progress(total_steps: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="denoising", disable=not sys.stderr.isatty(), leave=False)

    def callback(state: dict) -> None:
        bar.update(1)

    return bar, callback


def _write_info(stage: Path, info: dict, extra: dict) -> None:
    (stage / "info.json").write_text(json.dumps({**info, **extra}, indent=2, default=str) + "\n")


def _require_changes(edit, source: Path) -> None:
    """Refuse an edit file that changes nothing: a whole run for a target identical to its source.

    Checked here, not in MRGDPipeline.edit, which `generate` uses for a layout with nothing to change."""
    if not edit.is_edit:
        raise InputError(f"{source}: no region changes: give a region a target_prompt, or use mrgd generate")


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
    seed: SeedOpt = None, steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False, prediction_type: PredictionOpt = None,
    region_context: ContextOpt = None,
    deterministic: DeterministicOpt = False,
) -> None:
    """Generate one image from a multi-region layout (MultiDiffusion). Writes image.png, layout.json, info.json."""
    from .layout import Edit, Layout
    from .render import save_png

    t0 = time.perf_counter()
    layout = Layout.load(layout_file)
    edit = _apply_overrides(Edit.from_layout(layout), seed, steps, region_context=region_context)
    layout = edit.source()
    with _staged_output(output, ["image.png", "layout.json", "info.json"], force) as stage:
        pipe = _load_pipe(model, device, dtype, allow_pickle, prediction_type=prediction_type)
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
    seed: SeedOpt = None, steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False, prediction_type: PredictionOpt = None,
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
    guidance_every: Annotated[Optional[int], typer.Option("--guidance-every", help="guide every K-th step (default 2; 1: every step, as §6; L_IP weighs K·λ_ip there)")] = None,
    guidance_until: Annotated[Optional[float], typer.Option(
        "--guidance-until", help="guide only the first fraction of the steps, e.g. 0.5")] = None,
    guidance_vae: Annotated[Optional[str], typer.Option(
        "--guidance-vae", help="decoder guidance sees x̂0 through: auto (default: the model's tiny decoder when it "
        "ships one, else its VAE) | full | tiny | an AutoencoderTiny folder (TAESD)")] = None,
    guidance_precision: Annotated[Optional[str], typer.Option(
        "--guidance-precision", help="the VAE's guided decode: auto (default: bfloat16 where the device computes it "
        "natively) | decoder (the VAE's own dtype) | bfloat16")] = None,
    guidance_picture: Annotated[Optional[str], typer.Option(
        "--guidance-picture", help="what guidance looks at through a tiny decoder: decoder (default: its own "
        "picture) | vae (the VAE's picture, the tiny decoder's gradient)")] = None,
    guidance_size: Annotated[Optional[int], typer.Option("--guidance-size", help="the guidance model's input side in pixels")] = None,
    guidance_model: Annotated[Optional[str], typer.Option("--guidance-model", help="CLIPSeg folder or hub id")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="also write keywords.json/.png, masks.png, metrics.png")] = False,
    from_inversion: Annotated[Optional[Path], typer.Option("--from-inversion", help="inversion.safetensors from `mrgd invert`: edit that real image")] = None,
    deterministic: DeterministicOpt = False,
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
    _require_changes(the_edit, edit_file)
    switches = {"keywords": keywords, "keyword_entropy": keyword_entropy, "lambda_rs": lambda_rs, "lambda_is": lambda_is, "lambda_ip": lambda_ip,
                "guidance_every": guidance_every, "guidance_until": guidance_until, "guidance_vae": guidance_vae,
                "guidance_precision": guidance_precision, "guidance_picture": guidance_picture, "guidance_size": guidance_size, "kssa": False if no_kssa else None,
                "use_total": False if no_total else None, "guidance": False if no_guidance else None}
    switches = {k: v for k, v in switches.items() if v is not None}
    if switches:
        the_edit = Edit.from_dict({**the_edit.to_dict(), "mrgd": {**the_edit.mrgd.model_dump(), **switches}},
                                  source="command line")
    names = ["source.png", "target.png", "grid.png", "edit.json", "info.json"]
    if explain:
        names += ["keywords.json", "keywords.png", "masks.png", "metrics.png"]
    with _staged_output(output, names, force) as stage:
        pipe = _load_pipe(model, device, dtype, allow_pickle, guidance_model, prediction_type)
        bar, callback = _progress(the_edit.steps)
        start = {}
        if from_inversion is not None:
            from .inversion import Inversion

            inversion = Inversion.load(from_inversion)
            inversion.check(the_edit)
            _check_inversion_tensors(inversion, pipe, the_edit, from_inversion)
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


def _check_inversion_tensors(inversion, pipe, the_edit, path: Path) -> None:
    """Refuse an inversion file whose tensors cannot be this edit's start: the wrong latent shape (a file for another
    model), or values that are not finite (a damaged file), which would otherwise paint a wrong or black picture."""
    import torch

    w, h = (side // pipe.latent_factor for side in the_edit.size)
    latent = (pipe.unet.config.in_channels, h, w)
    shapes = {"z_T": (inversion.z_T, (1, *latent))}
    if inversion.pivots is not None:
        shapes["pivots"] = (inversion.pivots, (the_edit.steps + 1, *latent))
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise InputError(f"--from-inversion: {path}: {name} has shape {list(tensor.shape)}, this model and size "
                             f"need {list(shape)}; invert the image again with this model and edit")
    for key, null in inversion.null_embeds.items():  # one null embedding per step of the edit
        if null.ndim < 2 or null.shape[0] != the_edit.steps:
            raise InputError(f"--from-inversion: {path}: null/{key} has shape {list(null.shape)}, one row per step of "
                             f"the {the_edit.steps}-step edit is needed; invert the image again with this edit")
    tensors = {**{name: t for name, (t, _) in shapes.items()}, **inversion.null_embeds}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InputError(f"--from-inversion: {path}: {name} holds {str(tensor.dtype).removeprefix('torch.')} "
                             "values, not floating-point numbers; invert the image again")
        if not torch.isfinite(tensor).all():
            raise InputError(f"--from-inversion: {path}: {name} holds values that are not finite numbers; "
                             "the file is damaged: invert the image again")


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
    steps: StepsOpt = None, force: ForceOpt = False, allow_pickle: PickleOpt = False, prediction_type: PredictionOpt = None,
    region_context: ContextOpt = None,
    inversion_method: Annotated[str, typer.Option(
        "--inversion", help="direct (exact, no optimisation) | negative-prompt | null-text (per-region optimisation)")] = "direct",
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="null-text Adam steps per DDIM step")] = 10,
    min_psnr: Annotated[float, typer.Option("--min-psnr", help="warn when the reconstruction is below this")] = 24.0,
    guidance_model: Annotated[Optional[str], typer.Option("--guidance-model")] = None,
    deterministic: DeterministicOpt = False,
) -> None:
    """Invert a real image with its source layout (multi-region DDIM inversion, made exact by --inversion), then edit
    it to the target layout."""
    from .inversion import invert as run_inversion
    from .inversion import load_image
    from .layout import Edit
    from .metrics import psnr, ssim
    from .render import edit_grid, save_png

    t0 = time.perf_counter()
    if method is not None and method not in ("multidiffusion", "p2p", "mrgd"):
        raise InputError(f"--method: unknown method {method!r}; use multidiffusion, p2p or mrgd")
    from .inversion import METHODS

    if inversion_method not in METHODS:
        raise InputError(f"--inversion: unknown method {inversion_method!r}; use {', '.join(METHODS)}")
    the_edit = _apply_overrides(Edit.load(edit_file), None, steps, method, region_context)
    _require_changes(the_edit, edit_file)
    image, message = load_image(image_file, the_edit.size)
    if message:
        typer.echo(f"note: {message}", err=True)
    names = ["reconstruction.png", "target.png", "grid.png", "inversion.safetensors", "edit.json", "info.json"]
    with _staged_output(output, names, force) as stage:
        pipe = _load_pipe(model, device, "float32", allow_pickle, guidance_model, prediction_type)
        t1 = time.perf_counter()
        inversion, _ = run_inversion(pipe, image, the_edit, inner_steps, method=inversion_method)
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
        _write_info(stage, result.info, {"reconstruction": quality, "inversion": inversion.method,
                                         "inversion_seconds": round(invert_seconds, 2),
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

    with _output_errors(output):
        if output.is_dir():
            raise InputError(f"-o: {output} is a folder; give the edit file to write, e.g. {output / 'edit.json'}")
        if output.exists() and not force:
            raise InputError(f"-o: {output} already exists; choose another path or pass --force")
    edit_obj, warnings = import_webui(load_webui(config_file), prompt=prompt, negative_prompt=negative_prompt,
                                      seed=seed, size=size)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    with _staged_output(output.parent, [output.name], force) as stage:  # written whole or not at all
        edit_obj.save(stage / output.name)
    roles = edit_obj.roles()
    summary = ", ".join(f"{k} ({v})" for k, v in roles.items())
    typer.echo(f"wrote {output}: {len(roles)} regions: {summary}")


@app.command("serve")
def serve_cmd(
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    host: Annotated[str, typer.Option("--host", help="address to listen on; anything but 127.0.0.1 / localhost "
                                      "lets other machines in")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 7860,
    compile_unet: CompileOpt = False,
) -> None:
    """Serve the web UI: draw regions on a canvas, generate, edit and invert in the browser (the web extra)."""
    from .web import missing_extra

    if missing_extra():
        raise InputError(missing_extra())
    from .web.app import serve

    serve(model=model, host=host, port=port, device=device, dtype=dtype, compile_unet=compile_unet)


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
    allow_pickle: PickleOpt = False, prediction_type: PredictionOpt = None,
    deterministic: DeterministicOpt = False, compile_unet: CompileOpt = False,
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
    pipe = _load_pipe(model, device, dtype, allow_pickle, guidance_model, prediction_type)
    if compile_unet:
        pipe.compile()
    score_model = score_tok = None
    if scorer is not None:
        score_model, score_tok = bench.load_scorer(scorer, pipe.device)
    try:
        with _output_errors(output):
            results = bench.run_bench(pipe, suite, output, chosen, limit=limit, steps=steps, scorer=score_model,
                                      scorer_tokenizer=score_tok, scorer_name=scorer, state=state,
                                      log=lambda message: typer.echo(message, err=True))
    except KeyboardInterrupt:  # every finished job is already a line of records.jsonl
        raise Interrupted(f"interrupted; {output} keeps the finished jobs: "
                          "run the same command again to resume") from None
    if results is None:  # not the main process: the main one writes the tables
        return
    typer.echo(f"{len(pairs)} pairs x {len(chosen)} variants: wrote {output}/results.md, results.json, "
               f"records.jsonl, sheet-*.png in {time.perf_counter() - t0:.1f} s")


@app.command("train-toy")
def train_toy(
    output: Annotated[Path, typer.Option("-o", "--output", help="training folder (resumable)")],
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="pause (resumably) after this many minutes")] = None,
    stages: Annotated[str, typer.Option("--stages", help="comma-separated subset of data,tokenizer,clip,vae,taesd,unet,clipseg,assemble")] = "data,tokenizer,clip,vae,taesd,unet,clipseg,assemble",
    threads: Annotated[int, typer.Option("--threads")] = 2,
    steps: Annotated[Optional[str], typer.Option(
        "--steps", help="step counts, e.g. clip=2000,unet=12000; raising a finished stage's count extends it "
                        "(a warm restart of its learning-rate schedule)")] = None,
) -> None:
    """Train the embedded shapes-world model family from nothing (fixed seeds, resumable)."""
    from .toyworld.train import STAGES, TrainConfig, train

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        what = f"unknown stage {unknown[0]!r}" if unknown else "no stage given"
        raise InputError(f"--stages: {what}; use some of {', '.join(STAGES)}")
    if threads < 1:
        raise InputError(f"--threads: {threads} is not a positive number of threads; use e.g. --threads 2")
    if minutes is not None and not minutes > 0:
        raise InputError(f"--minutes: {minutes} is not a positive number of minutes; use e.g. --minutes 30")
    config = TrainConfig(out=str(output), stages=chosen, minutes=minutes, threads=threads)
    for item in filter(None, (steps or "").split(",")):
        stage, _, count = item.partition("=")
        if not hasattr(config, f"{stage.strip()}_steps") or not (count.strip().isascii() and count.strip().isdigit()):
            raise InputError(f"--steps: {item!r} is not STAGE=N with STAGE one of clip, vae, unet, clipseg")
        setattr(config, f"{stage.strip()}_steps", int(count))
    with _output_errors(output):
        done = train(config)
    typer.echo(f"{'finished' if done else 'paused (run again to resume)'}: {output}"
               + (f"; the model folder is {output}/model" if done and "assemble" in chosen else ""))


def main() -> None:
    """Console entry point: turn our errors into one line and an exit code."""
    try:
        code = app(standalone_mode=False)
        if code == 130:  # the CLI library's answer to a Ctrl-C outside a command's own handling
            _fail("interrupted", 130, kind="")
        sys.exit(code if isinstance(code, int) else 0)
    except InputError as err:
        _fail(str(err), 2)
    except Interrupted as err:  # Ctrl-C: 128 + SIGINT, as shells report it
        _fail(str(err), 130, kind="")
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command-line tool
        # usage errors of the CLI library (typer vendors its own click): its one-line message, its exit code 2
        if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            if not message.strip():  # `mrgd` alone: the help was the answer
                sys.exit(err.exit_code)
            _fail(f"{message}; see mrgd --help", err.exit_code)
        if os.environ.get("MRGD_DEBUG"):
            raise
        _fail(f"internal failure: {type(err).__name__}: {err} (set MRGD_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
