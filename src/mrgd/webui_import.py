"""Import the WebUI extension's region file ``{"bbox_controls": [...]}`` as an :class:`Edit` (method.md §1).

Every entry is classified by its ``blend_mode``, never by the file name or its position in the list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import InputError, describe_validation_error
from .layout import Edit, Region, read_config_file

# blend mode -> (id prefix, kind, role); EditedSource + EditedTarget are handled as a pair.
_SINGLE_MODES = {
    "Background": ("background", "background", "inherent"),
    "Foreground": ("fg", "foreground", "inherent"),
    "AdditionForeground": ("add", "foreground", "added"),
    "RemovalForeground": ("remove", "foreground", "removed"),
}
_MODES = (*_SINGLE_MODES, "EditedSource", "EditedTarget")


def load_webui(path: str | Path) -> dict[str, Any]:
    """Read a WebUI region file; a missing file, bad JSON or a missing ``bbox_controls`` list is an InputError."""
    data = read_config_file(path)
    _controls(data, source=str(path))
    return data


def import_webui(
    data: dict[str, Any],
    *,
    prompt: str = "",
    negative_prompt: str = "",
    seed: int = 0,
    size: tuple[int, int] = (512, 512),
) -> tuple[Edit, list[str]]:
    """Turn a WebUI region file into an edit; returns the edit and warnings about entries that were dropped.

    The global prompt, seed and size live outside the WebUI file (in the image's generation parameters).
    """
    warnings: list[str] = []
    kept = []
    for index, entry in enumerate(_controls(data)):
        box, reason = _box(index, entry)
        if reason:
            warnings.append(f"bbox_controls[{index}]: {reason}; dropped")
        else:
            kept.append((index, entry, box))

    targets = _pair_edits(kept, warnings)
    paired = set(targets.values())
    regions = []
    for position, (index, entry, box) in enumerate(kept):
        mode = entry.get("blend_mode")
        if mode == "EditedSource":  # the modified region takes the source entry's place in the layer order
            regions.append(_edited_region(kept[position], kept[targets[position]], warnings))
            continue
        if mode == "EditedTarget":
            if position not in paired:
                raise InputError(
                    f"bbox_controls[{index}].blend_mode: EditedTarget has no enabled EditedSource entry before it; "
                    "add one or change the blend mode"
                )
            continue
        prefix, kind, role = _SINGLE_MODES[mode]
        fields = {"kind": kind, **_common(index, entry, box)}
        text = _text(index, entry, "prompt")
        fields.update({"inherent": {"prompt": text}, "added": {"target_prompt": text},
                       "removed": {"prompt": text, "target_prompt": None}}[role])
        regions.append(_region(index, f"{prefix}-{index}", fields))

    if not regions:
        warnings.append("bbox_controls: no usable entries; the edit has no regions")
    try:
        edit = Edit(size=size, prompt=prompt, negative_prompt=negative_prompt, seed=seed, regions=regions)
    except ValidationError as err:
        raise InputError(describe_validation_error(err)) from None
    return edit, warnings


def _pair_edits(kept: list[tuple], warnings: list[str]) -> dict[int, int]:
    """Position of each EditedSource in ``kept`` -> position of its EditedTarget.

    Each EditedSource takes the next EditedTarget not yet taken, whatever entries stand between, as the research
    code pairs them (four of its own region configs put a Foreground entry inside a pair).
    """
    targets: dict[int, int] = {}
    waiting: list[int] = []  # EditedSource positions still looking for their target, oldest first
    for position, (_, entry, _) in enumerate(kept):
        if entry.get("blend_mode") == "EditedSource":
            waiting.append(position)
        elif entry.get("blend_mode") == "EditedTarget" and waiting:
            targets[waiting.pop(0)] = position
    if waiting:
        index = kept[waiting[0]][0]
        raise InputError(
            f"bbox_controls[{index}].blend_mode: EditedSource needs an enabled EditedTarget entry after it; "
            "add one or change the blend mode"
        )
    for source, target in targets.items():
        (index, _, box), (target_index, _, target_box) = kept[source], kept[target]
        if box != target_box:
            warnings.append(
                f"bbox_controls[{index}] (EditedSource, box {_show(box)}) paired with bbox_controls[{target_index}] "
                f"(EditedTarget, box {_show(target_box)}): the boxes differ; the EditedSource's box is used"
            )
    return targets


def _show(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _controls(data: Any, source: str | None = None) -> list[Any]:
    controls = data.get("bbox_controls") if isinstance(data, dict) else None
    if not isinstance(controls, list):
        where = f"{source}: " if source else ""
        raise InputError(f'{where}bbox_controls: missing; expected {{"bbox_controls": [...]}} as the WebUI writes it')
    return controls


def _box(index: int, entry: Any) -> tuple[tuple[float, float, float, float], str | None]:
    """The entry's box moved inside the canvas, or the reason to drop the entry."""
    if not isinstance(entry, dict):
        raise InputError(f"bbox_controls[{index}]: expected an object with x, y, w, h, prompt and blend_mode")
    mode = entry.get("blend_mode")
    if not isinstance(mode, str) or mode not in _MODES:
        raise InputError(
            f"bbox_controls[{index}].blend_mode: unknown blend mode {mode!r:.40}; use one of {', '.join(_MODES)}"
        )
    if not entry.get("enable", True):
        return (0, 0, 0, 0), "disabled"
    x, y, w, h = (_number(index, entry, key) for key in ("x", "y", "w", "h"))
    if w <= 0 or h <= 0 or x > 1 or y > 1:
        return (0, 0, 0, 0), "degenerate box (w <= 0, h <= 0, x > 1 or y > 1)"
    # A box partly left of or above the canvas keeps its visible part.
    x, w = max(x, 0.0), w + min(x, 0.0)
    y, h = max(y, 0.0), h + min(y, 0.0)
    if w <= 0 or h <= 0 or x >= 1 or y >= 1:
        return (0, 0, 0, 0), "box lies outside the canvas"
    return (x, y, w, h), None


def _number(index: int, entry: dict, key: str) -> float:
    value = entry.get(key)
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:
        number = None
    if number is None or number != number or abs(number) == float("inf"):
        raise InputError(f"bbox_controls[{index}].{key}: expected a finite number, got {value!r:.40}")
    return number


def _text(index: int, entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"bbox_controls[{index}].{key}: expected text, got {value!r:.40}")
    return value


def _common(index: int, entry: dict, box: tuple[float, float, float, float]) -> dict[str, Any]:
    seed = entry.get("seed")
    return {
        "box": box,
        "negative_prompt": _text(index, entry, "neg_prompt"),
        "keywords": _keywords(index, entry),
        "feather": entry.get("feather_ratio", 0.2),
        "seed": None if seed is None or seed == -1 else seed,  # -1: the WebUI's "random"
    }


def _keywords(index: int, entry: dict) -> list[str]:
    return [word.strip() for word in _text(index, entry, "key_prompt").split(",") if word.strip()]


def _edited_region(source: tuple, target: tuple, warnings: list[str]) -> Region:
    """One modified region from an EditedSource entry and its EditedTarget; the pair shares the source's box."""
    (index, source, box), (target_index, target, _) = source, target
    source_prompt, target_prompt = _text(index, source, "prompt"), _text(target_index, target, "prompt")
    if source_prompt == target_prompt:
        warnings.append(f"bbox_controls[{index}]: edit pair with identical prompts; imported as an unchanged region")
    fields = _common(index, source, box)
    fields["keywords"] += [word for word in _keywords(target_index, target) if word not in fields["keywords"]]
    fields.update(prompt=source_prompt, target_prompt=target_prompt)
    return _region(index, f"edit-{index}", fields)


def _region(index: int, region_id: str, fields: dict[str, Any]) -> Region:
    try:
        return Region.model_validate({"id": region_id, **fields})
    except ValidationError as err:
        raise InputError(describe_validation_error(err, source=f"bbox_controls[{index}]")) from None
