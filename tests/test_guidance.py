"""Multi-region guidance: the losses on hand-made masks, the DDIM re-step, a guided step on a tiny model."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import THREE_REGION_EDIT
from mrgd.ddim import ddim_restep, ddim_step
from mrgd.fusion import LatentBox
from mrgd.guidance import (Guide, box_mask, infonce_loss, inherent_mask, inherent_preservation_loss, loss_weights,
                           query_text, region_specific_loss)
from mrgd.layout import PAPERS_RULES, Edit


def test_restep_with_zero_gradient_reproduces_the_fused_step():
    torch.manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8)
    alpha, alpha_prev = torch.tensor(0.3), torch.tensor(0.5)
    # two "regions" with their own ε, fused by a convex per-pixel weight, as the composite does
    eps_a, eps_b = torch.randn_like(x_t), torch.randn_like(x_t)
    weight = torch.rand(1, 1, 8, 8)
    prev_a, x0_a = ddim_step(x_t, eps_a, alpha, alpha_prev)
    prev_b, x0_b = ddim_step(x_t, eps_b, alpha, alpha_prev)
    fused_prev = weight * prev_a + (1 - weight) * prev_b
    fused_x0 = weight * x0_a + (1 - weight) * x0_b
    again, x0_again = ddim_restep(x_t, fused_x0, torch.zeros_like(x_t), alpha, alpha_prev)
    assert torch.allclose(again, fused_prev, atol=1e-5)
    assert torch.allclose(x0_again, fused_x0, atol=1e-5)


def test_restep_moves_x0_against_the_gradient():
    x_t, x0, g = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    alpha, alpha_prev = torch.tensor(0.25), torch.tensor(0.5)
    _, x0_new = ddim_restep(x_t, x0, g, alpha, alpha_prev)
    assert torch.allclose(x0_new, x0 - (1 - alpha) / alpha**0.5 * g)


def test_region_specific_loss_is_zero_inside_the_box_and_grows_with_leaks():
    hw = (8, 8)
    box = LatentBox(2, 6, 2, 6)
    inside = box_mask(box, hw)[None]
    assert region_specific_loss(inside, inside).item() == 0
    leak = inside.clone()
    leak[0, 0, :] = 1
    more = leak.clone()
    more[0, 7, :] = 1
    assert 0 < region_specific_loss(leak, inside) < region_specific_loss(more, inside)
    assert region_specific_loss(torch.zeros(0, 8, 8), torch.zeros(0, 8, 8)).item() == 0


def test_infonce_prefers_matching_maps_and_depends_on_temperature():
    a = torch.zeros(2, 8, 8)
    a[0, :4], a[1, 4:] = 1, 1
    matched = infonce_loss(a, a)
    swapped = infonce_loss(a, a.flip(0))
    assert matched < swapped
    assert not torch.isclose(infonce_loss(a, a, 0.07), infonce_loss(a, a, 0.5))
    assert infonce_loss(a, a, 0.01) < infonce_loss(a, a, 0.5)  # sharper temperature, surer match


def test_inherent_preservation_ignores_edited_boxes():
    hw = (8, 8)
    box = LatentBox(2, 6, 2, 6)
    mask = inherent_mask([box], hw, feather=0.0)
    assert mask[3, 3] == 0 and mask[0, 0] == 1
    soft = inherent_mask([box], hw, feather=0.5)
    assert 0 < soft[2, 2] <= 1 and soft[4, 4] == 0
    z = torch.zeros(1, 4, 8, 8)
    inside_change = z.clone()
    inside_change[..., 3:5, 3:5] = 1
    outside_change = z.clone()
    outside_change[..., 0, :] = 1
    img = torch.zeros(1, 3, 8, 8)
    assert inherent_preservation_loss(img, img, z, inside_change, mask, mask).item() == 0
    assert inherent_preservation_loss(img, img, z, outside_change, mask, mask).item() > 0


def test_schedule():
    w = loss_weights(0, 20, 1, 2, 3)
    assert (w.rs, w.is_, w.ip) == (1, 0, 0)
    w = loss_weights(5, 20, 1, 2, 3)
    assert (w.rs, w.is_, w.ip) == (1, 2, 3)
    assert loss_weights(10, 20, 1, 2, 3).ip == 1.5


def test_query_text():
    assert query_text("a red circle", [], []) == "a red circle"
    assert query_text("a red circle", ["red", "circle"], ["ball", "red"]) == "red, circle, ball"


def _edit(**mrgd):
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["mrgd"] = mrgd
    return Edit.from_dict(data)


def _guide(pipe, edit, decode):
    """The Guide a pipeline builds for an edit, outside a run: its plans, masks and weights can be read."""
    from mrgd.guidance import Guide, Segmenter

    plans = {i: pipe._plan_regions(edit, (edit.source(), edit.target())[i], i, edit.steps) for i in (0, 1)}
    return Guide.for_edit(edit, plans, Segmenter(pipe.guidance_model, pipe.guidance_tokenizer), pipe.latent_factor,
                          decode)


def test_mrgd_with_zero_lambdas_equals_p2p(tiny_guided_pipe):
    p2p = tiny_guided_pipe.edit(_edit(method="p2p"))
    # with §2's composite: MRGD's own rules (layout.PAPERS_RULES) are checked in test_pipeline
    mrgd = tiny_guided_pipe.edit(_edit(method="mrgd", lambda_rs=0, lambda_is=0, lambda_ip=0, kssa=False, keywords=0,
                                       **PAPERS_RULES))
    assert np.abs(np.asarray(p2p.target, int) - np.asarray(mrgd.target, int)).max() <= 1
    assert np.abs(np.asarray(p2p.source, int) - np.asarray(mrgd.source, int)).max() <= 1


def test_guidance_changes_the_target_and_logs_losses(tiny_guided_pipe):
    p2p = tiny_guided_pipe.edit(_edit(method="p2p"))
    guided = tiny_guided_pipe.edit(_edit(method="mrgd", kssa=False, keywords=0, guidance_every=1))
    assert len(guided.info["guidance_losses"]) == THREE_REGION_EDIT["steps"]
    assert np.abs(np.asarray(p2p.target, int) - np.asarray(guided.target, int)).max() > 0
    every = tiny_guided_pipe.edit(_edit(method="mrgd", kssa=False, keywords=0))  # the default: every 2nd step
    assert [e["step"] for e in every.info["guidance_losses"]] == list(range(0, THREE_REGION_EDIT["steps"], 2))


def test_a_removal_guides_the_source_only_when_asked(tiny_guided_pipe):
    # THREE_REGION_EDIT removes "rock": by default guidance leaves the source as MultiDiffusion + control drew it
    unguided = tiny_guided_pipe.edit(_edit(method="mrgd", guidance=False, kssa=False, keywords=0))
    guided = tiny_guided_pipe.edit(_edit(method="mrgd", kssa=False, keywords=0))
    assert np.array_equal(np.asarray(unguided.source), np.asarray(guided.source))
    assert not np.array_equal(np.asarray(unguided.target), np.asarray(guided.target))
    both = tiny_guided_pipe.edit(_edit(method="mrgd", kssa=False, keywords=0, guide_source_on_removal=True))
    assert not np.array_equal(np.asarray(unguided.source), np.asarray(both.source))


def _tiny_decoder(seed: int = 5):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4,
                           decoder_block_out_channels=(8,) * 4, num_decoder_blocks=(1,) * 4)


@pytest.mark.parametrize("decoder", ["vae", "tiny"])
def test_a_guided_step_lowers_the_loss(tiny_components, decoder):
    from conftest import make_tiny_clipseg
    from mrgd.pipeline import SOURCE, TARGET, MRGDPipeline

    seg = make_tiny_clipseg(tiny_components["tokenizer"])
    pipe = MRGDPipeline(**tiny_components, guidance_model=seg, guidance_tokenizer=tiny_components["tokenizer"],
                        guidance_vae=_tiny_decoder() if decoder == "tiny" else None)
    name, decode = pipe.guidance_decoder("auto")
    assert name == decoder
    guide = _guide(pipe, _edit(method="mrgd", lambda_rs=1.0, lambda_is=1.0, lambda_ip=1.0), decode)
    torch.manual_seed(0)
    x0 = {SOURCE: torch.randn(1, 4, 8, 8), TARGET: torch.randn(1, 4, 8, 8).requires_grad_()}
    step = 10  # all three losses active
    loss, _ = guide.loss(decode, x0, step)
    (grad,) = torch.autograd.grad(loss, [x0[TARGET]])
    x_t = torch.randn(1, 4, 8, 8)
    alpha, alpha_prev = torch.tensor(0.9), torch.tensor(0.95)
    lr = 1e-2 / grad.abs().max()
    _, x0_new = ddim_restep(x_t, x0[TARGET].detach(), lr * grad, alpha, alpha_prev)
    with torch.no_grad():
        after, _ = guide.loss(decode, {SOURCE: x0[SOURCE], TARGET: x0_new}, step)
    assert after < loss.detach()


def test_segmenter_maps_carry_gradients_to_the_image_and_match_clipseg(tiny_guided_pipe):
    from mrgd.guidance import Segmenter, clip_pixels, clipseg_logits

    seg = Segmenter(tiny_guided_pipe.guidance_model, tiny_guided_pipe.guidance_tokenizer)
    image = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()
    maps = seg(image, ["a red circle", "grass"], (8, 8))
    (grad,) = torch.autograd.grad(maps[0].sum(), [image])
    assert grad.abs().max() > 0  # transformers' own forward runs the vision tower under no_grad
    ids = seg._input_ids(["a red circle"])
    with torch.no_grad():
        ours = clipseg_logits(seg.model, clip_pixels(image, seg.size), ids)
        theirs = seg.model(input_ids=ids, pixel_values=clip_pixels(image, seg.size)).logits
    assert torch.allclose(ours.reshape(theirs.shape), theirs, atol=1e-5)


def test_guidance_decoder_choices_and_bad_folders(tiny_components, tmp_path):
    from mrgd.errors import InputError
    from mrgd.pipeline import MRGDPipeline

    pipe = MRGDPipeline(**tiny_components)
    assert pipe.guidance_decoder("auto")[0] == "vae"
    with pytest.raises(InputError, match="no tiny decoder"):
        pipe.guidance_decoder("tiny")
    folder = tmp_path / "taesd"
    _tiny_decoder().save_pretrained(folder)
    name, decode = pipe.guidance_decoder(str(folder))
    assert name == str(folder) and decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    for bad, message in ((tmp_path / "missing", "cannot load"), (tmp_path, "no config.json")):
        with pytest.raises(InputError, match=message) as err:
            pipe.guidance_decoder(str(bad))
        assert str(err.value).startswith("--guidance-vae") and "\n" not in str(err.value)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(InputError, match="not an AutoencoderTiny"):
        pipe.guidance_decoder(str(tmp_path / "unet"))


def test_guidance_precision_autocasts_the_vae_decode_to_bfloat16_where_it_pays(tiny_components, monkeypatch):
    """auto: bfloat16 for a float32 VAE on a device with native bf16, the decoder's own dtype otherwise (and for
    tiny decoders); the bf16 decode's gradient keeps the float32 one's direction but is not the same numbers."""
    import mrgd.pipeline
    from mrgd.pipeline import MRGDPipeline

    pipe = MRGDPipeline(**tiny_components, guidance_vae=_tiny_decoder())
    for native, name, expected in ((True, "vae", "bfloat16"), (False, "vae", "decoder"), (True, "tiny", "decoder")):
        monkeypatch.setattr(mrgd.pipeline, "_bfloat16_native", lambda device, native=native: native)
        assert pipe._guidance_precision(name, "auto") == expected
        assert pipe._guidance_precision(name, "decoder") == "decoder"
    torch.manual_seed(0)
    z, weights = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64, 64)
    grads = {}
    for precision in ("decoder", "bfloat16"):
        _, decode = pipe.guidance_decoder("full", precision)
        x = z.clone().requires_grad_()
        image = decode(x)
        assert image.dtype == torch.float32
        (grads[precision],) = torch.autograd.grad((image * weights).sum(), [x])
    cosine = F.cosine_similarity(grads["decoder"].flatten(), grads["bfloat16"].flatten(), dim=0)
    assert cosine > 0.99 and not torch.equal(grads["decoder"], grads["bfloat16"])


def test_guidance_picture_vae_shows_the_vaes_picture_with_the_tiny_decoders_gradient(tiny_components):
    """guidance_picture "vae": Φ and L_IP look at the VAE's decode; the gradient is the tiny decoder's (its
    Jacobian), and a picture that needs no gradient (the unguided source) costs no tiny decode."""
    from mrgd.pipeline import MRGDPipeline

    pipe = MRGDPipeline(**tiny_components, guidance_vae=_tiny_decoder())
    assert pipe._guidance_picture("tiny", "decoder") == "decoder" and pipe._guidance_picture("vae", "vae") == "decoder"
    _, tiny = pipe.guidance_decoder("tiny", "decoder", "decoder")
    name, seen = pipe.guidance_decoder("tiny", "decoder", "vae")
    assert name == "tiny"
    torch.manual_seed(0)
    z, weights = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64, 64)
    x, y = z.clone().requires_grad_(), z.clone().requires_grad_()
    picture, approx = seen(x), tiny(y)
    with torch.no_grad():
        vae_picture = pipe.decode_tensor(z).float()
    assert torch.allclose(picture, vae_picture, atol=1e-6) and not torch.allclose(picture, approx, atol=1e-3)
    (through_seen,) = torch.autograd.grad((picture * weights).sum(), [x])
    (through_tiny,) = torch.autograd.grad((approx * weights).sum(), [y])
    assert torch.allclose(through_seen, through_tiny, atol=1e-6)
    calls = []
    pipe.guidance_vae.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert torch.equal(seen(z), picture.detach())
    assert calls == []


def test_steps_before_l_ip_skip_the_source_decode_and_the_second_backward_pass(tiny_guided_pipe):
    """At a guided step where L_IP weighs 0 (k < 0.15N) and Φ does not read the source, the source is not decoded
    and L_IP's share has no graph (`_gradients` takes one backward pass); from 0.15N both are back."""
    from mrgd.pipeline import SOURCE, TARGET

    pipe = tiny_guided_pipe
    _, full = pipe.guidance_decoder("full")
    decoded = []

    def decode(z):
        decoded.append(z.requires_grad)
        return full(z)

    guide = _guide(pipe, _edit(method="mrgd", ip_reach="added"), decode)  # the toy is added: L_IP confined by a 2nd pass
    assert guide.added
    torch.manual_seed(0)
    x0 = {SOURCE: torch.randn(1, 4, 8, 8), TARGET: torch.randn(1, 4, 8, 8).requires_grad_()}
    guide.loss(decode, x0, 0)
    assert decoded == [True] and not guide.terms[1].requires_grad
    decoded.clear()
    guide.loss(decode, x0, 10)
    assert decoded == [False, True] and guide.terms[1].requires_grad


def test_a_removal_of_the_only_object_guides_nothing_before_l_ip(tiny_guided_pipe):
    """The target of a removal has no region L_RS pulls (rs_regions "edited"): before L_IP's first step the loss
    has no gradient at all, and the step is left as fused instead of failing."""
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["regions"] = [data["regions"][0], data["regions"][-1]]  # ground, and the rock, removed
    data["mrgd"] = {"method": "mrgd", "kssa": False, "keywords": 0, "rs_regions": "edited"}
    result = tiny_guided_pipe.edit(Edit.from_dict(data))
    first = result.info["guidance_losses"][0]
    assert first["step"] == 0 and first["total"] == 0 and not result.info.get("notes")


def test_ip_reach_ring_leaves_a_ring_around_added_boxes_to_the_latent_term_in_one_backward_pass(tiny_guided_pipe,
                                                                                                monkeypatch):
    """ip_reach "ring": L_IP's pixel term leaves out ip_ring latent pixels around each added box, and the gradient
    is one backward pass; "added" keeps those pixels and pays a second pass to keep L_IP out of the box."""
    from mrgd import guidance
    from mrgd.pipeline import SOURCE, TARGET

    pipe = tiny_guided_pipe
    _, decode = pipe.guidance_decoder("full")
    torch.manual_seed(0)
    x0 = {SOURCE: torch.randn(1, 4, 8, 8), TARGET: torch.randn(1, 4, 8, 8).requires_grad_()}
    passes, grad = [], torch.autograd.grad
    monkeypatch.setattr(guidance.torch.autograd, "grad", lambda *a, **k: passes.append(1) or grad(*a, **k))
    masks = {}
    for reach in ("added", "ring"):
        guide = _guide(pipe, _edit(method="mrgd", ip_reach=reach, ip_ring=1), decode)
        (toy,) = guide.added
        masks[reach] = guide._mask("pixel", x0[TARGET], (64, 64))
        passes.clear()
        loss, _ = guide.loss(decode, x0, 10)
        guide._gradients(loss, [x0[TARGET]])
        assert len(passes) == (2 if reach == "added" else 1)
    f = pipe.latent_factor
    grown = masks["added"].new_zeros(64, 64, dtype=torch.bool)
    grown[max(toy.y0 - 1, 0) * f:(toy.y1 + 1) * f, max(toy.x0 - 1, 0) * f:(toy.x1 + 1) * f] = True
    ring = grown.clone()
    ring[toy.y0 * f:toy.y1 * f, toy.x0 * f:toy.x1 * f] = False
    assert torch.equal(masks["ring"][~grown], masks["added"][~grown]) and (masks["ring"] <= masks["added"]).all()
    assert (masks["ring"][ring] < masks["added"][ring]).any()


def test_an_edit_reports_its_guidance_precision(tiny_guided_pipe):
    edit = _edit(method="mrgd", kssa=False, keywords=0, guidance_precision="bfloat16")
    assert tiny_guided_pipe.edit(edit).info["guidance_precision"] == "bfloat16"
    papers = _edit(method="mrgd", kssa=False, keywords=0, **PAPERS_RULES)
    assert tiny_guided_pipe.edit(papers).info["guidance_precision"] == "decoder"
    assert tiny_guided_pipe.edit(edit).info["guidance_picture"] == "decoder"  # no tiny decoder: the VAE's own


def test_guidance_window_and_vision_shared_across_queries(tiny_guided_pipe):
    from mrgd.guidance import Segmenter

    edit = _edit(method="mrgd", kssa=False, keywords=0, guidance_until=0.5)
    result = tiny_guided_pipe.edit(edit)
    steps = [entry["step"] for entry in result.info["guidance_losses"]]
    assert steps and max(steps) < edit.steps * 0.5
    seg = Segmenter(tiny_guided_pipe.guidance_model, tiny_guided_pipe.guidance_tokenizer)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    together = seg(image, ["a red circle", "grass", "a blue square"], (8, 8))
    alone = torch.stack([seg(image, [text], (8, 8))[0] for text in ["a red circle", "grass", "a blue square"]])
    assert torch.allclose(together, alone, atol=1e-5)


def test_ip_step_x0_moves_x0_by_the_ip_gradient_itself_at_any_noise_level():
    from mrgd.guidance import ip_step_scale

    x_t, x0, grad = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for a in (0.0365, 0.5, 0.893):  # k = 3, 12, 17 of 20 on the embedded schedule
        alpha = torch.tensor(a)
        _, moved = ddim_restep(x_t, x0, grad * ip_step_scale(alpha), alpha, torch.tensor(min(a + 0.05, 0.999)))
        assert torch.allclose(x0 - moved, grad, atol=1e-4)  # §6's rule alone would move it (1 - a)/√a times grad


def test_limit_step_caps_the_x0_move_and_leaves_small_steps_alone():
    from mrgd.guidance import limit_step

    alpha = torch.tensor(0.0365)  # the re-step scales a gradient by (1 - ᾱ)/√ᾱ ≈ 5.04 into x̂0
    grad = torch.randn(1, 4, 8, 8)
    factor = (1 - alpha) / alpha.sqrt()
    capped = limit_step(grad, alpha, 0.5)
    assert torch.allclose((factor * capped).pow(2).mean().sqrt(), torch.tensor(0.5), atol=1e-5)
    assert torch.allclose(capped / grad, (capped / grad).flatten()[0].expand_as(grad))  # same direction
    small = grad * 0.01
    assert torch.equal(limit_step(small, alpha, 0.5), small)
    assert limit_step(grad, alpha, None) is grad


def test_rs_regions_edited_leaves_inherent_regions_out_of_l_rs(tiny_guided_pipe):
    from mrgd.pipeline import SOURCE, TARGET

    pipe = tiny_guided_pipe
    _, decode = pipe.guidance_decoder("full")

    def guide(**mrgd):
        return _guide(pipe, _edit(method="mrgd", **mrgd), decode)

    every, edited = guide(), guide(rs_regions="edited")
    assert every._rs_rows(TARGET) == [0, 1, 2]  # ball (inherent), kite (modified), toy (added)
    assert [edited.regions[TARGET][n][0] for n in edited._rs_rows(TARGET)] == ["kite", "toy"]
    assert [edited.regions[SOURCE][n][0] for n in edited._rs_rows(SOURCE)] == ["kite", "rock"]
    torch.manual_seed(0)
    x0 = {SOURCE: torch.randn(1, 4, 8, 8), TARGET: torch.randn(1, 4, 8, 8)}
    _, all_parts = every.loss(decode, x0, 10)
    _, edited_parts = edited.loss(decode, x0, 10)
    assert edited_parts["rs"] < all_parts["rs"] and edited_parts["ip"] == all_parts["ip"]


def test_removal_margin_grows_the_ip_hole_over_removed_boxes_only(tiny_guided_pipe):
    pipe = tiny_guided_pipe
    _, decode = pipe.guidance_decoder("full")
    holes = []
    for margin in (0.0, 0.5):
        holes.append(_guide(pipe, _edit(method="mrgd", removal_margin=margin), decode).edited)
    (kite, toy, rock), (kite2, toy2, rock2) = holes
    assert (kite, toy) == (kite2, toy2) and rock2.h > rock.h and rock2.w > rock.w


def test_text_features_once_per_query_set_and_the_unguided_source_seen_only_when_read(tiny_guided_pipe, monkeypatch):
    """Φ's text tower runs once per set of queries; the source, which guidance does not move, goes through Φ only
    where L_IS reads its maps (k ≥ 0.25N) or at the last guided step (the explain masks)."""
    from mrgd import guidance

    texts, images = [], []
    tower = guidance.text_conditionals
    monkeypatch.setattr(guidance, "text_conditionals", lambda model, ids, *a: texts.append(ids.shape[0]) or tower(model, ids, *a))
    call = guidance.Segmenter.__call__
    monkeypatch.setattr(guidance.Segmenter, "__call__", lambda self, image, t, hw: images.append(image.requires_grad) or call(self, image, t, hw))
    edit = _edit(method="mrgd", kssa=False, keywords=0)  # no keyword selection: the queries never change
    result = tiny_guided_pipe.edit(edit)
    assert len(texts) == 2  # source's and target's queries
    guided_steps = [e["step"] for e in result.info["guidance_losses"]]
    reads = [k for k in guided_steps if k >= 0.25 * edit.steps or k == guided_steps[-1]]
    assert images.count(False) == len(reads) and images.count(True) == len(guided_steps)
    assert set(result.explain["masks"]) == {"source", "target"}


def test_ip_without_pixels_is_the_latent_term_alone():
    z_s, z_t = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    img_s, img_t = torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5)
    mask4, mask32 = torch.ones(4, 4), torch.ones(32, 32)
    both = inherent_preservation_loss(img_s, img_t, z_s, z_t, mask32, mask4)
    latent = inherent_preservation_loss(None, None, z_s, z_t, None, mask4)
    assert latent.item() == pytest.approx(1.0) and both.item() == pytest.approx(1.25)


@pytest.mark.parametrize("max_step", [1.0, 0.25])
def test_a_spiking_gradient_moves_x0_no_more_than_guidance_max_step(tiny_guided_pipe, max_step):
    # λ_rs 1e6 stands in for one of Φ's backward spikes; step 0's x̂0 before guidance is the unguided run's
    def first_x0(**settings):
        seen = {}
        tiny_guided_pipe.edit(_edit(method="mrgd", lambda_rs=1e6, lambda_is=0.0, lambda_ip=0.0, keywords=0, **settings),
                              callback=lambda s: seen.setdefault(s["step"], s["x0"][1].clone()))
        return seen[0]

    plain = first_x0(guidance=False)
    move = lambda x0: float((x0 - plain).pow(2).mean().sqrt())  # noqa: E731
    assert move(first_x0(guidance_max_step=None)) > 2 * max_step  # the spike, unlimited
    assert move(first_x0(guidance_max_step=max_step)) == pytest.approx(max_step, rel=1e-3)


def test_guiding_every_kth_step_weighs_l_ip_k_times_where_it_runs(tiny_guided_pipe):
    pipe = tiny_guided_pipe
    _, decode = pipe.guidance_decoder("full")

    def guide(**settings):
        return _guide(pipe, _edit(method="mrgd", lambda_rs=3.0, lambda_is=2.0, lambda_ip=300.0, **settings), decode)

    every, second = guide(guidance_every=1), guide(guidance_every=2)
    for step in range(THREE_REGION_EDIT["steps"]):
        one, two = every.weights(step), second.weights(step)
        assert (two.rs, two.is_, two.ip) == (one.rs, one.is_, 2 * one.ip)
    assert any(every.weights(step).ip > 0 for step in range(THREE_REGION_EDIT["steps"]))


def test_ip_reach_keeps_l_ip_from_moving_the_edited_or_added_latents(tiny_guided_pipe):
    from mrgd.pipeline import SOURCE, TARGET

    pipe = tiny_guided_pipe
    _, decode = pipe.guidance_decoder("full")
    torch.manual_seed(0)
    x0 = {SOURCE: torch.randn(1, 4, 8, 8), TARGET: torch.randn(1, 4, 8, 8)}
    grads = {}
    for reach in ("image", "inherent", "added"):
        guide = _guide(pipe, _edit(method="mrgd", lambda_rs=0.0, lambda_is=0.0, lambda_ip=1.0, ip_reach=reach), decode)
        target = x0[TARGET].clone().requires_grad_()
        loss, _ = guide.loss(decode, {SOURCE: x0[SOURCE], TARGET: target}, 10)
        (grads[reach],) = guide._gradients(loss, [target])
    mask = inherent_mask(guide.edited, guide.hw)
    hole = mask == 0
    assert hole.any() and (mask == 1).any()
    # through the decoder the pixel term reaches into the edited boxes; confined, it does not, and is unchanged outside
    assert grads["image"][..., hole].abs().max() > 0
    assert grads["inherent"][..., hole].abs().max() == 0
    assert torch.allclose(grads["inherent"], mask * grads["image"], atol=1e-7)
    # "added": out of the added box (toy) only; the modified and removed boxes still feel L_IP
    added = inherent_mask(guide.added, guide.hw)
    assert len(guide.added) == 1 and (added == 0).sum() < hole.sum()
    assert grads["added"][..., added == 0].abs().max() == 0
    assert grads["added"][..., hole & (added == 1)].abs().max() > 0
    assert torch.allclose(grads["added"], added * grads["image"], atol=1e-7)


def test_checkpointed_guidance_decode_gives_the_same_pixels_and_leaves_the_vae_as_it_was(tiny_guided_pipe, monkeypatch):
    pipe = tiny_guided_pipe
    calls = []
    enable = type(pipe.vae).enable_gradient_checkpointing
    monkeypatch.setattr(type(pipe.vae), "enable_gradient_checkpointing", lambda self: calls.append(1) or enable(self))
    during_backward = []
    gradients = Guide._gradients
    monkeypatch.setattr(Guide, "_gradients",
                        lambda self, *a: during_backward.append(pipe.vae.is_gradient_checkpointing) or gradients(self, *a))
    kept = pipe.edit(_edit(method="mrgd", guidance_checkpoint=False))
    assert not calls and not any(during_backward) and not kept.info["guidance_checkpoint"]
    checkpointed = pipe.edit(_edit(method="mrgd", guidance_checkpoint=True))
    assert calls and not pipe.vae.is_gradient_checkpointing and checkpointed.info["guidance_checkpoint"]
    # still on in the backward pass: a block must recompute as it ran forward (nested checkpoints and all)
    assert during_backward[-1] is True
    assert np.array_equal(np.asarray(kept.target), np.asarray(checkpointed.target))
    auto = pipe.edit(_edit(method="mrgd"))  # a 64² canvas: below CHECKPOINT_FROM_PIXELS, nothing recomputed
    assert len(calls) == len(checkpointed.info["guidance_losses"]) and np.array_equal(np.asarray(auto.target),
                                                                                    np.asarray(kept.target))
    # a failing guided step still switches it off again
    monkeypatch.setattr(pipe, "decode_tensor", lambda z: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pipe.edit(_edit(method="mrgd", guidance_checkpoint=True))
    assert not pipe.vae.is_gradient_checkpointing
