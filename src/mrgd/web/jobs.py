"""What a run does: generate, edit or invert with the library, and write the files a user downloads.

The files are the CLI's: PNGs with the resolved config in their metadata chunks (`render.save_png`), the resolved
edit.json, info.json and, with explain, keywords.json/.png, masks.png and metrics.png. Each function runs in the
runner's worker thread and reports its steps through the run's callback.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..layout import Edit
from ..render import edit_grid, save_png
from .runner import Run


@dataclass
class Outcome:
    """A finished run, as the page shows it."""

    picture: Image.Image  # the result panel: the image, or source | target with the boxes drawn
    files: list[Path]
    message: str
    source: Image.Image | None = None  # the source picture, to draw the next boxes over
    explain: list[tuple[Image.Image, str]] = field(default_factory=list)
    inversion: Any = None  # an Inversion, after `invert`


def _write_info(out: Path, info: dict, t0: float, **extra: Any) -> Path:
    path = out / "info.json"
    path.write_text(json.dumps({**info, **extra, "wall_seconds": round(time.perf_counter() - t0, 3)}, indent=2,
                               default=str) + "\n")
    return path


def generate(pipe, run: Run, edit: Edit, out: Path) -> Outcome:
    """The source image of the layout (MultiDiffusion): image.png, layout.json, info.json."""
    t0 = time.perf_counter()
    layout = edit.source()
    result = pipe.generate(layout, callback=run.callback("generating", layout.steps, pipe.decode))
    save_png(result.image, out / "image.png", layout.to_dict(), pipe.name)
    layout.save(out / "layout.json")
    files = [out / "image.png", out / "layout.json", _write_info(out, result.info, t0)]
    seconds = time.perf_counter() - t0
    return Outcome(result.image, files, f"Generated the source in {seconds:.1f} s.", source=result.image)


def check_inversion(inversion, edit: Edit) -> None:
    """Refuse an edit the photo's inversion cannot serve, saying what to change in the page."""
    if tuple(inversion.size or edit.size) != tuple(edit.size):
        raise InputError(f"photo: inverted at {inversion.size[0]}x{inversion.size[1]}, the canvas is "
                         f"{edit.size[0]}x{edit.size[1]}; invert the photo again")
    if inversion.steps != edit.steps:
        raise InputError(f"photo: inverted with {inversion.steps} steps, the settings say {edit.steps}; "
                         f"set steps to {inversion.steps} or invert the photo again")
    if inversion.region_context is not None and inversion.region_context != edit.region_context:
        raise InputError(f"photo: inverted with region_context {inversion.region_context}; set it back or invert again")


def edit(pipe, run: Run, the_edit: Edit, out: Path, inversion=None, explain: bool = False,
         photo: Image.Image | None = None) -> Outcome:
    """Source and target side by side: source.png, target.png, grid.png, edit.json, info.json (+ explain)."""
    t0 = time.perf_counter()
    start = {}
    if inversion is not None:
        check_inversion(inversion, the_edit)
        start = inversion.edit_kwargs()
    result = pipe.edit(the_edit, callback=run.callback("editing", the_edit.steps, pipe.decode), **start)
    config = the_edit.to_dict()
    names = ("reconstruction", "target") if inversion is not None else ("source", "target")
    before = [("photo", photo)] if photo is not None else None
    grid = edit_grid(result.source, result.target, the_edit, titles=names, before=before)
    save_png(result.source, out / f"{names[0]}.png", config, pipe.name, "source")
    save_png(result.target, out / "target.png", config, pipe.name, "target")
    save_png(grid, out / "grid.png", config, pipe.name, "target")
    the_edit.save(out / "edit.json")
    files = [out / "edit.json", out / f"{names[0]}.png", out / "target.png", out / "grid.png"]
    pictures = _write_explain(out, result, the_edit) if explain else []
    files += [out / name for _, name in pictures] + ([out / "keywords.json"] if explain else [])
    extra: dict[str, Any] = {}
    message = f"Edited in {time.perf_counter() - t0:.1f} s ({result.info['unet_calls']} UNet calls)."
    if photo is not None:
        from ..metrics import psnr, ssim

        extra["reconstruction"] = {"psnr_db": round(psnr(photo, result.source), 3),
                                   "ssim": round(ssim(photo, result.source), 4)}
        message += f" Reconstruction PSNR {extra['reconstruction']['psnr_db']:.2f} dB."
    files.append(_write_info(out, result.info, t0, **extra))
    notes = result.info.get("notes", [])
    message += "".join(f" Note: {note}." for note in notes)
    return Outcome(grid, files, message, source=result.source, explain=[(p, n) for p, n in pictures])


def _write_explain(out: Path, result, the_edit: Edit) -> list[tuple[Image.Image, str]]:
    """keywords.json / keywords.png (§4), masks.png (Φ's masks, §6), metrics.png (the §8 masks), as the CLI."""
    from ..metrics import explain_masks
    from ..render import keyword_picture, masks_picture

    images = {"source": result.source, "target": result.target}
    (out / "keywords.json").write_text(json.dumps(result.info.get("keywords", {}), indent=2) + "\n")
    pictures = []
    if "keyword_maps" in result.explain:
        pictures.append((keyword_picture(result.explain["keyword_maps"], result.explain["keyword_hw"], images),
                         "keywords.png"))
    if "masks" in result.explain:
        pictures.append((masks_picture(result.explain["masks"], the_edit, images), "masks.png"))
    pictures.append((explain_masks(the_edit), "metrics.png"))
    for picture, name in pictures:
        picture.save(out / name)
    return pictures


def invert(pipe, run: Run, the_edit: Edit, photo: Image.Image, out: Path) -> Outcome:
    """Invert the photo with the source layout (the library's default method), then edit it: the grid shows
    photo | reconstruction | target, and the inversion is kept for the next edits of the same photo."""
    from ..inversion import invert as run_inversion

    t0 = time.perf_counter()
    inversion, _ = run_inversion(pipe, photo, the_edit, callback=run.callback("inverting", the_edit.steps))
    inversion.save(out / "inversion.safetensors")
    seconds = time.perf_counter() - t0
    outcome = edit(pipe, run, the_edit, out, inversion=inversion, photo=photo)
    outcome.files.append(out / "inversion.safetensors")
    outcome.message = f"Inverted in {seconds:.1f} s. " + outcome.message
    outcome.inversion = inversion
    outcome.source = photo  # keep drawing over the photo, not its reconstruction
    return outcome
