"""Multi-region sampling on a tiny random model: control, hooks, determinism, batching."""

import copy

import numpy as np
import pytest
import torch

from conftest import THREE_REGION_EDIT
from mrgd.attention import ControlledAttnProcessor, cross_alpha, refine_mapping, self_replace_active
from mrgd.layout import PAPERS_RULES, Edit


def _edit(**mrgd):
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["mrgd"] = {"method": "p2p", **mrgd}
    return Edit.from_dict(data)


def _processor_types(unet):
    return {type(p) for p in unet.attn_processors.values()}


def test_hooks_removed_after_run_and_after_failure(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe.edit(_edit())
    assert dict(tiny_pipe.unet.attn_processors) == before

    def explode(state):
        assert ControlledAttnProcessor in _processor_types(tiny_pipe.unet)  # installed during the run
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_pipe.edit(_edit(), callback=explode)
    assert dict(tiny_pipe.unet.attn_processors) == before
    assert ControlledAttnProcessor not in _processor_types(tiny_pipe.unet)


def test_same_seed_same_pixels_and_seed_matters(tiny_pipe):
    a = tiny_pipe.edit(_edit())
    b = tiny_pipe.edit(_edit())
    assert np.array_equal(np.asarray(a.target), np.asarray(b.target))
    assert np.array_equal(np.asarray(a.source), np.asarray(b.source))
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["seed"] = 8
    c = tiny_pipe.edit(Edit.from_dict(data))
    assert not np.array_equal(np.asarray(a.source), np.asarray(c.source))


def test_the_unet_gets_its_timestep_as_a_tensor_made_once_on_the_device(tiny_pipe):
    """A Python int timestep becomes a new tensor copied to the GPU inside every UNet call (a host-device wait per
    call); the loop hands the UNet one made once, equal to what diffusers would make of the int."""
    from mrgd.runtime import device_constant

    seen = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    try:
        tiny_pipe.edit(_edit())
    finally:
        handle.remove()
    assert seen and all(torch.is_tensor(t) and t.dtype == torch.long and t.device == tiny_pipe.device for t in seen)
    first = seen[0]
    assert first is device_constant((int(first),), tiny_pipe.device)  # the same tensor at every call of that step
    assert list(dict.fromkeys(int(t) for t in seen)) == [int(t) for t in tiny_pipe.scheduler.timesteps]


def test_source_is_never_changed_by_control(tiny_pipe):
    """S is denoised the same with and without attention control (only T rows are edited)."""
    p2p = tiny_pipe.edit(_edit())
    md = tiny_pipe.edit(_edit(method="multidiffusion", use_total=False))
    no_total = tiny_pipe.edit(_edit(use_total=False))
    assert torch.equal(p2p.latents["source"], tiny_pipe.edit(_edit()).latents["source"])
    # without r_total, p2p and multidiffusion share the source (up to SDPA vs explicit-softmax rounding);
    # only the target differs
    assert torch.allclose(no_total.latents["source"], md.latents["source"], rtol=1e-3, atol=1e-3)
    assert (no_total.latents["target"] - md.latents["target"]).abs().max() > 0.1


def _attention_layer(cross: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4)


def _reference_probs(layer, x, context):
    b = x.shape[0]
    q = layer.to_q(x).view(b, -1, 2, 4).transpose(1, 2)
    k = layer.to_k(context).view(b, -1, 2, 4).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * layer.scale).softmax(-1)


def test_processor_without_control_is_sdpa():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mrgd.attention import AttentionState

    layer = _attention_layer(cross=True)
    x, ctx = torch.randn(2, 9, 8), torch.randn(2, 5, 6)
    ours = ControlledAttnProcessor(AttentionState(), "down_blocks.0.attn2.processor", 0, True)(layer, x, ctx)
    assert torch.allclose(ours, AttnProcessor2_0()(layer, x, ctx), atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_cross_attention_follow_blends_source_map_into_target(alpha):
    from mrgd.attention import AttentionState, Follow

    layer = _attention_layer(cross=True)
    x, ctx = torch.randn(2, 9, 8), torch.randn(2, 5, 6)
    state = AttentionState(follows=[Follow(0, 1, alpha, False)])
    out = ControlledAttnProcessor(state, "up_blocks.1.attn2.processor", 1, True)(layer, x, ctx)
    probs = _reference_probs(layer, x, ctx)
    mixed = alpha * probs[0] + (1 - alpha) * probs[1]
    v = layer.to_v(ctx).view(2, -1, 2, 4).transpose(1, 2)
    expected_t = (mixed @ v[1]).transpose(0, 1).reshape(9, 8)
    expected_t = layer.to_out[0](expected_t)
    assert torch.allclose(out[1], expected_t, atol=1e-5)
    expected_s = layer.to_out[0]((probs[0] @ v[0]).transpose(0, 1).reshape(9, 8))
    assert torch.allclose(out[0], expected_s, atol=1e-5)  # the source row is untouched


def test_self_attention_replaced_only_at_low_levels():
    from mrgd.attention import AttentionState, Follow

    layer = _attention_layer(cross=False)
    x = torch.randn(2, 9, 8)
    state = AttentionState(low_levels=frozenset({1}), follows=[Follow(0, 1, 0.0, True)])
    probs = _reference_probs(layer, x, x)
    v = layer.to_v(x).view(2, -1, 2, 4).transpose(1, 2)
    replaced = layer.to_out[0]((probs[0] @ v[1]).transpose(0, 1).reshape(9, 8))
    low = ControlledAttnProcessor(state, "mid_block.attn1.processor", 1, False)(layer, x)
    high = ControlledAttnProcessor(state, "down_blocks.0.attn1.processor", 0, False)(layer, x)
    assert torch.allclose(low[1], replaced, atol=1e-5)
    assert not torch.allclose(high[1], replaced, atol=1e-3)


def test_equal_size_crops_share_unet_calls(tiny_pipe):
    edit = Edit.from_dict({**THREE_REGION_EDIT, "region_context": 0, "mrgd": {"method": "multidiffusion"}})
    result = tiny_pipe.edit(edit)
    steps = THREE_REGION_EDIT["steps"]
    # per step: one call for the 8x8 background (S and T), one for the padded 4x4 crops of every other region
    assert result.info["unet_calls"] == 2 * steps
    assert max(result.info["unet_batch_sizes"]) >= 8


def test_region_context_windows_see_the_canvas(tiny_pipe):
    """With context, a 4x4 box on an 8x8 canvas is denoised inside the whole canvas, sharing one call per step,
    except the added region, whose object must fit its box: it keeps its 4x4 crop (a second call, the target's
    uncond + cond rows only). The picture differs from padded crops'; a lone full-canvas background is unchanged."""
    steps = THREE_REGION_EDIT["steps"]
    with_context = tiny_pipe.edit(Edit.from_dict({**THREE_REGION_EDIT, "region_context": 0.5,
                                                  "mrgd": {"method": "multidiffusion"}}))
    assert with_context.info["unet_calls"] == 2 * steps
    assert sorted(set(with_context.info["unet_batch_sizes"]))[0] == 2
    without = tiny_pipe.edit(Edit.from_dict({**THREE_REGION_EDIT, "region_context": 0,
                                             "mrgd": {"method": "multidiffusion"}}))
    assert not np.array_equal(np.asarray(with_context.target), np.asarray(without.target))
    plain = {**THREE_REGION_EDIT, "regions": THREE_REGION_EDIT["regions"][:1], "mrgd": {"method": "multidiffusion"}}
    a = tiny_pipe.edit(Edit.from_dict({**plain, "region_context": 0.5}))
    b = tiny_pipe.edit(Edit.from_dict({**plain, "region_context": 0}))
    assert np.array_equal(np.asarray(a.source), np.asarray(b.source))


def test_generate_uncovered_pixels_use_global_prompt(tiny_pipe):
    from mrgd.layout import Layout

    layout = Layout.from_dict({"size": [64, 64], "steps": 3, "prompt": "sky", "region_context": 0,
                               "regions": [{"id": "a", "box": [0.25, 0.25, 0.5, 0.5], "prompt": "a red circle"}]})
    result = tiny_pipe.generate(layout)
    assert result.info["unet_calls"] == 3 * 2  # the full-canvas fallback and the box
    assert np.asarray(result.image).std() > 0


def test_schedules():
    assert cross_alpha(0, 0.6, 20) == 1.0
    assert cross_alpha(6, 0.6, 20) == pytest.approx(1 - 6 / 12)
    assert cross_alpha(12, 0.6, 20) == 0.0
    assert cross_alpha(11, 0.6, 20, "step") == 1.0 and cross_alpha(12, 0.6, 20, "step") == 0.0
    assert self_replace_active(5, 0.3, 20) and not self_replace_active(6, 0.3, 20)


def test_refine_mapping_aligns_shared_tokens():
    mapper, alpha = refine_mapping([1, 5, 6, 2], [1, 5, 9, 9, 6, 2])
    assert mapper.tolist() == [0, 1, 2, 3, 2, 3]
    assert alpha.tolist() == [1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_guidance_input_size_is_read_from_the_saved_image_processor(tmp_path, kind):
    """CLIPSeg rd64 feeds 352 px through a ViT-style processor; our family a CLIP-style one (transformers 5 hands
    back a SizeDict, not a dict)."""
    from transformers import CLIPImageProcessor, ViTImageProcessor

    from mrgd.models import _processor_size

    if kind == "clip":
        CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}).save_pretrained(tmp_path)
    else:
        ViTImageProcessor(size={"height": 352, "width": 352}).save_pretrained(tmp_path)
    assert _processor_size(tmp_path) == (96 if kind == "clip" else 352)
    assert _processor_size(tmp_path / "missing") is None


# MRGD's composite switches, with guidance, keywords and KSSA off so that only the composite differs
BARE = {"method": "mrgd", "guidance": False, "keywords": 0, "kssa": False, **PAPERS_RULES}


def _overlapping_addition(**mrgd):
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["regions"][3]["box"] = [0.3, 0.55, 0.45, 0.4]  # the added toy now overlaps the inherent ball
    data["mrgd"] = {**BARE, **mrgd}
    return Edit.from_dict(data)


def test_edited_on_top_changes_only_the_image_and_place_where_an_edited_box_overlaps(tiny_pipe):
    plain = tiny_pipe.edit(_edit(**BARE))
    assert torch.equal(plain.latents["target"], tiny_pipe.edit(_edit(**{**BARE, "edited_on_top": ["added"]})).latents["target"])
    before, after = (tiny_pipe.edit(_overlapping_addition(**m)) for m in ({}, {"edited_on_top": ["added"]}))
    assert torch.equal(before.latents["source"], after.latents["source"])  # the toy is only in the target
    assert not torch.equal(before.latents["target"], after.latents["target"])


def test_the_baselines_keep_the_papers_composite(tiny_pipe):
    """edited_on_top and total_clears_removed are MRGD's: P2P* and MultiDiffusion ignore them."""
    for method in ("p2p", "multidiffusion"):
        papers, ours = (tiny_pipe.edit(_overlapping_addition(**{**m, "method": method}))
                        for m in ({}, {"edited_on_top": ["added", "removed"], "total_clears_removed": True}))
        assert torch.equal(papers.latents["target"], ours.latents["target"]), method


def test_total_clears_removed_leaves_the_source_and_changes_the_target(tiny_pipe):
    # THREE_REGION_EDIT removes "rock"; r_total is active in the last steps of both images
    before, after = tiny_pipe.edit(_edit(**BARE)), tiny_pipe.edit(_edit(**{**BARE, "total_clears_removed": True}))
    assert torch.equal(before.latents["source"], after.latents["source"])
    assert not torch.equal(before.latents["target"], after.latents["target"])
    plans = tiny_pipe._plan_regions(_edit(**{**BARE, "total_clears_removed": True}), _edit().target(), 1, 5)
    total = next(p for p in plans if p.key == "__total__")
    # rock [0.05, 0.05, 0.3, 0.3] on a 64 px canvas (f = 8): latent rows and columns 0-2, too small to feather
    hole = torch.ones(8, 8)
    hole[:3, :3] = 0
    assert torch.equal(total.weight, hole)


def test_a_removed_box_on_top_clears_the_inherent_crops_under_it_in_the_target_only(tiny_pipe):
    data = copy.deepcopy(THREE_REGION_EDIT)
    data["regions"][4]["box"] = [0.05, 0.3, 0.3, 0.3]  # rock (removed) now reaches into the inherent ball's box
    data["mrgd"] = {**BARE, "edited_on_top": ["removed"]}
    edit = Edit.from_dict(data)
    source = tiny_pipe._plan_regions(edit, edit.source(), 0, 5)
    target = {p.key: p for p in tiny_pipe._plan_regions(edit, edit.target(), 1, 5)}
    assert all(p.weight is None and p.layer_rank == 0 for p in source)  # the source is what generate draws
    ball = target["ball"]  # latent rows 4-7, columns 0-3; rock covers rows 2-4, columns 0-2 (too small to feather)
    expected = torch.ones(ball.box.size)
    expected[:1, :3] = 0
    assert torch.equal(ball.weight, expected)
    assert target["kite"].weight is None or torch.equal(target["kite"].weight, torch.ones(target["kite"].box.size))
    plain = copy.deepcopy(data)
    plain["mrgd"] = BARE
    before, after = tiny_pipe.edit(Edit.from_dict(plain)), tiny_pipe.edit(edit)
    assert torch.equal(before.latents["source"], after.latents["source"])
    assert not torch.equal(before.latents["target"], after.latents["target"])


def test_a_follow_mask_keeps_the_targets_own_attention_where_it_is_zero():
    from mrgd.attention import AttentionState, Follow

    layer = _attention_layer(cross=False)
    x = torch.randn(2, 9, 8)
    keep = torch.ones(3, 3)
    keep[1:, 1:] = 0  # four of the nine query pixels keep their own self-attention
    # the mask is at latent resolution: 6×6, averaged to this level-1 layer's 3×3 queries
    latent_mask = torch.nn.functional.interpolate(keep[None, None], scale_factor=2)[0, 0]
    state = AttentionState(low_levels=frozenset({1}), follows=[Follow(0, 1, 0.0, True, follow_mask=latent_mask)])
    probs = _reference_probs(layer, x, x)
    v = layer.to_v(x).view(2, -1, 2, 4).transpose(1, 2)
    out = ControlledAttnProcessor(state, "mid_block.attn1.processor", 1, False)(layer, x)
    replaced = layer.to_out[0]((probs[0] @ v[1]).transpose(0, 1).reshape(9, 8))
    own = layer.to_out[0]((probs[1] @ v[1]).transpose(0, 1).reshape(9, 8))
    spared = (keep.flatten() == 0)
    assert torch.allclose(out[1][~spared], replaced[~spared], atol=1e-5)
    assert torch.allclose(out[1][spared], own[spared], atol=1e-5)
    assert not torch.allclose(replaced[spared], own[spared], atol=1e-3)


def test_spared_mask_is_zero_inside_boxes_in_window_coordinates():
    from mrgd.fusion import LatentBox, spared_mask

    window = LatentBox(2, 10, 4, 12)
    mask = spared_mask([LatentBox(0, 4, 10, 16), LatentBox(20, 24, 0, 4)], window, (8, 8))
    expected = torch.ones(8, 8)
    expected[0:2, 6:8] = 0  # rows 2-3, columns 10-11 of the canvas
    assert torch.equal(mask, expected)
    assert spared_mask([LatentBox(20, 24, 0, 4)], window, (8, 8)) is None


def test_own_attention_in_changes_only_mrgds_target(tiny_pipe):
    """Pixels of edited boxes keep their own attention in the background's and r_total's rows: MRGD's target
    changes where the edit has such a box; the source, and the baselines, never do."""
    plain = tiny_pipe.edit(_edit(**BARE))
    spared = tiny_pipe.edit(_edit(**{**BARE, "own_attention_in": ["added", "removed", "modified"]}))
    assert torch.equal(plain.latents["source"], spared.latents["source"])
    assert not torch.equal(plain.latents["target"], spared.latents["target"])
    p2p = [tiny_pipe.edit(_edit(**m)) for m in ({}, {"own_attention_in": ["added", "removed", "modified"]})]
    assert torch.equal(p2p[0].latents["target"], p2p[1].latents["target"])


@pytest.mark.parametrize("roles", [["added"], ["added", "modified"]])
def test_total_clears_edited_leaves_the_added_and_modified_boxes_to_their_own_crops(tiny_pipe, roles):
    def total_weight(**mrgd):
        edit = _edit(**{**BARE, **mrgd})
        plans = tiny_pipe._plan_regions(edit, edit.target(), 1, 5)
        return next(p for p in plans if p.key == "__total__").weight

    weight = total_weight(total_clears_edited=roles)
    # toy (added) covers latent rows and columns 4-7 of the 8x8 canvas, kite (modified) rows 0-3, columns 4-7
    assert torch.all(weight[5:7, 5:7] == 0)
    assert torch.all(weight[1:3, 5:7] == (0 if "modified" in roles else 1))
    assert torch.all(weight[4:, :3] == 1)  # the inherent ball keeps r_total
    assert total_weight(total_clears_edited=roles, method="p2p") is None  # the baselines keep §2's r_total
    assert total_weight() is None


def test_total_within_objects_keeps_r_total_to_each_images_foreground_boxes(tiny_pipe):
    edit = _edit(**{**BARE, "total_within": "objects"})
    weights = {image: next(p for p in tiny_pipe._plan_regions(edit, layout, image, 5) if p.key == "__total__").weight
               for image, layout in ((0, edit.source()), (1, edit.target()))}
    # 8x8 latent canvas, boxes too small to feather. Source: rock rows/cols 0-2, kite rows 0-3 cols 4-7, ball rows
    # 4-7 cols 0-3 (the toy's place, rows and cols 4-7, is empty); target: ball, kite, toy (the rock's place is)
    expected = {0: torch.ones(8, 8), 1: torch.ones(8, 8)}
    expected[0][4:, 4:] = expected[0][3, :4] = expected[0][:4, 3] = 0
    expected[1][:4, :4] = 0
    for image, weight in weights.items():
        assert torch.equal(weight, expected[image]), image
    canvas, objects = tiny_pipe.edit(_edit(**BARE)), tiny_pipe.edit(edit)
    assert not torch.equal(canvas.latents["source"], objects.latents["source"])  # both images: no stray objects
    papers, p2p = (tiny_pipe.edit(_edit(method="p2p", **m)) for m in ({}, {"total_within": "objects"}))
    assert torch.equal(papers.latents["target"], p2p.latents["target"])  # P2P* keeps §2's r_total


def test_compiled_unet_blocks_give_the_same_pictures_and_leave_the_processors_eager(tokenizer_dir):
    from conftest import make_tiny_components
    from mrgd.pipeline import MRGDPipeline

    pipe = MRGDPipeline(**make_tiny_components(tokenizer_dir), name="tiny")  # its own UNet: compiling is in place
    eager = pipe.edit(_edit())
    processors = dict(pipe.unet.attn_processors)
    assert pipe.compile() > 0 and pipe.compiled == "default"
    compiled = pipe.edit(_edit())
    assert compiled.info["compiled"] == "default" and eager.info["compiled"] is None
    for image in ("source", "target"):
        assert torch.allclose(compiled.latents[image], eager.latents[image], atol=1e-4)
    assert dict(pipe.unet.attn_processors) == processors  # the run's hooks went in and came out as before
