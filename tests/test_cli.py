"""The command line end to end on the tiny model: outputs, metadata, determinism, bad input."""

import json

import pytest
from PIL import Image

from conftest import THREE_REGION_EDIT
from conftest import run_cli as run
from mrgd.render import read_png_config


@pytest.fixture()
def edit_file(tmp_path):
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(THREE_REGION_EDIT))
    return path


def test_edit_writes_outputs_with_metadata_and_is_deterministic(capsys, tmp_path, edit_file, tiny_model_dir):
    code, out, err = run(capsys, "edit", edit_file, "-o", tmp_path / "a", "--model", tiny_model_dir, "--method", "p2p")
    assert code == 0, err
    assert "UNet calls" in out
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert names == {"source.png", "target.png", "grid.png", "edit.json", "info.json"}
    config = read_png_config(tmp_path / "a" / "target.png")
    assert config["mrgd"]["method"] == "p2p" and config["seed"] == 7
    assert config == json.loads((tmp_path / "a" / "edit.json").read_text())
    with Image.open(tmp_path / "a" / "source.png") as image:
        assert "parameters" in image.text and image.size == (64, 64)
    info = json.loads((tmp_path / "a" / "info.json").read_text())
    assert info["unet_calls"] > 0 and len(info["unet_batch_sizes"]) == info["unet_calls"]
    # the resolved edit.json reproduces the same bytes
    code, _, err = run(capsys, "edit", tmp_path / "a" / "edit.json", "-o", tmp_path / "b", "--model", tiny_model_dir)
    assert code == 0, err
    for name in ("source.png", "target.png", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_existing_outputs_are_kept_without_force(capsys, tmp_path, edit_file, tiny_model_dir):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "source.png").write_bytes(b"precious")
    code, _, err = run(capsys, "edit", edit_file, "-o", out_dir, "--model", tiny_model_dir)
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert (out_dir / "source.png").read_bytes() == b"precious"
    code, _, err = run(capsys, "edit", edit_file, "-o", out_dir, "--model", tiny_model_dir, "--force")
    assert code == 0, err
    assert (out_dir / "source.png").read_bytes() != b"precious"


def test_generate(capsys, tmp_path, tiny_model_dir):
    layout = {k: v for k, v in THREE_REGION_EDIT.items() if k != "regions"}
    layout["regions"] = [r for r in THREE_REGION_EDIT["regions"] if "target_prompt" not in r]
    path = tmp_path / "layout.yaml"
    import yaml

    path.write_text(yaml.safe_dump(layout))
    code, out, err = run(capsys, "generate", path, "-o", tmp_path / "g", "--model", tiny_model_dir, "--steps", "3",
                         "--region-context", "0.5")
    assert code == 0, err
    config = read_png_config(tmp_path / "g" / "image.png")
    assert config["steps"] == 3 and config["region_context"] == 0.5
    code, out, err = run(capsys, "generate", path, "-o", tmp_path / "h", "--model", tiny_model_dir,
                         "--region-context", "-1")
    assert code == 2 and "region_context" in err and not (tmp_path / "h" / "image.png").exists()


@pytest.mark.parametrize("args, field", [
    (["edit", "missing.json"], "missing.json"),
    (["edit", "{edit}", "--method", "nope"], "--method"),
    (["edit", "{edit}", "--dtype", "float8"], "--dtype"),
    (["edit", "{edit}", "--keyword-entropy", "kl"], "--keyword-entropy"),
    (["edit", "{edit}", "--model", "{tmp}/weights.ckpt"], "--model"),
    (["edit", "{edit}", "--model", "{tmp}"], "--model"),
    (["edit", "{bad}"], "regions[0].box"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, edit_file, tiny_model_dir, args, field):
    bad = tmp_path / "bad.json"
    bad_edit = json.loads(edit_file.read_text())
    bad_edit["regions"][0]["box"] = [0, 0, 0, 1]
    bad.write_text(json.dumps(bad_edit))
    (tmp_path / "weights.ckpt").write_bytes(b"not really a pickle")
    args = [a.format(edit=edit_file, bad=bad, tmp=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    code, _, err = run(capsys, *args, "-o", tmp_path / "never")
    assert code == 2
    assert field in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_import_webui(capsys, tmp_path):
    webui = {"bbox_controls": [
        {"enable": True, "x": 0, "y": 0, "w": 1, "h": 1, "prompt": "grass", "neg_prompt": "", "blend_mode": "Background",
         "feather_ratio": 0.2, "seed": -1, "key_prompt": ""},
        {"enable": True, "x": 0.1, "y": 0.1, "w": 0.3, "h": 0.3, "prompt": "a red circle", "neg_prompt": "",
         "blend_mode": "EditedSource", "feather_ratio": 0.2, "seed": -1, "key_prompt": ""},
        {"enable": True, "x": 0.1, "y": 0.1, "w": 0.3, "h": 0.3, "prompt": "a blue circle", "neg_prompt": "",
         "blend_mode": "EditedTarget", "feather_ratio": 0.2, "seed": -1, "key_prompt": ""},
    ]}
    src = tmp_path / "webui.json"
    src.write_text(json.dumps(webui))
    code, out, err = run(capsys, "import-webui", src, "--prompt", "best quality", "--size", "128", "128",
                         "-o", tmp_path / "edit.json")
    assert code == 0, err
    from mrgd.layout import Edit

    edit = Edit.load(tmp_path / "edit.json")
    assert list(edit.roles().values()) == ["inherent", "modified"] and edit.size == (128, 128)


def test_edit_explain_writes_keywords_and_masks(capsys, tmp_path, edit_file, tiny_model_dir):
    code, out, err = run(capsys, "edit", edit_file, "-o", tmp_path / "x", "--model", tiny_model_dir,
                         "--method", "mrgd", "--steps", "12", "--keywords", "2", "--guidance-every", "4", "--explain",
                         "--keyword-entropy", "histogram", "--guidance-precision", "bfloat16")
    assert code == 0, err
    for name in ("keywords.json", "keywords.png", "masks.png", "metrics.png"):
        assert (tmp_path / "x" / name).exists(), name
    assert json.loads((tmp_path / "x" / "info.json").read_text())["guidance_precision"] == "bfloat16"
    keywords = json.loads((tmp_path / "x" / "keywords.json").read_text())
    assert set(keywords) == {"source", "target"}
    words = {w["word"] for regions in keywords.values() for chosen in regions.values() for w in chosen}
    assert words and "masterpiece" not in words  # global-prompt words are never candidates
    for regions in keywords.values():
        for chosen in regions.values():
            assert len(chosen) <= 2
            assert [w["entropy"] for w in chosen] == sorted(w["entropy"] for w in chosen)
    resolved = json.loads((tmp_path / "x" / "edit.json").read_text())
    assert resolved["mrgd"]["keywords"] == 2 and resolved["mrgd"]["guidance_every"] == 4
    assert resolved["mrgd"]["keyword_entropy"] == "histogram"


@pytest.mark.parametrize("inversion", ["direct", "null-text"])
def test_invert_then_edit_from_inversion(capsys, tmp_path, tiny_model_dir, inversion):
    import numpy as np

    from mrgd.toyworld.world import make_scene

    Image.fromarray(make_scene(np.random.default_rng(0), 96).image).save(tmp_path / "photo.png")
    edit = {"size": [64, 64], "steps": 3, "guidance_scale": 3.0, "mrgd": {"method": "p2p"}, "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
        {"id": "ball", "box": [0.2, 0.2, 0.5, 0.5], "prompt": "a red circle", "target_prompt": "a blue circle"}]}
    (tmp_path / "edit.json").write_text(json.dumps(edit))
    code, out, err = run(capsys, "invert", tmp_path / "photo.png", tmp_path / "edit.json", "-o", tmp_path / "inv",
                         "--model", tiny_model_dir, "--inner-steps", "2", "--min-psnr", "99", "--inversion", inversion)
    assert code == 0, err
    assert "centre-cropped" in err or "resized" in err
    assert "below --min-psnr" in err  # the gate speaks plainly and still writes everything
    names = {p.name for p in (tmp_path / "inv").iterdir()}
    assert names == {"reconstruction.png", "target.png", "grid.png", "inversion.safetensors", "edit.json", "info.json"}
    info = json.loads((tmp_path / "inv" / "info.json").read_text())
    assert info["reconstruction"]["psnr_db"] > 0 and info["inversion"] == inversion
    assert len(info["null_text_losses"]) == (3 if inversion == "null-text" else 0)
    code, _, err = run(capsys, "edit", tmp_path / "edit.json", "-o", tmp_path / "again", "--model", tiny_model_dir,
                       "--from-inversion", tmp_path / "inv" / "inversion.safetensors")
    assert code == 0, err
    a = Image.open(tmp_path / "inv" / "reconstruction.png")
    b = Image.open(tmp_path / "again" / "source.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))  # one inversion, many edits, same reconstruction
    code, _, err = run(capsys, "edit", tmp_path / "edit.json", "-o", tmp_path / "mismatch", "--model", tiny_model_dir,
                       "--from-inversion", tmp_path / "inv" / "inversion.safetensors", "--steps", "5")
    assert code == 2 and "--steps 3" in err and not (tmp_path / "mismatch").exists()
    code, _, err = run(capsys, "invert", tmp_path / "edit.json", tmp_path / "edit.json", "-o", tmp_path / "bad",
                       "--model", tiny_model_dir)
    assert code == 2 and "IMAGE" in err


@pytest.mark.parametrize("args", [["edit", "a", "b", "c"], ["nosuch"], ["edit", "x.json", "--steps", "many"]])
def test_usage_errors_exit_2_on_one_line(capsys, args):
    code, _, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_more_steps_than_the_scheduler_takes_is_bad_input(capsys, tmp_path, tiny_model_dir):
    path = tmp_path / "edit.json"
    path.write_text(json.dumps({**THREE_REGION_EDIT, "steps": 1000}))
    code, _, err = run(capsys, "edit", path, "-o", tmp_path / "o", "--model", tiny_model_dir)
    assert code == 2 and "steps: 1000" in err and "at most 999" in err and not (tmp_path / "o").exists()
