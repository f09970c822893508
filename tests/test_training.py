"""The resumable training loop of `mrgd train-toy` (toyworld/train.py): resume, extend, schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mrgd.toyworld import train as T


class PauseAfter(T.Budget):
    """A budget that runs out after `calls` checks: a pause at a known step."""

    def __init__(self, calls: int | None):
        super().__init__(None)
        self.calls = calls

    def exhausted(self) -> bool:
        if self.calls is None:
            return False
        self.calls -= 1
        return self.calls < 0


def run(tmp_path, total: int, budget: T.Budget) -> tuple[bool, torch.nn.Module]:
    cfg = T.TrainConfig(out=str(tmp_path))
    (tmp_path / "toy").mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step_fn(rng, step):
        x = torch.from_numpy(rng.normal(size=(8, 3))).float()
        return (model(x) - x.sum(1, keepdim=True)).pow(2).mean(), {"note": 1.0}

    done = T._loop(cfg, "toy", total, {"m": model}, opt, 0.1, step_fn, budget, save_every=2)
    return done, model


def test_a_paused_run_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    paused = tmp_path / "paused"
    straight.mkdir(), paused.mkdir()
    done, expected = run(straight, 7, PauseAfter(None))
    assert done
    assert not run(paused, 7, PauseAfter(3))[0]  # paused after 3 steps
    done, got = run(paused, 7, PauseAfter(None))
    assert done
    for a, b in zip(got.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_raising_the_step_count_extends_a_finished_stage_with_a_new_segment(tmp_path):
    assert run(tmp_path, 4, PauseAfter(None))[0]
    assert run(tmp_path, 6, PauseAfter(None))[0]
    state = T.Checkpoint(tmp_path / "toy" / "state.pt").load()
    assert state["step"] == 6 and state["segments"] == [(0, 4), (4, 6)]


def test_learning_rate_restarts_lower_in_an_extension():
    segments = [(0, 1000), (1000, 2000)]
    assert T._lr(0, segments, 1.0) == pytest.approx(1 / 200)
    assert T._lr(199, segments, 1.0) == pytest.approx(1.0)
    assert T._lr(999, segments, 1.0) < 1e-4
    assert T._lr(1099, segments, 1.0) == pytest.approx(T.EXTEND_PEAK)  # 100-step warmup to half the peak
    assert T._lr(1999, segments, 1.0) < 1e-4


def test_position_embeddings_resize_keeps_the_class_token_and_a_constant_grid():
    weight = torch.randn(1 + 64, 5)
    assert torch.allclose(T.resize_position_embedding(weight, 8), weight, atol=1e-5)
    constant = torch.cat([torch.randn(1, 5), torch.ones(64, 5) * 0.3])
    resized = T.resize_position_embedding(constant, 16)
    assert resized.shape == (1 + 256, 5)
    assert torch.equal(resized[0], constant[0])
    assert torch.allclose(resized[1:], torch.full((256, 5), 0.3), atol=1e-5)


def test_canonical_phrases_index_every_label():
    phrases, index = T.canonical_phrases()
    assert len(phrases) == len(set(phrases)) == len(index)
    assert phrases[index[(0, 0)]].startswith("a ") and phrases[index[(-1, -1)]] == T.BACKGROUNDS[0]
    assert index[(np.int64(1), np.int64(2))] == index[(1, 2)]


def test_a_paused_segment_can_be_shortened_or_lengthened(tmp_path):
    assert not run(tmp_path, 8, PauseAfter(3))[0]
    assert run(tmp_path, 5, PauseAfter(None))[0]
    state = T.Checkpoint(tmp_path / "toy" / "state.pt").load()
    assert state["step"] == 5 and state["segments"] == [(0, 5)]


def test_a_unet_stage_started_from_a_model_folder_extends_it_and_assembles_over_it(tmp_path):
    """unet_init: the shipped folder's UNet and text tower as a finished stage at unet_init_step; two more steps
    with random-vocabulary captions; the assembled folder is the base with only unet/ and text_encoder/ new."""
    from diffusers import UNet2DConditionModel

    from mrgd.models import DEFAULT_MODEL
    from mrgd.toyworld import data as D

    (tmp_path / "data").mkdir()
    D.save_pool(D.make_scene_pool(4, 0), tmp_path / "data" / "scenes.npz")
    D.save_pool(D.make_crop_pool(4, 1), tmp_path / "data" / "crops.npz")
    cfg = T.TrainConfig(out=str(tmp_path), threads=1, unet_init=str(DEFAULT_MODEL), unet_init_step=100,
                        unet_fillers_from=100, unet_steps=102, unet_batch=2, stages=["unet", "assemble"])
    assert T.train(cfg)
    state = T.Checkpoint(tmp_path / "unet" / "state.pt").load()
    assert state["step"] == 102 and state["segments"] == [(0, 100), (100, 102)]
    model = tmp_path / "model"
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in DEFAULT_MODEL.iterdir())
    assert (model / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (DEFAULT_MODEL / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    from safetensors.torch import load_file

    stored = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}  # fp16 on disk, as assembled
    base = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet").float().state_dict()
    trained = state["models"]["unet"]
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize("grad_weight", [0.0, 1.0])
def test_taesd_stage_distils_a_tiny_decoder_that_loads_as_guidance_decoder(tmp_path, monkeypatch, grad_weight):
    """The taesd stage on a handful of scenes and a tiny VAE: it trains, saves a loadable AutoencoderTiny, and the
    decoder moves towards the VAE's decoding (the loss falls); with the gradient term its agreement is logged."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from mrgd.models import load_tiny_decoder
    from mrgd.toyworld import data as D

    cfg = T.TrainConfig(out=str(tmp_path), taesd_steps=100, taesd_batch=2, taesd_grad_weight=grad_weight)  # logged every 50 steps
    D.save_pool(D.make_scene_pool(8, 0), (tmp_path / "data").mkdir() or tmp_path / "data" / "scenes.npz")
    D.save_pool(D.make_crop_pool(8, 1), tmp_path / "data" / "crops.npz")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                  mid_block_add_attention=False).save_pretrained(tmp_path / "vae" / "final")
    assert T.stage_taesd(cfg, T.Budget(None))
    logs = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines() if '"step"' in line]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(("grad_cos" in log) == bool(grad_weight) for log in logs)
    tiny = load_tiny_decoder(str(tmp_path / "taesd" / "final"))
    assert isinstance(tiny, AutoencoderTiny) and tiny.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)
    assert "block_out_channels" not in json.loads((tmp_path / "taesd" / "final" / "config.json").read_text())


def test_gradient_agreement_is_zero_for_the_teacher_itself_and_positive_for_another_decoder():
    from mrgd.toyworld.models import make_tiny_vae

    torch.manual_seed(0)
    student, other = make_tiny_vae(), make_tiny_vae()
    z, nudge = torch.randn(2, 4, 4, 4), 0.3 * torch.randn(2, 4, 4, 4)
    same, cosine = T.gradient_agreement(student, lambda z_: student.decode(z_).sample, z, nudge)
    assert same.item() == pytest.approx(0, abs=1e-10) and cosine == pytest.approx(1, abs=1e-5)
    apart, cosine = T.gradient_agreement(student, lambda z_: other.decode(z_).sample, z, nudge)
    assert apart.item() > 0.01 and cosine < 0.999
    apart.backward()  # differentiable in the student: the stage trains on it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
