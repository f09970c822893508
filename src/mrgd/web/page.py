"""What the page does, server side: its runs on the device (with progress, previews and cancel), and its quick
functions (loading files and photos, the canvas size, saving edit.json, switching models, the scripting endpoint).

Every function answers bad input with a ``gr.Error`` holding the one-line InputError, raised before anything on
the page changes, so the page keeps its layout and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import traceback
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import InputError
from ..layout import Edit
from . import jobs, state
from .runner import Cancelled, Runner

KEEP_RUNS = 64  # run folders kept on disk for downloads; older ones are deleted


class Page:
    """The page's server-side functions, on one runner (also called directly by the tests)."""

    def __init__(self, runner: Runner, workdir: Path):
        self.runner, self.workdir = runner, workdir
        self._count = 0

    def folder(self) -> Path:
        """A fresh folder for one run's files; the oldest are deleted beyond KEEP_RUNS."""
        self._count += 1
        out = self.workdir / f"run-{self._count:05d}"
        out.mkdir(parents=True)
        for old in sorted(self.workdir.glob("run-*"))[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)
        return out

    # ------------------------------------------------------------------ runs
    async def run(self, work, progress: gr.Progress, preview: gr.Image):
        """Run ``work(run)`` on the device; yield x̂0 previews for the page, then the outcome (or None if
        cancelled). Cancelling the event (the Cancel button, a closed page) stops the pipeline at its next step."""
        run = self.runner.start(work, asyncio.get_running_loop())
        try:
            async for update in run.updates():
                progress((update.step, update.steps), desc=update.phase, unit="steps")
                if update.preview is not None:
                    yield {preview: gr.Image(update.preview, label=f"x\u0302\u2080 preview, {update.phase} "
                                                                    f"step {update.step}/{update.steps}")}
        finally:
            run.cancel()  # a no-op once it finished; when this task is cancelled it stops the worker
        if isinstance(run.error, Cancelled):
            yield None
        elif run.error is not None:
            raise _page_error(run.error)
        else:
            yield run.result


def _page_error(err: BaseException) -> gr.Error:
    """What the page says about a failure: the one-line InputError, or "internal failure" (traceback logged)."""
    if isinstance(err, InputError):
        return gr.Error(str(err), print_exception=False)
    if isinstance(err, Cancelled):
        return gr.Error("cancelled", print_exception=False)
    traceback.print_exception(err)
    return gr.Error(f"internal failure: {type(err).__name__}: {err}", print_exception=False)


def load_file(path: str | None, doc_text: str, prompt: str, negative_prompt: str, seed: Any) -> tuple:
    """A loaded file: the editor document, the base edit, the fields, the size, a message (gr.Error on bad
    input, which leaves the page as it was). A WebUI file takes the page's canvas size, global prompt and seed."""
    if not path:
        raise gr.Error("load: no file; drop an edit.json, a YAML file, a WebUI config or an mrgd PNG",
                       print_exception=False)
    try:
        current = Edit.from_dict({"size": state.parse_doc(doc_text)["size"], "prompt": prompt or "",
                                  "negative_prompt": negative_prompt or "", "seed": seed or 0}, source="page")
    except InputError:
        current = state.default_edit()
    try:
        edit, notes, picture = state.load_config(path, current)
    except InputError as err:
        raise gr.Error(str(err), print_exception=False) from None
    fields = state.fields_from_edit(edit)
    roles = ", ".join(f"{k} ({v})" for k, v in edit.roles().items()) or "no regions"
    message = f"Loaded {Path(path).name}: {len(edit.regions)} regions: {roles}." + "".join(f" {n}." for n in notes)
    background = state.data_url(picture) if picture is not None else ""
    return (json.dumps(state.doc_from_edit(edit)), edit.to_dict(), *[fields[name] for name in state.FIELDS],
            edit.size[0], edit.size[1], message, background, None, None)


def load_photo(path: str | None, doc_text: str) -> tuple:
    """An uploaded photo, fitted to the canvas, becomes the background and the image to invert."""
    if not path:
        return None, "", None, "Photo removed."
    try:
        size = state.parse_doc(doc_text)["size"]
        photo, note = state.open_photo(path, tuple(size))
    except InputError as err:
        raise gr.Error(str(err), print_exception=False) from None
    message = f"Photo {Path(path).name} ready: draw its regions, then Invert photo + edit."
    return photo, state.data_url(photo), None, message + (f" ({note})" if note else "")


def set_size(width: Any, height: Any, doc_text: str) -> tuple:
    """A new canvas size; boxes keep their fractions, the background and any inversion are dropped."""
    try:
        doc = state.parse_doc(doc_text)
        size = [int(width) if width is not None else 0, int(height) if height is not None else 0]
        state.check_canvas(size)
    except (InputError, ValueError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    doc["size"] = size
    return json.dumps(doc), "", None, None, f"Canvas {size[0]}x{size[1]}."


def save_edit(page: Page, edit: Edit) -> tuple:
    """The resolved edit.json of the page, every default filled in, without running anything."""
    out = page.folder()
    edit.save(out / "edit.json")
    return [str(out / "edit.json")], "Saved edit.json (every default filled in)."


def switch_model(runner: Runner, model: str) -> str:
    """Load another model for every later run (empty: the embedded one); a bad one leaves the current loaded."""
    try:
        runner.switch((model or "").strip())
    except InputError as err:
        raise gr.Error(f"{err} (the current model stays loaded)", print_exception=False) from None
    return f"Model: {runner.model_name} on {runner.device}."


async def run_edit(page: Page, config: str) -> dict:
    """For scripts: edit from an edit file's text (JSON or YAML). Returns the resolved edit, the run's info and
    its PNGs (base64, with their metadata chunks). Cancelling the request (``job.cancel()``) stops the run."""
    import base64

    out = page.folder()
    request = out / ("request.json" if config.lstrip().startswith("{") else "request.yaml")
    request.write_text(config, encoding="utf-8")
    try:
        the_edit = Edit.load(request)
        state.check_canvas(the_edit.size, request.name)
    except InputError as err:
        raise gr.Error(str(err), print_exception=False) from None
    run = page.runner.start(lambda run: jobs.edit(page.runner.pipe, run, the_edit, out), asyncio.get_running_loop())
    try:
        async for _ in run.updates():
            pass
    finally:
        run.cancel()  # a no-op once finished; stops the worker when the request was cancelled
    if run.error is not None:
        raise _page_error(run.error)
    files = {p.name: base64.b64encode(p.read_bytes()).decode("ascii") for p in run.result.files if p.suffix == ".png"}
    info = json.loads((out / "info.json").read_text())
    return {"edit": the_edit.to_dict(), "info": info, "message": run.result.message, "png": files}
