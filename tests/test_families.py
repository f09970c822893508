"""SDXL and SD 2.x through the one sampler; single-file checkpoints loaded offline with the shipped configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrgd.errors import InputError
from mrgd.layout import Edit, Layout
from mrgd.pipeline import MRGDPipeline
from tiny_families import diffusers_pipeline, tiny_sd1, tiny_sd2, tiny_sdxl


@pytest.fixture(scope="module")
def sdxl_parts():
    return tiny_sdxl()


@pytest.fixture(scope="module")
def sdxl_folder(sdxl_parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    diffusers_pipeline(sdxl_parts).save_pretrained(folder)
    return folder


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _layout(negative: str = "", size: int = 64, steps: int = 5) -> Layout:
    return Layout.from_dict({
        "size": [size, size], "prompt": "", "negative_prompt": negative, "seed": 3, "steps": steps,
        "guidance_scale": 6.0,
        "regions": [{"id": "all", "kind": "background", "box": [0, 0, 1, 1], "prompt": "a red circle on grass"}]})


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_sdxl_single_region_matches_diffusers_sdxl_pipeline(sdxl_parts, negative):
    ours = MRGDPipeline(**sdxl_parts, name="tiny-xl").generate(_layout(negative)).image
    theirs = diffusers_pipeline(sdxl_parts)(
        "a red circle on grass", negative_prompt=negative or None, height=64, width=64, num_inference_steps=5,
        guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1
    assert _pixels(ours).std() > 0


def test_sd2_v_prediction_matches_diffusers():
    parts = tiny_sd2()
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    ours = MRGDPipeline(**parts, name="tiny-sd2").generate(_layout("blurry")).image
    theirs = diffusers_pipeline(parts)(
        "a red circle on grass", negative_prompt="blurry", height=64, width=64, num_inference_steps=5,
        guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1
    # and the prediction type matters: read as ε the same weights give another picture
    parts["scheduler"] = parts["scheduler"].from_config(parts["scheduler"].config, prediction_type="epsilon")
    other = MRGDPipeline(**parts, name="tiny-sd2-eps").generate(_layout("blurry")).image
    assert np.abs(_pixels(ours) - _pixels(other)).max() > 8


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_loads_offline_with_the_folders_pixels(family, sdxl_parts, tmp_path, monkeypatch):
    from mrgd.checkpoint import inspect_checkpoint, write_single_file
    from mrgd.models import load_pipeline

    parts = sdxl_parts if family == "sdxl" else tiny_sd1()
    folder = tmp_path / "folder"
    diffusers_pipeline(parts).save_pretrained(folder)
    single = tmp_path / f"tiny-{family}.safetensors"
    write_single_file(single, parts["unet"], parts["vae"], parts["text_encoder"], parts.get("text_encoder_2"))
    assert inspect_checkpoint(single).family == family

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_file = load_pipeline(str(single))
    from_folder = load_pipeline(str(folder))
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        ours, theirs = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    layout = _layout("blurry", steps=3)
    assert np.array_equal(_pixels(from_file.generate(layout).image), _pixels(from_folder.generate(layout).image))
    assert from_file.family.name == ("sdxl" if family == "sdxl" else "sd")
    assert "prediction type epsilon" in from_file.load_notes[0]


def test_single_file_through_the_cli_offline(sdxl_parts, tmp_path, capsys, monkeypatch):
    from conftest import run_cli
    from mrgd.checkpoint import write_single_file
    from mrgd.render import read_png_config

    single = tmp_path / "xl.safetensors"
    write_single_file(single, sdxl_parts["unet"], sdxl_parts["vae"], sdxl_parts["text_encoder"], sdxl_parts["text_encoder_2"])
    layout = tmp_path / "layout.json"
    _layout(steps=2).save(layout)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, "generate", layout, "-o", tmp_path / "out", "--model", single,
                             "--prediction-type", "v_prediction")
    assert code == 0, err
    import json

    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["family"] == "sdxl" and info["prediction_type"] == "v_prediction"
    assert read_png_config(tmp_path / "out" / "image.png")["regions"][0]["id"] == "all"
    code, _, err = run_cli(capsys, "generate", layout, "-o", tmp_path / "out2", "--model", single,
                           "--prediction-type", "x0")
    assert code == 2 and "--prediction-type" in err and len(err.strip().splitlines()) == 1


def test_unknown_and_unsupported_checkpoints_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    from mrgd.checkpoint import inspect_checkpoint

    cases = {
        "flux.safetensors": {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)},
        "inpaint.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3),
                                "cond_stage_model.transformer.text_model.x": torch.zeros(1)},
        "refiner.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                "conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)},
        "unet-only.safetensors": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
    }
    expected = {"flux": "no Stable Diffusion UNet", "inpaint": "9 input channels", "refiner": "refiner",
                "unet-only": "no text encoder"}
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(InputError) as err:
            inspect_checkpoint(tmp_path / name)
        assert expected[name.split(".")[0]] in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        inspect_checkpoint(tmp_path / "broken.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(InputError, match="pickle"):
        inspect_checkpoint(tmp_path / "model.ckpt")


SDXL_EDIT = {
    "size": [64, 64], "prompt": "masterpiece", "seed": 5, "steps": 4,
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
        {"id": "ball", "box": [0.05, 0.5, 0.4, 0.45], "prompt": "a red circle"},
        {"id": "kite", "box": [0.5, 0.05, 0.45, 0.4], "prompt": "a blue square", "target_prompt": "a yellow square"},
        {"id": "toy", "box": [0.55, 0.55, 0.4, 0.4], "target_prompt": "a purple star"},
        {"id": "rock", "box": [0.05, 0.05, 0.3, 0.3], "prompt": "an orange triangle", "target_prompt": None},
    ],
}


def _sdxl_pipe(parts, guided: bool = False) -> MRGDPipeline:
    from conftest import make_tiny_clipseg

    extra = {}
    if guided:
        extra = {"guidance_model": make_tiny_clipseg(parts["tokenizer"]), "guidance_tokenizer": parts["tokenizer"]}
    return MRGDPipeline(**parts, name="tiny-xl", **extra)


@pytest.mark.parametrize("method", ["p2p", "mrgd"])
def test_sdxl_edit_runs_every_control_at_its_level(sdxl_parts, method):
    pipe = _sdxl_pipe(sdxl_parts, guided=method == "mrgd")
    edit = Edit.from_dict({**SDXL_EDIT, "mrgd": {"method": method, "keyword_steps": [2, 1]}})
    result = pipe.edit(edit)
    rows = result.info["attention_rows"]
    # SDXL's layout: attention at latent/2 (level 1) and latent/4 (level 2, also the mid block), none at level 0
    assert not any(key.endswith("@0") for key in rows)
    assert rows["cross@1"] > 0 and rows["cross@2"] > 0
    assert rows.get("self@2", 0) > 0 and "self@1" not in rows  # self-attention replaced at latent/4 only
    if method == "mrgd":
        assert rows["record@2"] > 0 and "record@1" not in rows  # keyword maps at the map level only
        assert rows["kssa_pick@1"] > 0 and rows["kssa_pick@2"] > 0
        assert rows["kssa_scale@1"] > 0 and rows["kssa_scale@2"] > 0
        assert result.info["keywords"]["target"]
        assert result.info["guidance_losses"]
    source, target = _pixels(result.source), _pixels(result.target)
    assert np.abs(source - target).max() > 0


def test_sdxl_rows_get_their_pooled_embedding_and_crop_offset(sdxl_parts):
    pipe = _sdxl_pipe(sdxl_parts)
    calls = []
    original = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        calls.append((sample.shape, added_cond_kwargs["time_ids"].clone(), added_cond_kwargs["text_embeds"].clone()))
        return original(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs)

    pipe.unet.forward = spy
    edit = Edit.from_dict({**SDXL_EDIT, "steps": 2, "mrgd": {"method": "multidiffusion"}})
    pipe.edit(edit)
    offsets = {tuple(row[2:4].tolist()) for _, time_ids, _ in calls for row in time_ids}
    assert (0.0, 0.0) in offsets  # the background's full canvas
    assert any(top > 0 or left > 0 for top, left in offsets)  # a region window away from the corner
    assert all((time_ids[:, [0, 1, 4, 5]] == 64).all() for _, time_ids, _ in calls)  # sizes are the canvas's
    for shape, time_ids, text_embeds in calls:
        assert time_ids.shape[0] == text_embeds.shape[0] == shape[0]
        half = shape[0] // 2
        assert torch.equal(text_embeds[:half], torch.zeros_like(text_embeds[:half]))  # empty negatives: zeros
        assert text_embeds[half:].abs().sum() > 0


def test_sdxl_hooks_restored_after_a_run_that_raised(sdxl_parts):
    pipe = _sdxl_pipe(sdxl_parts)
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}

    def fail(state):
        if state["step"] == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        pipe.edit(Edit.from_dict({**SDXL_EDIT, "mrgd": {"method": "p2p"}}), callback=fail)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before


def test_fp16_vae_that_asks_for_upcast_runs_in_fp32(sdxl_parts):
    parts = tiny_sdxl(seed=4)
    pipe = MRGDPipeline(**parts, dtype=torch.float16, name="tiny-xl-fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    image = pipe.decode_tensor(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert image.dtype == torch.float32


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_edit_explain_invert_and_bench_through_the_cli(family, sdxl_parts, sdxl_folder, tmp_path, capsys):
    """Everything else follows: the commands that run on SD 1.x run on an SDXL and an SD 2.x-v folder with a
    guidance model."""
    import json

    from PIL import Image

    from conftest import make_tiny_clipseg, run_cli

    parts = sdxl_parts if family == "sdxl" else tiny_sd2()
    folder = sdxl_folder
    if family == "sd2":
        folder = tmp_path / "tiny-sd2"
        diffusers_pipeline(parts).save_pretrained(folder)
    seg = tmp_path / "clipseg"
    make_tiny_clipseg(parts["tokenizer"]).save_pretrained(seg)
    parts["tokenizer"].save_pretrained(seg)
    edit = tmp_path / "edit.json"
    edit.write_text(json.dumps({**SDXL_EDIT, "steps": 3, "mrgd": {"method": "mrgd", "keyword_steps": [2, 1]}}))
    model = ["--model", folder, "--guidance-model", seg]

    code, _, err = run_cli(capsys, "edit", edit, "-o", tmp_path / "e", *model, "--explain")
    assert code == 0, err
    assert {"keywords.png", "masks.png", "metrics.png"} <= {p.name for p in (tmp_path / "e").iterdir()}
    assert json.loads((tmp_path / "e" / "keywords.json").read_text())["target"]

    Image.open(tmp_path / "e" / "source.png").save(tmp_path / "photo.png")
    code, out, err = run_cli(capsys, "invert", tmp_path / "photo.png", edit, "-o", tmp_path / "i", *model,
                             "--inner-steps", "2", "--method", "p2p", "--min-psnr", "0")
    assert code == 0, err
    info = json.loads((tmp_path / "i" / "info.json").read_text())
    assert "PSNR" in out and info["family"] == ("sdxl" if family == "sdxl" else "sd")
    assert info["prediction_type"] == ("epsilon" if family == "sdxl" else "v_prediction")

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "attr-a.json").write_text(edit.read_text())
    code, _, err = run_cli(capsys, "bench", suite, "-o", tmp_path / "b", *model, "--methods", "p2p,mrgd")
    assert code == 0, err
    assert len((tmp_path / "b" / "records.jsonl").read_text().splitlines()) == 2


def test_sdxl_long_and_weighted_prompts_chunk_per_encoder(sdxl_parts):
    pipe = _sdxl_pipe(sdxl_parts)
    encoder = pipe.prompt_encoder()
    long = encoder.encode(" ".join(["red circle"] * 50))  # 100 tokens: two 75-token windows per tower
    assert long.embeds.shape == (1, 154, 64 + 128) and long.pooled.shape == (1, 32)
    first = encoder.encode(" ".join(["red circle"] * 37) + " red")  # exactly the first window
    assert torch.equal(long.pooled, first.pooled)  # pooled from the first chunk, as the WebUI does
    assert torch.equal(long.embeds[:, :77], first.embeds)
    plain, weighted = encoder.encode("red circle"), encoder.encode("(red:1.5) circle")
    assert not torch.equal(plain.embeds, weighted.embeds) and torch.equal(plain.pooled, weighted.pooled)
    zero = encoder.encode_negative("")
    assert zero.zero and not zero.embeds.any() and not zero.pooled.any()
    assert encoder.encode_negative("blurry").embeds.any()
