"""Files nobody here wrote and a user's first runs: WebUI pairs with entries between, edits that change nothing,
outputs that cannot be written, odd images, a quiet terminal, --deterministic."""

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import THREE_REGION_EDIT
from conftest import run_cli as run
from mrgd.errors import InputError
from mrgd.inversion import load_image

ROOT = Path(__file__).resolve().parents[1]
MRGD = Path(sys.executable).with_name("mrgd")
OUR_PREFIXES = ("mrgd:", "note:", "warning:")


def webui_entry(mode, prompt, x=0.1, y=0.1, w=0.3, h=0.3):
    return {"enable": True, "x": x, "y": y, "w": w, "h": h, "prompt": prompt, "neg_prompt": "", "blend_mode": mode,
            "feather_ratio": 0.2, "seed": -1, "key_prompt": ""}


@pytest.fixture()
def edit_file(tmp_path):
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(THREE_REGION_EDIT))
    return path


def leftovers(folder: Path) -> list[str]:
    """Staging folders anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*partial*")]


# --- the research code's region configs ---------------------------------------------------------------------------


def test_import_webui_pairs_an_edit_across_a_foreground_entry(capsys, tmp_path):
    config = {"bbox_controls": [webui_entry("Background", "grass", 0, 0, 1, 1),
                                webui_entry("EditedSource", "a red car", 0.1, 0.5),
                                webui_entry("Foreground", "a tree", 0.6, 0.1),
                                webui_entry("EditedTarget", "a blue car", 0.1, 0.5, 0.35)]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "import-webui", tmp_path / "config.json", "--size", "256", "256",
                         "-o", tmp_path / "edit.yaml")
    assert code == 0, err
    from mrgd.layout import Edit

    edit = Edit.load(tmp_path / "edit.yaml")
    assert edit.roles() == {"background-0": "inherent", "edit-1": "modified", "fg-2": "inherent"}
    assert edit.regions_by_id()["edit-1"].target_prompt == "a blue car"
    # the EditedTarget's box is wider: said in one line naming both entries
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "bbox_controls[1]" in lines[0] and "bbox_controls[3]" in lines[0] and "differ" in lines[0]


def test_import_webui_never_replaces_a_folder_and_writes_whole_files(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"bbox_controls": [webui_entry("Foreground", "a cat")]}))
    (tmp_path / "folder").mkdir()
    code, _, err = run(capsys, "import-webui", tmp_path / "config.json", "-o", tmp_path / "folder", "--force")
    assert code == 2 and "is a folder" in err and (tmp_path / "folder").is_dir()
    code, _, err = run(capsys, "import-webui", tmp_path / "config.json", "-o", tmp_path / "edit.txt")
    assert code == 2 and ".json, .yaml or .yml" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "folder"]


# --- an edit that changes nothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("regions", [[], [r for r in THREE_REGION_EDIT["regions"] if "target_prompt" not in r]])
def test_an_edit_with_nothing_to_edit_is_refused(capsys, tmp_path, tiny_model_dir, regions):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({**THREE_REGION_EDIT, "regions": regions}))
    Image.new("RGB", (64, 64), "green").save(tmp_path / "photo.png")
    for args in (["edit", path], ["invert", tmp_path / "photo.png", path]):
        code, _, err = run(capsys, *args, "-o", tmp_path / "out", "--model", tiny_model_dir)
        assert code == 2 and err.count("\n") == 1, err
        assert "no region changes: give a region a target_prompt, or use mrgd generate" in err
        assert not (tmp_path / "out").exists()


def test_the_library_still_runs_an_edit_that_changes_nothing(tiny_pipe):
    from mrgd.layout import Edit

    # `generate` is such an edit; only the command line refuses one
    layout = Edit.from_dict({**THREE_REGION_EDIT, "steps": 2,
                             "regions": [r for r in THREE_REGION_EDIT["regions"] if "target_prompt" not in r]})
    result = tiny_pipe.edit(layout)
    assert result.source.size == result.target.size == (64, 64)


# --- outputs that cannot be written --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("out", ["/proc/mrgd-out", "/proc/mrgd-new/deep/out"])
def test_an_output_folder_that_cannot_be_made_is_exit_2(capsys, edit_file, tiny_model_dir, out):
    code, _, err = run(capsys, "edit", edit_file, "-o", out, "--model", tiny_model_dir)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mrgd: error: -o: cannot write {out} (") and "choose a folder you can write to" in err


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_leaves_nothing_behind(capsys, monkeypatch, tmp_path, edit_file, tiny_model_dir, existing):
    import mrgd.render

    real_save = mrgd.render.save_png
    saved = []

    def save_then_fill_the_disk(image, path, *args, **kwargs):
        if saved:  # the second picture finds the disk full, half-way through
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(mrgd.render, "save_png", save_then_fill_the_disk)
    out = tmp_path / "new" / "deeper" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "source.png").write_bytes(b"precious")
    code, _, err = run(capsys, "edit", edit_file, "-o", out, "--model", tiny_model_dir, "--force")
    assert code == 2 and "No space left on device" in err and f"-o: cannot write {out}" in err
    assert leftovers(tmp_path) == []
    if existing:  # the user's files are as they were
        assert sorted(p.name for p in out.iterdir()) == ["source.png"]
        assert (out / "source.png").read_bytes() == b"precious"
    else:  # not even the folders made on the way
        assert not (tmp_path / "new").exists()


def test_a_move_that_fails_half_way_puts_the_old_files_back(capsys, monkeypatch, tmp_path, edit_file, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("source.png", "target.png", "notes.txt"):
        (out / name).write_text(f"old {name}")
    real_replace = Path.replace
    failed = []

    def replace(self, target):
        if Path(target).name == "target.png" and self.parent.name.startswith(".mrgd-partial") and not failed:
            failed.append(self)  # moving the new target.png in fails, once
            raise OSError(errno.EIO, "Input/output error", str(target))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    code, _, err = run(capsys, "edit", edit_file, "-o", out, "--model", tiny_model_dir, "--force")
    assert code == 2 and "Input/output error" in err
    old = {name: f"old {name}" for name in ("source.png", "target.png", "notes.txt")}
    assert {p.name: p.read_text() for p in out.iterdir()} == old


def test_an_existing_output_folder_is_staged_inside_it(capsys, tmp_path, edit_file, tiny_model_dir, monkeypatch):
    # so the final moves never cross file systems (-o a mount point), and a read-only parent does not matter
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    import mrgd.render

    stages = []
    real_save = mrgd.render.save_png
    monkeypatch.setattr(mrgd.render, "save_png", lambda image, path, *a, **k: (stages.append(Path(path).parent),
                                                                                real_save(image, path, *a, **k)))
    code, _, err = run(capsys, "edit", edit_file, "-o", out, "--model", tiny_model_dir)
    assert code == 0, err
    assert {s.parent for s in stages} == {out} and leftovers(tmp_path) == []
    assert sorted(p.name for p in out.iterdir()) == ["edit.json", "grid.png", "info.json", "keep.txt", "source.png",
                                                     "target.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_exit_2(capsys, tmp_path, edit_file, tiny_model_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(capsys, "edit", edit_file, "-o", locked / "out", "--model", tiny_model_dir)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "Permission denied" in err and list(locked.iterdir()) == []


# --- images from the wild -----------------------------------------------------------------------------------------


def test_an_image_far_smaller_than_the_edit_is_refused(capsys, tmp_path, tiny_model_dir):
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    edit = {**THREE_REGION_EDIT, "size": [128, 128]}
    (tmp_path / "edit.json").write_text(json.dumps(edit))
    code, _, err = run(capsys, "invert", tmp_path / "dot.png", tmp_path / "edit.json", "-o", tmp_path / "out",
                       "--model", tiny_model_dir)
    assert code == 2 and err.count("\n") == 1
    assert "dot.png is 1x1" in err and "128x128" in err and "at least 32x32" in err
    assert not (tmp_path / "out").exists()
    Image.new("RGB", (32, 200), "red").save(tmp_path / "thin.png")  # a quarter of the width: still fine
    assert load_image(tmp_path / "thin.png", (128, 128))[0].size == (128, 128)
    with pytest.raises(InputError, match="31x200"):
        Image.new("RGB", (31, 200), "red").save(tmp_path / "thinner.png")
        load_image(tmp_path / "thinner.png", (128, 128))


def _grey16(value: int) -> Image.Image:
    image = Image.new("I;16", (64, 64))
    image.putdata([value] * 64 * 64)
    return image


@pytest.mark.parametrize(("make", "suffix", "rgb", "said"), [
    (lambda: _grey16(40000), ".png", (156, 156, 156), "16-bit greyscale"),  # PIL's convert() would say 255
    (lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 0)), ".png", (255, 255, 255), "transparency"),
    (lambda: Image.new("LA", (64, 64), (0, 0)), ".png", (255, 255, 255), "transparency"),
    (lambda: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), ".tiff", (255, 0, 0), "CMYK"),
    (lambda: Image.new("L", (64, 64), 200), ".png", (200, 200, 200), "greyscale"),
    (lambda: Image.new("RGB", (64, 64), (10, 20, 30)).quantize(4), ".png", (10, 20, 30), "palette"),
    (lambda: Image.new("LAB", (64, 64), (0, 128, 128)), ".tiff", (1, 0, 1), "LAB"),  # black, not (0, 128, 128)
])
def test_odd_colour_modes_are_converted_with_a_note(tmp_path, make, suffix, rgb, said):
    path = tmp_path / f"picture{suffix}"
    make().save(path)
    image, note = load_image(path, (64, 64))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert tuple(int(v) for v in np.asarray(image)[5, 5]) == rgb
    assert note.startswith(f"picture{suffix}: ") and said in note and len(note.splitlines()) == 1


def test_a_plain_rgb_image_of_the_right_size_needs_no_note(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    assert load_image(tmp_path / "red.png", (64, 64))[1] is None
    Image.new("RGBA", (64, 64), (255, 0, 0, 255)).save(tmp_path / "opaque.png")  # an alpha channel hiding nothing
    image, note = load_image(tmp_path / "opaque.png", (64, 64))
    assert note is None and tuple(np.asarray(image)[0, 0]) == (255, 0, 0)


def test_exif_rotation_and_frames(tmp_path):
    picture = Image.new("RGB", (64, 32), "red")
    exif = picture.getexif()
    exif[0x0112] = 6  # stored sideways: "rotate 90° clockwise to view"
    picture.save(tmp_path / "phone.jpg", exif=exif)
    image, note = load_image(tmp_path / "phone.jpg", (32, 64))
    assert image.size == (32, 64) and "EXIF orientation" in note and "resized" not in note
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image, note = load_image(tmp_path / "anim.gif", (64, 64))
    assert "first of its 2 frames" in note and np.asarray(image)[0, 0, 0] > 200


def test_invert_says_what_it_converted(capsys, tmp_path, tiny_model_dir):
    Image.new("RGBA", (96, 64), (0, 0, 255, 128)).save(tmp_path / "glass.png")
    edit = {"size": [64, 64], "steps": 2, "mrgd": {"method": "p2p"}, "regions": [
        {"id": "all", "kind": "background", "box": [0, 0, 1, 1], "prompt": "sky", "target_prompt": "grass"}]}
    (tmp_path / "edit.json").write_text(json.dumps(edit))
    code, _, err = run(capsys, "invert", tmp_path / "glass.png", tmp_path / "edit.json", "-o", tmp_path / "out",
                       "--model", tiny_model_dir, "--inner-steps", "1", "--min-psnr", "0")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "transparency" in notes[0] and "centre-cropped" in notes[0]


# --- a quiet terminal ---------------------------------------------------------------------------------------------


def test_library_output_is_quiet_unless_verbose():
    import logging

    import transformers

    from mrgd.runtime import library_output

    library_logger = logging.getLogger("transformers.models")
    env = dict(os.environ)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_output(verbose=False):
            assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
            assert not transformers.utils.logging.is_progress_bar_enabled()
            assert not library_logger.isEnabledFor(logging.WARNING) and library_logger.isEnabledFor(logging.ERROR)
            warnings.warn("`torch_dtype` is deprecated", FutureWarning)
        assert caught == []
        with library_output(verbose=True):
            assert transformers.utils.logging.is_progress_bar_enabled()
            assert library_logger.isEnabledFor(logging.WARNING)
            warnings.warn("`torch_dtype` is deprecated", FutureWarning)
        assert len(caught) == 1
    assert dict(os.environ) == env  # the environment is handed back as it was


def _fresh_env() -> dict:
    """The environment of a user's shell: none of the switches a command sets for itself."""
    skip = {"TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "MRGD_DEBUG",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS", "PYTHONWARNINGS"}
    return {**{k: v for k, v in os.environ.items() if k not in skip}, "OMP_NUM_THREADS": "1"}


def test_a_command_prints_our_lines_only(tmp_path):
    # a fresh process, so import-time warnings show; the embedded model, as a new user runs it
    done = subprocess.run([str(MRGD), "edit", str(ROOT / "examples" / "three_regions.json"), "-o", str(tmp_path / "x"),
                           "--steps", "2"], capture_output=True, text=True, env=_fresh_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    foreign = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(OUR_PREFIXES)]
    assert foreign == [], done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'x'}/source.png")


def test_verbose_lets_the_libraries_speak(capsys, monkeypatch, recwarn, tmp_path, tiny_model_dir, edit_file):
    import mrgd.runtime

    real_settle = mrgd.runtime.settle_libraries

    def settle(load=False):  # a deprecation warning of our own making stands in for the libraries'
        warnings.warn("library chatter", FutureWarning)
        real_settle(load)

    monkeypatch.setattr(mrgd.runtime, "settle_libraries", settle)
    common = ["edit", edit_file, "--model", tiny_model_dir, "--steps", "2", "--force", "-o", tmp_path / "o"]
    assert run(capsys, *common)[0] == 0
    assert not [w for w in recwarn if "library chatter" in str(w.message)]
    assert run(capsys, "--verbose", *common)[0] == 0
    assert [w for w in recwarn if "library chatter" in str(w.message)]


# --- --deterministic ----------------------------------------------------------------------------------------------


def test_deterministic_is_applied_for_the_command_and_undone_after(capsys, monkeypatch, tmp_path, edit_file,
                                                                   tiny_model_dir):
    import torch

    import mrgd.render

    seen = []
    real_save = mrgd.render.save_png

    def save(image, path, *args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(mrgd.render, "save_png", save)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    code, _, err = run(capsys, "edit", edit_file, "-o", tmp_path / "d", "--model", tiny_model_dir, "--steps", "3",
                       "--method", "mrgd", "--keywords", "2", "--deterministic")
    assert code == 0, err
    assert set(seen) == {(True, ":4096:8")}
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seen.clear()
    code, _, err = run(capsys, "edit", edit_file, "-o", tmp_path / "n", "--model", tiny_model_dir, "--steps", "3",
                       "--method", "mrgd", "--keywords", "2")
    assert code == 0 and set(seen) == {(False, None)}
    for name in ("source.png", "target.png"):  # on a CPU the same bytes either way
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "n" / name).read_bytes()
