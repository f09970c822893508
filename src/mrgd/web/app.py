"""`mrgd serve`: the web UI, a Gradio page on one MRGDPipeline.

The page: a canvas where region boxes are drawn, moved, resized and deleted with the mouse, over a blank canvas,
the generated source or an uploaded photo; the table of the regions beside it; generate / edit / invert with a
progress bar and x̂0 previews; load and download edit files and PNGs. Runs go through Gradio's queue, one at a
time on the device (concurrency group "device", at most QUEUE_SIZE waiting, each told its place), and through the
runner's lock (runner.py). Nothing is fetched from anywhere: the theme uses system fonts, analytics are off.

Why the box editor is our own plain JS (editor.js, run by a ``gr.HTML``'s ``js_on_load``) rather than a maintained
component: the closest, gradio_image_annotation (0.5.6, for Gradio 6), draws boxes over an image, one label each,
in whole image pixels. The page needs a blank canvas of any size before there is a picture, boxes that keep a loaded
file's fractions exactly (7.68 pixels stays 7.68), seven fields per box in a table that follows the mouse and moves
the box when typed into, colours derived from two prompts, and one undo across canvas and table; with the component
each of these would be Python keeping a separate table in step, a server round trip per change. Gradio 6's
``gr.HTML`` runs our script with ``props.value`` as the component's value: the script writes the document
(state.py) there on every change and Python reads it when a button asks; Python's answers (a loaded file) come back
through ``watch('value')``. About 500 lines of JS, no build step, tested in a real browser
(tests/test_web_browser.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr  # mrgd.web (imported first) has turned its telemetry off

from ..errors import InputError
from ..layout import DEFAULT_FEATHER, Edit
from ..render import ROLE_COLORS
from . import jobs, state
from .page import Page, load_file, load_photo, run_edit, save_edit, set_size, switch_model
from .runner import Runner

QUEUE_SIZE = 8  # runs that may wait for the device; one more is refused with "queue is full"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
HERE = Path(__file__).parent
THEME = gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])
LIMITS = (f"Limits: canvas {state.MIN_CANVAS}-{state.MAX_CANVAS} pixels per side, multiples of 8; uploads up to "
          f"{state.MAX_UPLOAD.upper()} each; photos up to {state.MAX_PHOTO_PIXELS // 10**6} megapixels. One run at a "
          f"time on this device; up to {QUEUE_SIZE} more wait in the queue, which shows your place.")
HELP = ("Drag on the canvas to draw a box, drag a box to move it, drag a corner of the selected box to resize it; "
        "Delete removes it, Ctrl+Z undoes. In the table: an empty **prompt** adds the region in the target only, an "
        "empty **target prompt** keeps it as in the source, and `-` removes it from the target. Colours: grey "
        "background, white inherent, orange modified, green added, red removed.")


def _rgb(color: tuple[int, int, int]) -> str:
    return f"rgb({color[0]}, {color[1]}, {color[2]})"


def _edit_of(data: dict, c: dict) -> Edit:
    """The page's edit: the editor's document, the fields, the base edit (gr.Error on bad input)."""
    try:
        fields = {name: data[c[name]] for name in state.FIELDS}
        return state.edit_from_doc(state.parse_doc(data[c["editor"]]), fields, data[c["base"]])
    except InputError as err:
        raise gr.Error(str(err), print_exception=False) from None


def build(page: Page) -> gr.Blocks:
    """The Gradio Blocks of the page."""
    runner = page.runner
    start = state.default_edit()
    defaults = state.default_fields()
    colors = {role: _rgb(color) for role, color in ROLE_COLORS.items()} | {"invalid": "rgb(214, 0, 214)"}
    c: dict[str, Any] = {}  # the components, by name

    with gr.Blocks(title="mrgd", analytics_enabled=False, delete_cache=(3600, 3600), fill_width=True) as demo:
        c["base"] = gr.State(start.to_dict())  # the last loaded edit: settings the page does not show survive
        c["inversion"] = gr.State(None)
        c["photo"] = gr.State(None)
        gr.Markdown("## mrgd: multi-region image editing\n" + HELP)
        gr.Markdown(LIMITS, elem_id="mrgd-limits")
        with gr.Row():
            c["prompt"] = gr.Textbox(defaults["prompt"], label="global prompt", elem_id="mrgd-prompt", scale=4)
            c["negative_prompt"] = gr.Textbox(defaults["negative_prompt"], label="global negative prompt", scale=3)
            c["width"] = gr.Number(start.size[0], label="width", precision=0, min_width=70, scale=1)
            c["height"] = gr.Number(start.size[1], label="height", precision=0, min_width=70, scale=1)
            size_button = gr.Button("Set size", min_width=70, scale=1)
        with gr.Row(equal_height=True):
            generate_button = gr.Button("Generate source", elem_id="mrgd-generate", scale=1)
            edit_button = gr.Button("Edit", variant="primary", elem_id="mrgd-edit", scale=1)
            invert_button = gr.Button("Invert photo + edit", elem_id="mrgd-invert", scale=1)
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="mrgd-cancel", scale=1)
            c["status"] = gr.Markdown(f"Model: {runner.model_name} on {runner.device}.", elem_id="mrgd-status",
                                      container=True, min_height=40)
        c["editor"] = gr.HTML(json.dumps(state.doc_from_edit(start)), html_template="<div></div>",
                              js_on_load=(HERE / "editor.js").read_text(), elem_id="mrgd-editor",
                              apply_default_css=False, colors=colors, removed=state.REMOVED, feather=DEFAULT_FEATHER)
        c["background"] = gr.Textbox("", visible="hidden", elem_id="mrgd-background")
        with gr.Row():
            with gr.Column(scale=3):
                c["result"] = gr.Image(label="result", type="pil", format="png", interactive=False,
                                       elem_id="mrgd-result")
                with gr.Row():
                    c["preview"] = gr.Image(label="x\u0302\u2080 preview", type="pil", interactive=False,
                                            height=180, elem_id="mrgd-preview", scale=1)
                    c["gallery"] = gr.Gallery(label="explain", columns=3, height=180, object_fit="contain",
                                              elem_id="mrgd-gallery", scale=2)
            with gr.Column(scale=2):
                c["files"] = gr.File(label="downloads", file_count="multiple", interactive=False,
                                     elem_id="mrgd-files")
                save_button = gr.Button("Save edit.json", elem_id="mrgd-save")
                c["load"] = gr.File(label="load edit.json / YAML / WebUI bbox_controls / mrgd PNG",
                                    file_types=[".json", ".yaml", ".yml", ".png"], type="filepath",
                                    elem_id="mrgd-load", height=120)
                c["photo_file"] = gr.File(label="photo to edit (PNG / JPEG)", file_types=["image"],
                                          type="filepath", elem_id="mrgd-photo", height=120)
        model_button = _settings(c, defaults, runner)
        _wire(page, c, demo, (generate_button, edit_button, invert_button, cancel_button, size_button,
                              save_button, model_button))
    return demo


def _settings(c: dict, defaults: dict, runner: Runner) -> gr.Button:
    """The collapsed settings panel: the method and its main switches, with the library's defaults."""
    with gr.Accordion("Settings", open=False, elem_id="mrgd-settings"):
        with gr.Row():
            c["method"] = gr.Radio(["multidiffusion", "p2p", "mrgd"], value=defaults["method"], label="method",
                                   elem_id="mrgd-method")
            c["steps"] = gr.Number(defaults["steps"], label="steps", precision=0, elem_id="mrgd-steps")
            c["seed"] = gr.Number(defaults["seed"], label="seed", precision=0)
            c["guidance_scale"] = gr.Number(defaults["guidance_scale"], label="guidance scale (CFG)")
        with gr.Row():
            c["keywords"] = gr.Number(defaults["keywords"], label="keywords per region", precision=0)
            c["kssa"] = gr.Checkbox(defaults["kssa"], label="KSSA")
            c["use_total"] = gr.Checkbox(defaults["use_total"], label="r_total region")
            c["guidance"] = gr.Checkbox(defaults["guidance"], label="multi-region guidance")
        with gr.Row():
            c["lambda_rs"] = gr.Number(defaults["lambda_rs"], label="λ_rs (segmentation)")
            c["lambda_is"] = gr.Number(defaults["lambda_is"], label="λ_is (InfoNCE)")
            c["lambda_ip"] = gr.Number(defaults["lambda_ip"], label="λ_ip (inherent)")
            c["guidance_every"] = gr.Number(defaults["guidance_every"], label="guide every k-th step", precision=0)
        with gr.Row():
            c["region_context"] = gr.Number(defaults["region_context"], label="region context")
            c["explain"] = gr.Checkbox(False, label="explain (keyword, mask, metric pictures)",
                                       elem_id="mrgd-explain-on")
        with gr.Row():
            c["model"] = gr.Textbox(runner.model or "", label="model (diffusers folder or hub id; empty: the "
                                    "embedded one)", scale=3)
            return gr.Button("Load model", scale=1)


def _wire(page: Page, c: dict, demo: gr.Blocks, buttons: tuple) -> None:
    """The page's events; runs share the concurrency group "device" (one at a time), the rest run at once."""
    generate_button, edit_button, invert_button, cancel_button, size_button, save_button, model_button = buttons
    fields = [c[name] for name in state.FIELDS]
    run_inputs = {c["editor"], c["base"], c["inversion"], c["photo"], c["explain"], *fields}
    shown = [c["result"], c["preview"], c["gallery"], c["files"], c["status"], c["background"]]
    device = {"concurrency_limit": 1, "concurrency_id": "device", "show_progress_on": [c["result"]]}

    async def follow(work, progress, finish, doing: str):
        yield {c["status"]: f"{doing}\u2026"}  # the page says at once that its click was taken
        async for item in page.run(work, progress, c["preview"]):
            if item is None:
                yield {c["status"]: "Cancelled."}
            else:
                yield item if isinstance(item, dict) else finish(item)

    async def on_generate(data: dict, progress=gr.Progress()):
        the_edit = _edit_of(data, c)
        out = page.folder()
        work = lambda run: jobs.generate(page.runner.pipe, run, the_edit, out)  # noqa: E731
        reset = {c["inversion"]: None, c["photo"]: None}  # the generated source replaces any photo
        async for shown in follow(work, progress, lambda o: _shown(c, o) | reset, "Generating"):
            yield shown

    async def on_edit(data: dict, progress=gr.Progress()):
        the_edit = _edit_of(data, c)
        out = page.folder()
        inversion = data[c["inversion"]]  # a photo's, while it fits: edits then start from the photo
        photo = data[c["photo"]] if inversion is not None else None
        work = lambda run: jobs.edit(page.runner.pipe, run, the_edit, out, inversion=inversion,  # noqa: E731
                                     explain=bool(data[c["explain"]]), photo=photo)
        async for shown in follow(work, progress, lambda o: _shown(c, o, keep_background=photo is not None),
                                  "Editing"):
            yield shown

    async def on_invert(data: dict, progress=gr.Progress()):
        the_edit = _edit_of(data, c)
        photo = data[c["photo"]]
        if photo is None:
            raise gr.Error("photo: upload one first (the 'photo to edit' field)", print_exception=False)
        if photo.size != tuple(the_edit.size):
            raise gr.Error("photo: it was fitted to another canvas size; upload it again", print_exception=False)
        out = page.folder()
        work = lambda run: jobs.invert(page.runner.pipe, run, the_edit, photo, out)  # noqa: E731
        async for shown in follow(work, progress,
                                  lambda o: _shown(c, o, keep_background=True) | {c["inversion"]: o.inversion},
                                  "Inverting"):
            yield shown

    async def scripted_edit(config: str) -> dict:
        """Edit from an edit file's text (JSON or YAML): the resolved edit, the run's info, its PNGs (base64)."""
        return await run_edit(page, config)

    run_outputs = [*shown, c["inversion"], c["photo"]]
    runs = [
        generate_button.click(on_generate, run_inputs, run_outputs, api_name="generate", **device),
        edit_button.click(on_edit, run_inputs, run_outputs, api_name="edit", **device),
        invert_button.click(on_invert, run_inputs, run_outputs, api_name="invert", **device),
    ]
    cancel_button.click(lambda: "Cancelled.", None, c["status"], cancels=runs, queue=False)
    # the canvas background has its own channel into the editor (see editor.js)
    c["background"].change(None, c["background"], None, js="(url) => window.mrgdEditor.setBackground(url)")

    load_outputs = [c["editor"], c["base"], *fields, c["width"], c["height"], c["status"], c["background"],
                    c["inversion"], c["photo"]]
    # quick functions go through the queue too (it is what shows their errors in the page), never waiting
    quick = {"concurrency_limit": None}
    empty = {"fn": lambda: None, "inputs": None, "api_visibility": "private", **quick}
    load_inputs = [c["load"], c["editor"], c["prompt"], c["negative_prompt"], c["seed"]]
    loaded = c["load"].upload(load_file, load_inputs, load_outputs, api_name="load", **quick)
    photo = c["photo_file"].upload(load_photo, [c["photo_file"], c["editor"]],
                                   [c["photo"], c["background"], c["inversion"], c["status"]], api_name="photo",
                                   **quick)
    # after each upload, good or bad, the drop zone empties for the next file (.then did not run after a failure)
    for field, event in ((c["load"], loaded), (c["photo_file"], photo)):
        event.success(outputs=field, **empty)
        event.failure(outputs=field, **empty)
    size_button.click(set_size, [c["width"], c["height"], c["editor"]],
                      [c["editor"], c["background"], c["inversion"], c["photo"], c["status"]], api_name="size",
                      **quick)
    save_button.click(lambda data: save_edit(page, _edit_of(data, c)), run_inputs, [c["files"], c["status"]],
                      api_name="save", **quick)
    model_button.click(lambda model: switch_model(page.runner, model), c["model"], c["status"], api_name="model",
                       concurrency_limit=1, concurrency_id="device")
    gr.api(scripted_edit, api_name="run_edit", concurrency_limit=1, concurrency_id="device")


def _shown(c: dict, outcome: jobs.Outcome, keep_background: bool = False) -> dict:
    """The page's outputs of a finished run."""
    shown = {c["result"]: outcome.picture, c["gallery"]: [(p, name) for p, name in outcome.explain],
             c["files"]: [str(p) for p in outcome.files], c["status"]: outcome.message,
             c["preview"]: gr.Image(None, label="x\u0302\u2080 preview")}
    if outcome.source is not None and not keep_background:
        shown[c["background"]] = state.data_url(outcome.source)
    return shown


# ---------------------------------------------------------------------------------------------------------------
# Serving


def host_warning(host: str, port: int) -> str | None:
    """The one line said when the server listens beyond this machine."""
    if host in LOCAL_HOSTS:
        return None
    return (f"mrgd: warning: listening on {host}:{port}, beyond this machine: anyone who reaches it can use the UI "
            "and this machine's model; use --host 127.0.0.1 to keep it local")


def launch(page: Page, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> tuple[gr.Blocks, str]:
    """Build the page and serve it; returns (blocks, local URL) when ``block`` is False."""
    runner, workdir = page.runner, page.workdir
    demo = build(page)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    warning = host_warning(host, port)
    if warning:
        print(warning, file=sys.stderr)
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                theme=THEME, css=(HERE / "editor.css").read_text(), footer_links=["api"],
                                run_history=False, ssr_mode=False, pwa=False, mcp_server=False,
                                enable_monitoring=False, max_file_size=state.MAX_UPLOAD, allowed_paths=[str(workdir)],
                                share=False)
    except OSError as err:
        raise InputError(f"--port: cannot listen on {host}:{port} ({err}); choose another port or host") from None
    if block:
        print(f"mrgd: serving {url} (model {runner.model_name} on {runner.device}); Ctrl+C stops", file=sys.stderr)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl+C does, files cleaned up
        try:
            demo.block_thread()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return demo, url


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          dtype: str = "auto", compile_unet: bool = False) -> None:
    """`mrgd serve`: load the model, then serve the page until Ctrl+C."""
    runner = Runner(model, device, dtype, compile_unet)
    launch(Page(runner, Path(tempfile.mkdtemp(prefix="mrgd-web-"))), host, port)
