"""The box editor's document and the page's fields, to and from an :class:`~mrgd.layout.Edit` (pure functions).

The editor (``editor.js``) holds a *document*, ``{"size": [W, H], "regions": [row, ...], "background": url}``,
one row per region of the table beside the canvas: ``id``, ``kind``, ``box`` (``[x, y, w, h]`` fractions of the
canvas, exactly as in the edit file, so a loaded layout is restored bit for bit), ``prompt``, ``target_prompt``,
``negative_prompt``, ``seed``, ``feather``, and the fields the table does not show (``keywords``,
``keyword_count``), kept from a loaded file. The two prompt cells read as a person types them: an empty prompt
means the region is not in the source (added), an empty target prompt means "as in the source" (inherent), and
:data:`REMOVED` (``-``) removes the region from the target. The rest of an edit (global prompt, seed, steps, the
method's settings) lives in the page's fields, :data:`FIELDS`; what the page does not show is kept in a *base*
dict, the last loaded edit, so a loaded file's every setting survives a round trip.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..layout import Edit, Settings, read_config_file

REMOVED = "-"  # the target prompt cell of a region removed from the target
MAX_CANVAS = 1024  # pixels per side of the canvas; larger layouts are refused with a message, not run for minutes
MIN_CANVAS = 64
MAX_PHOTO_PIXELS = 4096 * 4096  # an uploaded photo is decoded whole before it is fitted to the canvas
MAX_UPLOAD = "16mb"  # any one uploaded file (Gradio refuses larger ones before they reach us)
PREVIEW_SIDE = 512  # the canvas background is shown at most this large; it is a picture to draw over, not data

# The page's fields: name -> path inside the edit file. Their defaults are the library's (Edit, Settings).
FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",), "negative_prompt": ("negative_prompt",), "seed": ("seed",), "steps": ("steps",),
    "guidance_scale": ("guidance_scale",), "region_context": ("region_context",),
    "method": ("mrgd", "method"), "keywords": ("mrgd", "keywords"), "kssa": ("mrgd", "kssa"),
    "use_total": ("mrgd", "use_total"), "guidance": ("mrgd", "guidance"), "lambda_rs": ("mrgd", "lambda_rs"),
    "lambda_is": ("mrgd", "lambda_is"), "lambda_ip": ("mrgd", "lambda_ip"),
    "guidance_every": ("mrgd", "guidance_every"),
}
_ROW_FIELDS = ("id", "kind", "box", "prompt", "target_prompt", "negative_prompt", "seed", "feather", "keywords",
               "keyword_count")


def default_edit() -> Edit:
    """The page's starting point: a blank canvas of the default size with the library's defaults."""
    return Edit()


def row_role(row: dict[str, Any]) -> str | None:
    """A row's role as the editor colours it (inherent, added, removed, modified); None when it has no prompt."""
    prompt, target = row.get("prompt") or "", row.get("target_prompt") or ""
    if not prompt.strip():
        return "added" if target.strip() not in ("", REMOVED) else None
    if target.strip() == REMOVED:
        return "removed"
    return "inherent" if not target.strip() or target == prompt else "modified"


# ---------------------------------------------------------------------------------------------------------------
# Edit <-> document


def doc_from_edit(edit: Edit, background: str | None = None) -> dict[str, Any]:
    """The editor document of an edit: every region as a table row, boxes as the file's fractions."""
    rows = []
    for region in edit.regions:
        target = {"added": region.target_prompt, "removed": REMOVED, "inherent": "",
                  "modified": region.target_prompt}[region.role]
        rows.append({"id": region.id, "kind": region.kind, "box": list(region.box), "prompt": region.prompt or "",
                     "target_prompt": target, "negative_prompt": region.negative_prompt, "seed": region.seed,
                     "feather": region.feather, "keywords": list(region.keywords),
                     "keyword_count": region.keyword_count})
    return {"size": list(edit.size), "regions": rows, "background": background}


def region_from_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """The edit-file region of a table row (validation is the Edit's, so its messages name the field)."""
    if not isinstance(row, dict):
        raise InputError(f"regions[{index}]: expected a table row, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_ROW_FIELDS))
    if unknown:
        raise InputError(f"regions[{index}].{unknown[0]}: unknown field; the editor sends {', '.join(_ROW_FIELDS)}")
    region = {k: v for k, v in row.items() if k not in ("prompt", "target_prompt") and v not in (None, "")}
    prompt, target = row.get("prompt") or "", row.get("target_prompt") or ""  # kept as typed: exact round trips
    name = row.get("id") or f"#{index + 1}"
    if not prompt.strip() and target.strip() in ("", REMOVED):
        raise InputError(f"regions[{index}] ({name}): give a prompt (source), a target prompt (added) or both")
    if prompt.strip():
        region["prompt"] = prompt
    if target.strip() == REMOVED:
        region["target_prompt"] = None
    elif target.strip():
        region["target_prompt"] = target
    return region


def parse_doc(text: str) -> dict[str, Any]:
    """The editor's JSON; a document that is not one is an InputError (the page then keeps its layout)."""
    try:
        doc = json.loads(text or "")
    except ValueError:
        raise InputError("editor: its layout is not JSON; reload the page") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("regions"), list) or "size" not in doc:
        raise InputError('editor: expected {"size": [W, H], "regions": [...]}; reload the page')
    return doc


def edit_from_doc(doc: dict[str, Any], fields: dict[str, Any], base: dict[str, Any] | None = None) -> Edit:
    """The edit that the page shows: the base edit, its page fields replaced by ``fields``, regions from ``doc``."""
    data = json.loads(json.dumps(base or default_edit().to_dict()))  # a deep copy, JSON types only
    for name, value in fields.items():
        *parents, leaf = FIELDS[name]
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    data["size"] = doc["size"]
    data["regions"] = [region_from_row(row, i) for i, row in enumerate(doc["regions"])]
    edit = Edit.from_dict(data, source="page")
    check_canvas(edit.size, "page")
    return edit


def fields_from_edit(edit: Edit) -> dict[str, Any]:
    """The page's field values of an edit, in :data:`FIELDS` order."""
    data = edit.to_dict()
    values = {}
    for name, path in FIELDS.items():
        value = data
        for key in path:
            value = value[key]
        values[name] = value
    return values


def default_fields() -> dict[str, Any]:
    """The library's defaults for the page's fields (Edit's canvas defaults and Settings)."""
    return fields_from_edit(Edit(mrgd=Settings()))


def check_canvas(size: tuple[int, int] | list[int], source: str | None = None) -> None:
    """Refuse a canvas the page does not run: sides from MIN_CANVAS to MAX_CANVAS, multiples of 8."""
    where = f"{source}: " if source else ""
    for name, value in zip(("width", "height"), size):
        if not isinstance(value, int) or value % 8 or not MIN_CANVAS <= value <= MAX_CANVAS:
            raise InputError(f"{where}size: {name} {value} is outside this server's canvas limit; "
                             f"use a multiple of 8 from {MIN_CANVAS} to {MAX_CANVAS}")


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_config(path: str | Path, current: Edit) -> tuple[Edit, list[str], Image.Image | None]:
    """An edit.json / YAML, a WebUI ``bbox_controls`` file or a PNG written by mrgd, as an edit.

    Returns the edit, notes for the page, and the PNG's picture when it fits the canvas (to draw over). A WebUI
    file carries no global prompt, seed or size: they are taken from ``current``.
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() == ".png":
        data = _png_config(path)
        edit = Edit.from_dict(data, source=name)
        check_canvas(edit.size, name)
        with Image.open(path) as image:
            picture = image.convert("RGB") if image.size == tuple(edit.size) else None
        return edit, [], picture
    data = read_config_file(path)
    if "bbox_controls" in data:
        from ..webui_import import import_webui, load_webui

        load_webui(path)  # its checks, with the file named
        edit, notes = import_webui(data, prompt=current.prompt, negative_prompt=current.negative_prompt,
                                   seed=current.seed, size=tuple(current.size))
        return edit, [f"{name}: {note}" for note in notes], None
    edit = Edit.from_dict(data, source=name)
    check_canvas(edit.size, name)
    return edit, [], None


def _png_config(path: Path) -> dict[str, Any]:
    from ..render import read_png_config

    try:
        with Image.open(path) as image:
            image.verify()  # a truncated or corrupt PNG fails here, not half-way through a later step
    except Exception:
        raise InputError(f"{path.name}: not a readable PNG; drop a PNG written by mrgd") from None
    try:
        data = read_png_config(path)
    except KeyError:
        raise InputError(f"{path.name}: this PNG carries no mrgd config; drop a PNG written by mrgd "
                         "(source.png, target.png, grid.png, image.png)") from None
    except (ValueError, OSError):
        raise InputError(f"{path.name}: its mrgd config is not valid JSON; drop a PNG written by mrgd") from None
    if not isinstance(data, dict):
        raise InputError(f"{path.name}: its mrgd config is not a mapping; drop a PNG written by mrgd")
    return data


def open_photo(path: str | Path, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """An uploaded photo fitted to the canvas (centre crop + resize, as `mrgd invert`), after the size check."""
    from ..inversion import load_image

    path = Path(path)
    too_large = (f"{path.name}: {{}} is too large; give a photo of at most {MAX_PHOTO_PIXELS // 10**6} megapixels "
                 "(e.g. 4096x4096)")
    try:
        with Image.open(path) as image:
            width, height = image.size  # read from the header: nothing is decoded yet
    except Image.DecompressionBombError:  # PIL's own guard, far above ours
        raise InputError(too_large.format("the image")) from None
    except Exception:
        raise InputError(f"{path.name}: not an image this server can read; give a PNG or JPEG") from None
    if width * height > MAX_PHOTO_PIXELS:
        raise InputError(too_large.format(f"{width}x{height}"))
    try:
        return load_image(path, tuple(size))
    except InputError:
        raise InputError(f"{path.name}: not an image this server can read; give a PNG or JPEG") from None


def data_url(image: Image.Image) -> str:
    """A PNG data URL of a picture, shrunk to PREVIEW_SIDE, for the editor's background."""
    image = image.convert("RGB")
    if max(image.size) > PREVIEW_SIDE:
        image = image.copy()
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
