"""Malformed input for every command and file kind: each case ends with exit 0 and its outputs in place, or exit 2
and one `mrgd: error:` line naming the file or option and the fix; never a traceback, never exit 1, never a
staging folder, never a file outside -o touched.

Edit files (JSON and YAML), WebUI configs, images, inversion files, bench suites, command-line values and paths;
property-based where the input has a structure to mutate, with a fixed seed (derandomize) and bounded example counts
so the suite stays fast: commands run in-process on the tiny random model at 64 px and 2 steps, and most cases are
refused before any model loads. `test_count` checks that at least 200 cases ran.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli

FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    """The suite's settings with a bounded number of examples: fixed seed, no deadline, no example database."""
    return settings(FUZZ, max_examples=examples)


CASES: Counter = Counter()  # kind -> cases run
OUR_LINES = ("mrgd: ", "note: ", "warning: ")
BENCH_LINES = re.compile(r"^(\[\d+/\d+\] |resuming: )")  # bench's own progress lines
# the fix: "...; give ...", "...: use ...", or pydantic's "Input should be ..." naming what is expected
FIX = re.compile(r"[;:] (give|use|add|choose|check|fix|remove|pass|set|save|make|rename|move|convert|free|"
                 r"reinstall|invert|resume|see|name|install|download)\b|should |must |expected ")
LOG = os.environ.get("MRGD_FUZZ_LOG")  # a file to append every error line to, for reading them all

EDIT = {
    "size": [64, 64], "prompt": "masterpiece", "seed": 7, "steps": 2, "mrgd": {"method": "p2p"},
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
        {"id": "kite", "box": [0.5, 0.05, 0.45, 0.4], "prompt": "a blue square", "target_prompt": "a yellow square"},
        {"id": "toy", "box": [0.55, 0.55, 0.4, 0.4], "target_prompt": "a purple star"},
        {"id": "rock", "box": [0.05, 0.05, 0.3, 0.3], "prompt": "an orange triangle", "target_prompt": None},
    ],
}
EDIT_OUTPUTS = {"source.png", "target.png", "grid.png", "edit.json", "info.json"}


# --- the harness --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under `folder` (but `skip`) with a hash of its bytes; a file: its own hash."""
    if folder.is_file():
        return {"": hashlib.sha1(folder.read_bytes()).hexdigest()}
    if not folder.exists():
        return {}
    found = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        found[str(path.relative_to(folder))] = (hashlib.sha1(path.read_bytes()).hexdigest()
                                                if path.is_file() and not path.is_symlink() else "dir")
    return found


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up
        return False


class Cases:
    """A fresh folder per case (the command runs from it), checked before and after."""

    def __init__(self, root: Path, model: Path, capsys):
        self.root, self.model, self.capsys, self.count = root, model, capsys, 0

    def folder(self) -> Path:
        self.count += 1
        folder = self.root / f"case-{self.count}"
        folder.mkdir()
        return folder

    def run(self, kind: str, folder: Path, args: list, names: list[str], out: Path | None = None) -> int:
        """Run `mrgd args` from `folder`; `names` are what the error line may name (the file, the option, ...)."""
        CASES[kind] += 1
        out = out or folder / "out"
        before, model_before = _snapshot(folder, skip=out), _snapshot(self.model)
        out_before = _snapshot(out) if _exists(out) else None
        cwd = os.getcwd()
        os.chdir(folder)  # a stray relative write would land here, and be caught
        try:
            code, _, err = run_cli(self.capsys, *args)
        finally:
            os.chdir(cwd)
        context = f"[{kind}] mrgd {' '.join(map(str, args))}\n{err}"
        lines = err.splitlines()
        assert code in (0, 2), context
        assert "Traceback" not in err, context
        assert [line for line in lines if not line.startswith(OUR_LINES) and not BENCH_LINES.match(line)] == [], context
        if LOG:
            with open(LOG, "a") as log:
                log.write(f"{kind}\t{code}\t{lines[-1] if lines else ''}\n")
        if code == 2:
            errors = [line for line in lines if line.startswith("mrgd: error: ")]
            assert errors == lines[-1:], context  # exactly one error line, the last
            # the file or option, or the field an option sets ("--region-context nan": region_context)
            fields = [str(n).lstrip("-").replace("-", "_") for n in names if str(n).startswith("--")]
            assert any(str(name) in errors[0] for name in [*names, *fields]), context
            assert FIX.search(errors[0]), context
            assert (_snapshot(out) if _exists(out) else None) == out_before, context  # nothing written
        assert _snapshot(folder, skip=out) == before, context  # nothing outside -o touched
        assert _snapshot(self.model) == model_before, context
        assert not [p for p in folder.rglob("*") if "partial" in p.name], context
        assert [p.name for p in self.root.iterdir() if not p.name.startswith("case-")] == [], context
        return code


@pytest.fixture()
def cases(tmp_path, tiny_model_dir, capsys):
    return Cases(tmp_path, tiny_model_dir, capsys)


def _edit_args(cases: Cases, edit_path: Path, *extra) -> list:
    return ["edit", edit_path, "-o", edit_path.parent / "out", "--model", cases.model, "--steps", "2", *extra]


def _check_edit_outputs(code: int, out: Path) -> None:
    if code == 0:
        assert EDIT_OUTPUTS <= {p.name for p in out.iterdir()}


# --- edit files: mutated structure, as JSON and YAML --------------------------------------------------------------

DELETE = object()
NASTY = [None, True, False, 0, -1, 1, 7, 8, 16, 2**64, -(2**70), 0.5, -0.0, 1.0000001, 1e308, float("nan"),
         float("inf"), "", " ", "a", "64", "\n\t", "\u202e\u0000", "x" * 3000, "(word:1e9)", "((((", "[a:b:0.5]",
         [], [0], [64, 64], [0, 0, 1, 1], [1, 1, 1, 1], [0.9, 0.9, 0.5, 0.5], [[1]], {}, {"a": 1},
         "background", "foreground", "mrgd", "step", "spatial"]
REGION_FIELDS = ["id", "kind", "box", "prompt", "target_prompt", "negative_prompt", "keywords", "keyword_count",
                 "feather", "seed", "promt"]
SETTINGS_FIELDS = ["method", "use_total", "schedule", "keywords", "kssa", "kssa_scale", "keyword_steps",
                   "keyword_entropy", "guidance", "lambda_rs", "lambda_ip", "guidance_every", "cross_replace",
                   "self_replace", "total_fraction_attribute", "add_in_source", "lambda"]
PATHS = ([(key,) for key in ["size", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "region_context",
                             "regions", "mrgd", "target", "Size"]]
         + [("size", 0), ("size", 1), ("regions", 0), ("regions", 5)]
         + [("regions", i, f) for i in range(4) for f in REGION_FIELDS]
         + [("regions", 1, "box", j) for j in range(4)]
         + [("mrgd", f) for f in SETTINGS_FIELDS]
         + [("mrgd", "cross_replace", "modified"), ("mrgd", "self_replace", "x")])


def _mutate(data: dict, path: tuple, value) -> None:
    """Set (or delete) `path` in `data`; where the way there is not a container any more, leave it."""
    node = data
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    key = path[-1]
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = copy.deepcopy(value)
    elif isinstance(node, list) and isinstance(key, int):
        if value is DELETE:
            del node[key:key + 1]
        elif key < len(node):
            node[key] = copy.deepcopy(value)
        else:
            node.append(copy.deepcopy(value))


mutations = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from([DELETE, *NASTY])), min_size=1, max_size=3)


@fuzz(70)
@given(changes=mutations, suffix=st.sampled_from([".json", ".yaml", ".yml", ".JSON"]),
       method=st.sampled_from([None, "multidiffusion", "mrgd"]))
def test_edit_files(cases, changes, suffix, method):
    data = copy.deepcopy(EDIT)
    for path, value in changes:
        _mutate(data, path, value)
    folder = cases.folder()
    edit_path = folder / f"edit{suffix}"
    text = (json.dumps(data) if suffix.lower() == ".json"
            else yaml.safe_dump(data, allow_unicode=True))
    edit_path.write_text(text, encoding="utf-8")
    extra = ["--method", method] if method else []
    code = cases.run("edit file", folder, _edit_args(cases, edit_path, *extra), [edit_path.name])
    _check_edit_outputs(code, folder / "out")


RAW = [
    "", " ", "null", "[]", "7", '"text"', "{", '{"regions": [', "{'size': [64, 64]}", '{"size": [64, 64],}',
    '{"size": NaN, "regions": []}', '{"steps": 1' + "0" * 5000 + "}", "[" * 5000 + "]" * 5000, "\ufeff{}",
    '{"regions": [{"id": "a", "box": [0,0,1,1], "prompt": "x", "target_prompt": "y"}], "regions": []}',
    "size: [64, 64]\nregions:\n\t- id: a", "!!python/object/apply:os.system ['echo pwned']",
    "a: &x [*x]", "size: [64, 64]\nsize: [128, 128]\n", "--- a\n--- b\n", "key: 'unterminated",
    "regions:\n  - id: a\n    box: [0, 0, 1, 1]\n    prompt: x\n    target_prompt: y\n" + "    bad: [\n",
]


@fuzz(40)
@given(raw=st.sampled_from(RAW) | st.text(max_size=60), suffix=st.sampled_from([".json", ".yaml"]),
       cut=st.integers(0, 400), junk=st.sampled_from([b"", b"\xff\xfe", b"\x00", b"\xc3("]))
def test_edit_file_text(cases, raw, suffix, cut, junk):
    folder = cases.folder()
    valid = json.dumps(EDIT) if suffix == ".json" else yaml.safe_dump(EDIT)
    # a given text, or a valid file cut short and with bytes that are not UTF-8 spliced in
    body = raw.encode("utf-8") if raw or cut % 2 else valid.encode()[:cut] + junk + valid.encode()[cut:cut + 3]
    (folder / f"edit{suffix}").write_bytes(body)
    code = cases.run("edit file text", folder, _edit_args(cases, folder / f"edit{suffix}"), [f"edit{suffix}"])
    _check_edit_outputs(code, folder / "out")


# --- WebUI region files -------------------------------------------------------------------------------------------

webui_scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6)
                 | st.just([]) | st.just({}))
webui_entries = st.fixed_dictionaries(
    {"blend_mode": st.sampled_from(["Background", "Foreground", "AdditionForeground", "RemovalForeground",
                                    "EditedSource", "EditedTarget", "Other", ""])},
    optional={key: webui_scalars | st.floats(-0.5, 1.5) for key in
              ["enable", "x", "y", "w", "h", "prompt", "neg_prompt", "feather_ratio", "seed", "key_prompt"]},
)
# entries as the WebUI writes them (most of a file imports), among which the malformed ones
webui_good = st.fixed_dictionaries({
    "enable": st.booleans(), "blend_mode": st.sampled_from(["Background", "Foreground", "AdditionForeground",
                                                             "RemovalForeground", "EditedSource", "EditedTarget"]),
    "x": st.floats(-0.2, 1.1), "y": st.floats(-0.2, 1.1), "w": st.floats(0, 1), "h": st.floats(0, 1),
    "prompt": st.sampled_from(["a cat", "", "(red:1.3) car", "a dog"]), "seed": st.integers(-1, 9),
    "feather_ratio": st.floats(0, 1), "key_prompt": st.sampled_from(["", "cat, red", ","]),
})
webui_values = st.sampled_from(["512", "0", "-8", "7", "abc", "1e3", "99999", "", "64"])


@fuzz(50)
@given(controls=st.lists(webui_good | webui_good | webui_entries | webui_scalars, max_size=5) | webui_scalars,
       wrap=st.sampled_from(["bbox_controls"] * 5 + ["controls", "list", "text"]),
       size=st.none() | st.just(("64", "64")) | st.tuples(webui_values, webui_values),
       seed=st.none() | st.just("3") | webui_values,
       out_name=st.sampled_from(["edit.json", "edit.yaml", "edit.json", "edit.yaml", "edit.txt", "sub/dir/edit.json",
                                 "."]))
def test_webui_configs(cases, controls, wrap, size, seed, out_name):
    folder = cases.folder()
    data = {"bbox_controls": {"bbox_controls": controls}, "list": controls,
            "controls": {"controls": controls}}.get(wrap)  # as the WebUI writes it, a bare list, another key
    text = json.dumps(data) if wrap != "text" else json.dumps({"bbox_controls": controls})[:-3]
    (folder / "config.json").write_text(text)
    out = folder / out_name
    args = ["import-webui", folder / "config.json", "-o", out, "--prompt", "best quality"]
    args += ["--size", *size] if size else []
    args += ["--seed", seed] if seed is not None else []
    written = folder / out_name.split("/")[0] if out_name != "." else folder / "never"  # with the folders made for it
    code = cases.run("webui config", folder, args,
                     ["config.json", "bbox_controls", "--size", "--seed", "-o", "size", out.name], out=written)
    if code == 0:
        from mrgd.layout import Edit

        Edit.load(out)  # what it wrote reads back


# --- images -------------------------------------------------------------------------------------------------------


def _png16_rgb() -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL writes none)."""
    raw = b"".join(b"\x00" + bytes([0x9c, 0x40] * 3 * 80) for _ in range(80))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 80, 80, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _bomb() -> bytes:
    """A PNG header claiming 40000 x 40000 pixels, and no pixels."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + ihdr


def _image(mode: str, size=(80, 80), fmt="PNG", **kw) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new(mode, size, **kw).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = {
    "empty.png": lambda: b"",
    "text.png": lambda: b"hello, I am not a picture",
    "truncated.png": lambda: _image("RGB")[:60],
    "truncated.jpg": lambda: _image("RGB", fmt="JPEG")[:200],
    "badcrc.png": lambda: _image("RGB")[:30] + b"\x00\x00" + _image("RGB")[32:],
    "bomb.png": _bomb,
    "dot.png": lambda: _image("RGB", (1, 1)),
    "sliver.png": lambda: _image("RGB", (300, 15)),
    "cmyk.tiff": lambda: _image("CMYK", fmt="TIFF"),
    "grey16.png": lambda: _image("I;16"),
    "rgb16.png": _png16_rgb,
    "alpha.png": lambda: _image("RGBA", color=(0, 0, 0, 0)),
    "palette.gif": lambda: _image("P"),
    "bilevel.png": lambda: _image("1"),
    "float.tiff": lambda: _image("F", fmt="TIFF"),
    "lab.tiff": lambda: _image("LAB", fmt="TIFF"),
    "wide.jpg": lambda: _image("RGB", (400, 60), fmt="JPEG"),
    "svg.png": lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>",
}


@pytest.mark.parametrize("name", list(IMAGES) + ["missing.png", "folder.png"])
def test_images(cases, name):
    folder = cases.folder()
    if name == "folder.png":
        (folder / name).mkdir()
    elif name in IMAGES:
        (folder / name).write_bytes(IMAGES[name]())
    (folder / "edit.json").write_text(json.dumps(EDIT))
    args = ["invert", folder / name, folder / "edit.json", "-o", folder / "out", "--model", cases.model,
            "--steps", "2", "--inner-steps", "1", "--min-psnr", "0"]
    code = cases.run("image", folder, args, [name])
    if code == 0:
        assert {"reconstruction.png", "inversion.safetensors"} <= {p.name for p in (folder / "out").iterdir()}


# --- inversion files (--from-inversion) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inversion_files(tiny_model_dir, tmp_path_factory):
    """Real inversion.safetensors files of EDIT (2 steps), per inversion method: (path, tensors, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mrgd.inversion import invert, load_image
    from mrgd.layout import Edit
    from mrgd.models import load_pipeline

    folder = tmp_path_factory.mktemp("inversion")
    Image.new("RGB", (64, 64), (40, 160, 60)).save(folder / "photo.png")
    edit = Edit.from_dict(EDIT)
    pipe = load_pipeline(str(tiny_model_dir))
    files = {}
    for method in ("direct", "null-text"):
        path = folder / f"{method}.safetensors"
        invert(pipe, load_image(folder / "photo.png", edit.size)[0], edit, inner_steps=1, method=method)[0].save(path)
        with safe_open(str(path), "pt") as opened:
            files[method] = (path, load_file(path), opened.metadata() or {})
    return files


def _inversion_variant(tensors: dict, variant: str) -> tuple[dict, dict]:
    """(tensors, metadata changes) of one corruption; "held" is the first tensor beside z_T (a null or the pivots)."""
    import torch

    z = tensors["z_T"]
    held = next(k for k in tensors if k != "z_T")
    replace = {
        "no z_T": {"z_T": None},
        "z_T of another size": {"z_T": torch.zeros(1, 4, 3, 5)},
        "z_T with 3 channels": {"z_T": z[:, :3]},
        "z_T flat": {"z_T": z.flatten()},
        "z_T of integers": {"z_T": z.to(torch.int32)},
        "z_T half": {"z_T": z.half()},
        "z_T not finite": {"z_T": torch.full_like(z, float("nan"))},
        "held tensor missing": {held: None},
        "held tensor narrower": {held: tensors[held][..., :3]},
        "held tensor of one step": {held: tensors[held][:1]},
        "held tensor not finite": {held: torch.full_like(tensors[held], float("inf"))},
    }.get(variant, {})
    metadata = {
        "size metadata garbage": {"size": "sixty-four"},
        "size metadata 3d": {"size": "64x64x3"},
        "size metadata other": {"size": "128x128"},
        "region_context garbage": {"region_context": "wide"},
        "losses garbage": {"losses": "a,b,c"},
        "method unknown": {"method": "magic"},
        "method swapped": {"method": "negative-prompt"},
    }.get(variant, {})
    chosen = {k: v for k, v in {**tensors, **replace}.items() if v is not None}
    return chosen, metadata


TENSOR_VARIANTS = ["no z_T", "z_T of another size", "z_T with 3 channels", "z_T flat", "z_T of integers", "z_T half",
                   "z_T not finite", "held tensor missing", "held tensor narrower", "held tensor of one step",
                   "held tensor not finite", "size metadata garbage", "size metadata 3d", "size metadata other",
                   "region_context garbage", "losses garbage", "method unknown", "method swapped", "valid"]
FILE_VARIANTS = ["random bytes", "cut short", "empty", "a folder"]


@pytest.mark.parametrize(("method", "variant"), [(m, v) for m in ("direct", "null-text") for v in TENSOR_VARIANTS]
                         + [("direct", v) for v in FILE_VARIANTS])
def test_inversion_files(cases, inversion_files, method, variant):
    from safetensors.torch import save_file

    path, tensors, metadata = inversion_files[method]
    folder = cases.folder()
    target = folder / "inversion.safetensors"
    (folder / "edit.json").write_text(json.dumps(EDIT))
    if variant == "valid":
        target.write_bytes(path.read_bytes())
    elif variant == "random bytes":
        target.write_bytes(os.urandom(256))
    elif variant == "cut short":
        target.write_bytes(path.read_bytes()[:300])
    elif variant == "empty":
        target.write_bytes(b"")
    elif variant == "a folder":
        target.mkdir()
    else:
        chosen, changed = _inversion_variant(tensors, variant)
        save_file({k: v.contiguous() for k, v in chosen.items()}, str(target), metadata={**metadata, **changed})
    args = _edit_args(cases, folder / "edit.json", "--from-inversion", target, "--method", "p2p")
    code = cases.run("inversion file", folder, args, ["--from-inversion", "inversion.safetensors"])
    _check_edit_outputs(code, folder / "out")
    if variant == "valid":
        assert code == 0


# --- bench suites -------------------------------------------------------------------------------------------------

PAIR = {**EDIT, "regions": EDIT["regions"][:2]}
SAME = {**EDIT, "regions": EDIT["regions"][:1]}  # changes nothing


def _suite(folder: Path, listing, files: dict) -> Path:
    suite = folder / "suite"
    suite.mkdir()
    for name, content in files.items():
        path = suite / name
        if content is None:
            path.mkdir()
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    if listing is not None:
        (suite / "suite.json").write_text(listing if isinstance(listing, str) else json.dumps(listing))
    return suite


SUITES = {
    "not JSON": ("[{", {"a.json": PAIR}),
    "an object": ({"file": "a.json"}, {"a.json": PAIR}),
    "empty list": ([], {"a.json": PAIR}),
    "entry without file": ([{"task": "add"}], {"a.json": PAIR}),
    "file not text": ([{"file": 3}], {"a.json": PAIR}),
    "missing file": ([{"file": "nope.json"}], {}),
    "file is a folder": ([{"file": "d.json"}], {"d.json": None}),
    "file outside": ([{"file": "../elsewhere.json"}], {}),
    "bad edit": ([{"file": "a.json"}], {"a.json": {**PAIR, "size": [63, 64]}}),
    "nothing changes": ([{"file": "a.json"}], {"a.json": SAME}),
    "nothing changes, task given": ([{"file": "a.json", "task": "attribute"}], {"a.json": SAME}),
    "same name twice": ([{"file": "a.json"}, {"file": "sub/a.json"}], {"a.json": PAIR, "sub": None}),
    "no listing, no files": (None, {"notes.txt": "hello"}),
    "no listing, a bad file": (None, {"a.json": PAIR, "b.yaml": "regions: ["}),
    "odd task and description": ([{"file": "a.json", "task": 7, "description": ["x"]}], {"a.json": PAIR}),
    "valid": ([{"file": "a.json", "task": "attribute"}], {"a.json": PAIR}),
    "valid, no listing": (None, {"a.json": PAIR}),
}
BENCH_OPTIONS = [[], ["--limit", "0"], ["--limit", "-3"], ["--methods", ""], ["--methods", "p2p,nope"],
                 ["--methods", ",,"], ["--steps", "0"], ["--scorer", "/nonexistent/clip"], ["--dtype", "int8"],
                 ["--device", "tpu"], ["--guidance-model", "/nonexistent/seg"]]


@pytest.mark.parametrize("name", list(SUITES))
def test_bench_suites(cases, name):
    folder = cases.folder()
    if name == "file outside":
        (folder / "elsewhere.json").write_text(json.dumps(PAIR))
    if name == "same name twice":
        (folder / "x").mkdir()
    listing, files = SUITES[name]
    suite = _suite(folder, listing, files)
    if name == "same name twice":
        (suite / "sub" / "a.json").write_text(json.dumps(PAIR))
    args = ["bench", suite, "-o", folder / "out", "--model", cases.model, "--steps", "2", "--methods", "multidiffusion"]
    code = cases.run("bench suite", folder, args, ["suite", "SUITE", ".json", ".yaml"])
    if name.startswith("valid"):
        assert code == 0 and (folder / "out" / "results.md").exists()


@pytest.mark.parametrize("options", BENCH_OPTIONS[1:], ids=lambda o: " ".join(o))
def test_bench_options(cases, options):
    folder = cases.folder()
    suite = _suite(folder, [{"file": "a.json"}], {"a.json": PAIR})
    args = ["bench", suite, "-o", folder / "out", "--model", cases.model, "--steps", "2", *options]
    cases.run("bench option", folder, args, [options[0]])


# --- command-line values ------------------------------------------------------------------------------------------

VALUES = ["", " ", "-1", "0", "1", "2", "0.5", "nan", "inf", "-inf", "1e309", "99999999999999999999", "abc", "1.5",
          "--", "-o", "\u0663", "1_000", "0x10", "True"]
OPTIONS = {
    "edit": ["--seed", "--steps", "--region-context", "--method", "--keywords", "--keyword-entropy", "--lambda-rs",
             "--lambda-is", "--lambda-ip", "--guidance-every", "--guidance-precision", "--guidance-picture", "--dtype", "--device",
             "--guidance-model", "--prediction-type"],
    "generate": ["--seed", "--steps", "--region-context", "--dtype", "--device"],
    "invert": ["--steps", "--method", "--inner-steps", "--min-psnr", "--region-context"],
    "import-webui": ["--seed", "--prompt", "--negative-prompt"],
    "train-toy": ["--stages", "--threads", "--minutes"],
}


def _accepted_by_train_toy(option: str, value: str) -> bool:
    """Whether train-toy would take this value and start training (as the command line parses numbers)."""
    try:
        return int(value) >= 1 if option == "--threads" else float(value) > 0 if option == "--minutes" else False
    except ValueError:
        return False


@fuzz(70)
@given(data=st.data())
def test_command_line_values(cases, data):
    command = data.draw(st.sampled_from(list(OPTIONS)))
    chosen = data.draw(st.lists(st.sampled_from(OPTIONS[command]), min_size=1, max_size=2, unique=True))
    values = [data.draw(st.sampled_from(VALUES)) for _ in chosen]
    if command == "train-toy" and all(_accepted_by_train_toy(o, v) for o, v in zip(chosen, values)):
        values[0] = "-1"  # a valid training run takes hours: keep one value invalid (train-toy checks them first)
    folder = cases.folder()
    edit_path = folder / "edit.json"
    layout = {**EDIT, "regions": EDIT["regions"][:1]}
    edit_path.write_text(json.dumps(EDIT if command != "generate" else layout))
    Image.new("RGB", (64, 64), "green").save(folder / "photo.png")
    (folder / "config.json").write_text(json.dumps({"bbox_controls": [
        {"x": 0, "y": 0, "w": 1, "h": 1, "prompt": "sky", "blend_mode": "Background"}]}))
    base = {
        "edit": ["edit", edit_path, "--model", cases.model, "--steps", "2"],
        "generate": ["generate", edit_path, "--model", cases.model, "--steps", "2"],
        "invert": ["invert", folder / "photo.png", edit_path, "--model", cases.model, "--inner-steps", "1",
                   "--min-psnr", "0"],
        "import-webui": ["import-webui", folder / "config.json", "--size", "64", "64"],
        "train-toy": ["train-toy", "--stages", "data"],
    }[command]
    out = folder / ("out.json" if command == "import-webui" else "out")
    options = [item for option, value in zip(chosen, values) for item in (option, value)]
    if command == "invert" and "--steps" not in chosen:
        options += ["--steps", "2"]
    code = cases.run("command-line value", folder, [*base, *options, "-o", out], [*chosen, "Invalid value", "-o"],
                     out=out)
    assert not (command == "train-toy" and code == 0)


# --- paths --------------------------------------------------------------------------------------------------------


def _path_case(folder: Path, name: str, model: Path) -> tuple[list, list]:
    """(args, names the error may give) of one path case."""
    edit_path = folder / "edit.json"
    edit_path.write_text(json.dumps(EDIT))
    out = folder / "out"
    run = ["--model", model, "--steps", "2"]
    if name == "edit file is a folder":
        (folder / "dir.json").mkdir()
        return ["edit", folder / "dir.json", "-o", out, *run], ["dir.json"]
    if name == "edit file missing":
        return ["edit", folder / "none.json", "-o", out, *run], ["none.json"]
    if name == "edit file without suffix":
        (folder / "edit").write_text(json.dumps(EDIT))
        return ["edit", folder / "edit", "-o", out, *run], ["edit"]
    if name == "edit file name too long":
        return ["edit", folder / ("e" * 300 + ".json"), "-o", out, *run], ["eeee"]
    if name == "edit file is a link loop":
        (folder / "loop.json").symlink_to(folder / "loop.json")
        return ["edit", folder / "loop.json", "-o", out, *run], ["loop.json"]
    if name == "edit file is a broken link":
        (folder / "gone.json").symlink_to(folder / "nowhere.json")
        return ["edit", folder / "gone.json", "-o", out, *run], ["gone.json"]
    if name == "edit file name with a newline":
        (folder / "two\nlines.json").write_text(json.dumps({**EDIT, "size": [1, 1]}))
        return ["edit", folder / "two\nlines.json", "-o", out, *run], ["two lines.json"]
    if name == "-o is a file":
        (folder / "taken").write_text("mine")
        return ["edit", edit_path, "-o", folder / "taken", *run], ["-o"]
    if name == "-o under a file":
        (folder / "taken").write_text("mine")
        return ["edit", edit_path, "-o", folder / "taken" / "out", *run], ["-o"]
    if name == "-o name too long":
        return ["edit", edit_path, "-o", folder / ("o" * 300), *run], ["-o"]
    if name == "-o in /proc":
        return ["edit", edit_path, "-o", "/proc/mrgd-fuzz/out", *run], ["-o"]
    if name == "-o holds a result, no --force":
        out.mkdir()
        (out / "grid.png").write_text("mine")
        return ["edit", edit_path, "-o", out, *run], ["-o"]
    if name == "-o holds a folder named like a result, --force":
        (out / "grid.png").mkdir(parents=True)
        return ["edit", edit_path, "-o", out, "--force", *run], ["-o"]
    if name == "--model is a text file":
        (folder / "model.txt").write_text("weights")
        return ["edit", edit_path, "-o", out, "--model", folder / "model.txt", "--steps", "2"], ["--model"]
    if name == "--model is an empty folder":
        (folder / "model").mkdir()
        return ["edit", edit_path, "-o", out, "--model", folder / "model", "--steps", "2"], ["--model"]
    if name == "--model has a broken model_index.json":
        (folder / "model").mkdir()
        (folder / "model" / "model_index.json").write_text("{")
        return ["edit", edit_path, "-o", out, "--model", folder / "model", "--steps", "2"], ["--model"]
    if name == "--model lacks its weights":
        (folder / "model").mkdir()
        (folder / "model" / "model_index.json").write_bytes((model / "model_index.json").read_bytes())
        return ["edit", edit_path, "-o", out, "--model", folder / "model", "--steps", "2"], ["--model"]
    if name == "--model is a garbage .safetensors":
        (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        return ["edit", edit_path, "-o", out, "--model", folder / "model.safetensors", "--steps", "2"], ["--model"]
    if name == "--model is a pickle":
        (folder / "model.ckpt").write_bytes(b"not really")
        return ["edit", edit_path, "-o", out, "--model", folder / "model.ckpt", "--steps", "2"], ["--model"]
    if name == "--model is a path that does not exist":
        return ["edit", edit_path, "-o", out, "--model", folder / "no" / "model", "--steps", "2"], ["--model"]
    if name == "--guidance-model is an empty folder":
        (folder / "seg").mkdir()
        return ["edit", edit_path, "-o", out, "--method", "mrgd", "--guidance-model", folder / "seg", *run], \
            ["--guidance-model"]
    if name == "IMAGE is the edit file":
        return ["invert", edit_path, edit_path, "-o", out, *run], ["IMAGE"]
    if name == "import-webui -o is a file name too long":
        (folder / "config.json").write_text(json.dumps({"bbox_controls": []}))
        return ["import-webui", folder / "config.json", "-o", folder / ("w" * 300 + ".json")], ["-o"]
    raise AssertionError(name)


PATH_CASES = ["edit file is a folder", "edit file missing", "edit file without suffix", "edit file name too long",
              "edit file is a link loop", "edit file is a broken link", "edit file name with a newline",
              "-o is a file", "-o under a file", "-o name too long", "-o in /proc", "-o holds a result, no --force",
              "-o holds a folder named like a result, --force", "--model is a text file",
              "--model is an empty folder", "--model has a broken model_index.json", "--model lacks its weights",
              "--model is a garbage .safetensors", "--model is a pickle", "--model is a path that does not exist",
              "--guidance-model is an empty folder", "IMAGE is the edit file",
              "import-webui -o is a file name too long"]


@pytest.mark.parametrize("name", PATH_CASES)
def test_paths(cases, name):
    if name == "-o in /proc" and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    folder = cases.folder()
    args, names = _path_case(folder, name, cases.model)
    out = Path(args[args.index("-o") + 1])
    code = cases.run("path", folder, args, names, out=out if out.is_relative_to(folder) else folder / "out")
    assert code == 2, name


def test_count():
    """The number of cases, per kind; at least 200 in a full run of this file."""
    total = sum(CASES.values())
    print(f"\nfuzz cases: {total} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")
    if len(CASES) < 8:
        pytest.skip(f"only part of the fuzz suite ran ({total} cases)")
    assert total >= 200, CASES
