"""The web UI's server side: the editor document <-> edit round trip, file loading and bad files, the page's
functions, the Python client against a live server, cancelling, and 20 requests at once."""

from __future__ import annotations

import base64
import io
import importlib.util
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from mrgd.errors import InputError
from mrgd.layout import Edit
from mrgd.render import save_png
from mrgd.web import EXTRA_HINT
from webutil import ROOT, gradio_missing

EXAMPLE = ROOT / "examples" / "three_regions.json"
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
needs_gradio = pytest.mark.skipif(gradio_missing() is not None, reason=gradio_missing() or "")
from mrgd.web import state  # noqa: E402 - needs nothing beyond mrgd

FULL = {  # every kind of region and every field the table shows or keeps
    "size": [128, 96], "prompt": "masterpiece", "negative_prompt": "blurry", "seed": 5, "steps": 7,
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass", "feather": 0.1},
        {"id": "ball", "box": [0.06, 0.52, 0.4, 0.4], "prompt": "a red circle ", "seed": 11,
         "keywords": ["red"], "keyword_count": 3},
        {"id": "kite", "box": [0.55, 0.06, 0.4, 0.4], "prompt": "a blue square", "target_prompt": "a yellow square",
         "negative_prompt": "dark"},
        {"id": "toy", "box": [0.55, 0.54, 0.4, 0.4], "target_prompt": "a purple star"},
        {"id": "rock", "box": [0.1, 0.1, 0.25, 0.25], "prompt": "an orange triangle", "target_prompt": None},
    ],
    "mrgd": {"method": "p2p", "schedule": "step", "cross_replace": {"modified": 0.3}},
}


def assert_one_line(err: Exception, *fragments: str) -> None:
    message = str(err)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------------------------
# document <-> edit


def test_document_round_trip_restores_the_edit_exactly():
    edit = Edit.from_dict(FULL)
    doc = json.loads(json.dumps(state.doc_from_edit(edit)))  # as the page's JS holds it
    rows = {row["id"]: row for row in doc["regions"]}
    assert [row["id"] for row in doc["regions"]] == ["ground", "ball", "kite", "toy", "rock"]
    assert rows["kite"]["target_prompt"] == "a yellow square" and rows["ball"]["target_prompt"] == ""
    assert rows["toy"]["prompt"] == "" and rows["rock"]["target_prompt"] == state.REMOVED
    assert rows["ball"]["box"] == [0.06, 0.52, 0.4, 0.4]  # the file's fractions, not rounded pixels
    back = state.edit_from_doc(doc, state.fields_from_edit(edit), edit.to_dict())
    assert back == edit
    assert back.to_dict() == edit.to_dict()
    assert {row["id"]: state.row_role(row) for row in doc["regions"]} == edit.roles()


def test_page_fields_override_the_base_and_keep_what_the_page_does_not_show():
    edit = Edit.from_dict(FULL)
    fields = {**state.fields_from_edit(edit), "method": "mrgd", "steps": 3, "lambda_ip": 10.0}
    back = state.edit_from_doc(state.doc_from_edit(edit), fields, edit.to_dict())
    assert (back.mrgd.method, back.steps, back.mrgd.lambda_ip) == ("mrgd", 3, 10.0)
    assert back.mrgd.schedule == "step" and back.mrgd.cross_replace.modified == 0.3  # not on the page: kept
    assert set(state.FIELDS) == set(state.default_fields())
    assert state.default_fields()["lambda_is"] == Edit().mrgd.lambda_is  # the library's defaults


@pytest.mark.parametrize("row, role", [
    ({"prompt": "a", "target_prompt": ""}, "inherent"), ({"prompt": "a", "target_prompt": "a"}, "inherent"),
    ({"prompt": "a", "target_prompt": "b"}, "modified"), ({"prompt": "", "target_prompt": "b"}, "added"),
    ({"prompt": "a", "target_prompt": " - "}, "removed"), ({"prompt": " ", "target_prompt": ""}, None),
    ({"prompt": "", "target_prompt": "-"}, None),
])
def test_row_roles_match_the_edit_roles(row, role):
    assert state.row_role(row) == role
    full = {"id": "r1", "box": [0.1, 0.1, 0.2, 0.2], **row}
    if role is None:
        with pytest.raises(InputError) as caught:
            state.region_from_row(full, 0)
        assert_one_line(caught.value, "regions[0] (r1)", "give a prompt")
    else:
        assert Edit.from_dict({"regions": [state.region_from_row(full, 0)]}).roles() == {"r1": role}


@pytest.mark.parametrize("change, fragments", [
    ({"box": [0.1, 0.1, 0, 0.2]}, ("regions[0].box", "width must be > 0")),
    ({"box": [0.1, 0.1, 0.2]}, ("regions[0].box", "got 3 values; give 4")),
    ({"colour": "red"}, ("regions[0].colour", "unknown field")),
    ({"feather": 2}, ("regions[0].feather",)),
])
def test_bad_rows_are_one_line_errors(change, fragments):
    doc = {"size": [128, 128], "regions": [{"id": "r1", "box": [0.1, 0.1, 0.2, 0.2], "prompt": "a", **change}]}
    with pytest.raises(InputError) as caught:
        state.edit_from_doc(doc, state.default_fields())
    assert_one_line(caught.value, *fragments)


def test_canvas_limits_and_broken_documents():
    for size in ([2048, 128], [100, 128], [32, 32]):
        with pytest.raises(InputError) as caught:
            state.check_canvas(size)
        assert_one_line(caught.value, "size:", str(state.MAX_CANVAS))
    state.check_canvas([state.MAX_CANVAS, state.MIN_CANVAS])
    for text in ("", "{", "[]", '{"regions": 3, "size": [8, 8]}'):
        with pytest.raises(InputError) as caught:
            state.parse_doc(text)
        assert_one_line(caught.value, "editor:")


# ---------------------------------------------------------------------------------------------------------------
# files


def test_png_restore_gives_back_the_edit_and_its_picture(tmp_path):
    edit = Edit.from_dict(FULL)
    picture = Image.new("RGB", tuple(edit.size), (10, 200, 30))
    save_png(picture, tmp_path / "source.png", edit.to_dict(), "tiny")
    loaded, notes, background = state.load_config(tmp_path / "source.png", Edit())
    assert loaded == edit and notes == []
    assert background is not None and background.getpixel((3, 3)) == (10, 200, 30)
    save_png(Image.new("RGB", (300, 100)), tmp_path / "grid.png", edit.to_dict(), "tiny")
    assert state.load_config(tmp_path / "grid.png", Edit())[2] is None  # not the canvas: nothing to draw over


def test_yaml_and_webui_files_load(tmp_path):
    yaml_file = tmp_path / "edit.yaml"
    Edit.from_dict(FULL).save(yaml_file)
    assert state.load_config(yaml_file, Edit())[0] == Edit.from_dict(FULL)
    webui = tmp_path / "regions.json"
    webui.write_text(json.dumps({"bbox_controls": [
        {"enable": True, "x": 0, "y": 0, "w": 1, "h": 1, "prompt": "grass", "blend_mode": "Background"},
        {"enable": True, "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.3, "prompt": "a star",
         "blend_mode": "AdditionForeground"},
        {"enable": True, "x": 0.5, "y": 0.2, "w": 0, "h": 0.3, "prompt": "a line", "blend_mode": "Foreground"},
    ]}))
    current = Edit(size=(96, 64), prompt="best quality", seed=9)
    edit, notes, _ = state.load_config(webui, current)
    assert edit.roles() == {"background-0": "inherent", "add-1": "added"}
    assert (edit.size, edit.prompt, edit.seed) == ((96, 64), "best quality", 9)  # taken from the page
    assert len(notes) == 1 and "regions.json: bbox_controls[2]" in notes[0] and "dropped" in notes[0]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with one tiny data chunk: opens lazily, never decodes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def test_bad_files_are_one_line_errors(tmp_path):
    cases = {
        "broken.json": ('{"size": [128, 128], "regions": [', ("broken.json", "invalid JSON")),
        "zero.json": (json.dumps({"regions": [{"id": "a", "box": [0.1, 0.1, 0, 0.1], "prompt": "x"}]}),
                      ("zero.json", "regions[0].box", "width must be > 0")),
        "huge.json": (json.dumps({"size": [4096, 4096]}), ("huge.json", "canvas limit")),
        "notes.txt": ("hello", ("notes.txt", "unsupported file type")),
        "list.yaml": ("- 1\n- 2\n", ("list.yaml", "mapping")),
        "webui.json": (json.dumps({"bbox_controls": [{"blend_mode": "Sideways"}]}), ("blend mode",)),
    }
    for name, (text, fragments) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError) as caught:
            state.load_config(tmp_path / name, Edit())
        assert_one_line(caught.value, *fragments)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "plain.png").read_bytes()[:30])
    for name, fragment in (("plain.png", "carries no mrgd config"), ("cut.png", "not a readable PNG")):
        with pytest.raises(InputError) as caught:
            state.load_config(tmp_path / name, Edit())
        assert_one_line(caught.value, name, fragment)


def test_photos_are_fitted_and_huge_ones_refused_before_decoding(tmp_path):
    Image.new("RGB", (300, 200), (200, 10, 10)).save(tmp_path / "photo.jpg")
    photo, note = state.open_photo(tmp_path / "photo.jpg", (128, 96))
    assert photo.size == (128, 96) and "centre-cropped" in note
    for (width, height), said in (((8000, 6000), "8000x6000 is too large"), ((30000, 30000), "is too large")):
        _png_header_only(tmp_path / "big.png", width, height)
        with pytest.raises(InputError) as caught:
            state.open_photo(tmp_path / "big.png", (128, 128))
        assert_one_line(caught.value, "big.png", said, "megapixels")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(InputError) as caught:
        state.open_photo(tmp_path / "fake.png", (128, 128))
    assert_one_line(caught.value, "fake.png", "not an image")


def test_data_url_is_a_shrunk_png():
    url = state.data_url(Image.new("RGB", (2000, 1000)))
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        assert image.size == (state.PREVIEW_SIDE, state.PREVIEW_SIDE // 2)


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_serve_without_gradio_says_how_to_get_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    code, out, err = run_cli(capsys, "serve", "--port", "1")
    assert code == 2 and err.strip().splitlines() == [f"mrgd: error: {EXTRA_HINT}"]
    assert "pip install mrgd[web]" in err


@needs_gradio
def test_serve_refuses_a_model_that_is_not_one(capsys, tmp_path):
    code, out, err = run_cli(capsys, "serve", "--model", str(tmp_path), "--port", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a diffusers folder" in err


@needs_gradio
def test_host_warning_only_beyond_this_machine():
    from mrgd.web.app import host_warning

    assert host_warning("127.0.0.1", 7860) is None and host_warning("localhost", 7860) is None
    line = host_warning("0.0.0.0", 7860)
    assert line.startswith("mrgd: warning: listening on 0.0.0.0:7860") and len(line.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# the page's functions and the Python client, against a live server on the embedded model


@pytest.fixture(scope="module")
def server():
    if gradio_missing():
        pytest.skip(gradio_missing())
    from webutil import shared_server

    return shared_server()


def test_page_functions_load_and_refuse_bad_files(server, tmp_path):
    import gradio as gr

    from mrgd.web.page import load_file, set_size, switch_model

    blank = json.dumps(state.doc_from_edit(Edit()))
    doc, base, *rest = load_file(str(EXAMPLE), blank, "", "", 0)
    fields = dict(zip(state.FIELDS, rest))
    assert [r["id"] for r in json.loads(doc)["regions"]] == ["ground", "ball", "kite", "toy"]
    assert fields["method"] == "p2p" and fields["steps"] == 20 and base == Edit.load(EXAMPLE).to_dict()
    (tmp_path / "broken.yaml").write_text("regions: [")
    with pytest.raises(gr.Error) as caught:
        load_file(str(tmp_path / "broken.yaml"), blank, "", "", 0)
    assert_one_line(caught.value, "broken.yaml", "invalid YAML")
    with pytest.raises(gr.Error) as caught:
        set_size(128, 2000, doc)
    assert_one_line(caught.value, "height 2000")
    resized = json.loads(set_size(256, 64, doc)[0])
    assert resized["size"] == [256, 64] and resized["regions"] == json.loads(doc)["regions"]
    page, _, _ = server
    with pytest.raises(gr.Error) as caught:  # an unknown model: a message, and the loaded one stays
        switch_model(page.runner, str(tmp_path))
    assert_one_line(caught.value, "not a diffusers folder", "the current model stays loaded")
    assert page.runner.model is None and page.runner.pipe is not None


def test_runs_write_the_files_of_the_command_line(server, tmp_path):
    """generate, invert + edit, and an edit of the inverted photo, as the page runs them (few steps)."""
    from mrgd.render import read_png_config
    from mrgd.web import jobs
    from mrgd.web.runner import Run

    page, _, _ = server
    pipe = page.runner.pipe
    edit = Edit.from_dict({**json.loads(EXAMPLE.read_text()), "steps": 3})
    (tmp_path / "g").mkdir()
    made = jobs.generate(pipe, Run(), edit, tmp_path / "g")
    assert {p.name for p in made.files} == {"image.png", "layout.json", "info.json"}
    assert read_png_config(tmp_path / "g" / "image.png") == edit.source().to_dict()
    (tmp_path / "i").mkdir()
    inverted = jobs.invert(pipe, Run(), edit, made.source, tmp_path / "i")
    names = {p.name for p in inverted.files}
    assert {"reconstruction.png", "target.png", "grid.png", "edit.json", "inversion.safetensors"} <= names
    assert inverted.inversion.steps == 3 and inverted.picture.width > 3 * 256  # photo | reconstruction | target
    assert "Reconstruction PSNR" in inverted.message and inverted.source is made.source
    with pytest.raises(InputError) as caught:  # the inversion serves this canvas and step count only
        jobs.edit(pipe, Run(), Edit.from_dict({**edit.to_dict(), "steps": 4}), tmp_path, inversion=inverted.inversion)
    assert_one_line(caught.value, "inverted with 3 steps", "set steps to 3")
    (tmp_path / "e").mkdir()
    again = jobs.edit(pipe, Run(), edit, tmp_path / "e", inversion=inverted.inversion, photo=made.source,
                      explain=True)
    assert {"metrics.png", "keywords.json"} <= {p.name for p in again.files} and again.explain


def test_client_edits_loads_and_gets_clear_errors(server, tmp_path):
    from gradio_client import Client, handle_file

    page, url, startup = server
    client = Client(url, verbose=False)
    edit = {**json.loads(EXAMPLE.read_text()), "steps": 4}
    result = client.predict(json.dumps(edit), api_name="/run_edit")
    assert set(result["png"]) == {"source.png", "target.png", "grid.png"}
    with Image.open(io.BytesIO(base64.b64decode(result["png"]["target.png"]))) as target:
        assert target.size == (128, 128)
        assert json.loads(target.text["mrgd"]) == result["edit"] == Edit.from_dict(edit).to_dict()
    assert result["info"]["unet_calls"] > 0 and result["info"]["steps"] == 4
    loaded = client.predict(handle_file(str(EXAMPLE)), json.dumps(state.doc_from_edit(Edit())), "", "", 0,
                            api_name="/load")
    assert [r["id"] for r in json.loads(loaded[0])["regions"]] == ["ground", "ball", "kite", "toy"]
    bad = {**edit, "regions": [{**edit["regions"][1], "box": [0.1, 0.1, 0.0, 0.2]}]}
    with pytest.raises(Exception) as caught:
        client.predict(json.dumps(bad), api_name="/run_edit")
    assert "regions[0].box: width must be > 0" in str(caught.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(Exception) as caught:
        client.predict(handle_file(str(tmp_path / "broken.json")), json.dumps(state.doc_from_edit(Edit())), "", "", 0,
                       api_name="/load")
    assert "broken.json" in str(caught.value) and "invalid JSON" in str(caught.value)
    assert client.predict(json.dumps(edit), api_name="/run_edit")["png"]  # still serving
    assert startup.addresses and startup.beyond_this_machine() == []  # nothing fetched from anywhere


def test_cancelling_a_request_frees_the_device_within_a_step(server):
    import time

    from gradio_client import Client

    page, url, _ = server
    client = Client(url, verbose=False)
    long = {**json.loads(EXAMPLE.read_text()), "steps": 400, "mrgd": {"method": "multidiffusion"}}
    job = client.submit(json.dumps(long), api_name="/run_edit")
    t0 = time.perf_counter()
    while not page.runner.lock.locked() and time.perf_counter() - t0 < 30:
        time.sleep(0.05)
    assert page.runner.lock.locked(), "the run never started"
    time.sleep(0.5)
    job.cancel()
    t0 = time.perf_counter()
    while page.runner.lock.locked() and time.perf_counter() - t0 < 20:
        time.sleep(0.05)
    assert not page.runner.lock.locked(), "the cancelled run kept the device"
    assert time.perf_counter() - t0 < 5  # 400 steps take a minute; a cancelled run stops at its next step
    quick = {**long, "steps": 3}
    assert client.predict(json.dumps(quick), api_name="/run_edit")["info"]["steps"] == 3


def test_twenty_requests_at_once_finish_or_are_refused_and_memory_returns():
    """The load test: `mrgd serve` in its own process, 20 concurrent client requests (benchmarks/web_load.py)."""
    if gradio_missing():
        pytest.skip(gradio_missing())
    spec = importlib.util.spec_from_file_location("web_load", ROOT / "benchmarks" / "web_load.py")
    web_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(web_load)
    port = web_load.free_port()
    server = web_load.start_server(port)
    try:
        url = f"http://127.0.0.1:{port}/"
        web_load.wait_ready(url, server)
        figures = web_load.run_load(url, server.pid, 20)
        assert server.poll() is None, "the server died"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert figures["failed"] == 0, figures["failures"]
    assert figures["finished"] + figures["refused"] == 20
    assert figures["finished"] >= 2 and figures["refused"] >= 1, figures  # the queue is bounded, and serves
    assert all("Queue is full" in message for message in figures["refusal_messages"])
    assert max(figures["queue_places_seen"]) >= 1  # waiting requests were told their place
    assert figures["served_after"]
    assert abs(figures["rss_change"]) <= 0.10, figures
