import math

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from hypothesis import given, settings
from hypothesis import strategies as st

from mrgd.fusion import (
    LatentBox,
    clear_mask,
    composite,
    context_window,
    feather_mask,
    group_by_size,
    grow_box,
    initial_noise,
    latent_box,
    needs_canvas_fallback,
    pad_to_multiple,
    under_weights,
    unpad,
    within,
)

# ---------------------------------------------------------------- latent_box


def test_latent_box_exact_values():
    box = latent_box((0.25, 0.5, 0.5, 0.25), (512, 512))
    assert box == LatentBox(y0=32, y1=48, x0=16, x1=48)
    assert (box.h, box.w, box.size) == (16, 32, (16, 32))


def test_latent_box_fractional_values_floor_origin_ceil_size():
    # 0.3*128/8 = 4.8 -> ceil 5 (and float error in 0.3*128 must not push exact values up)
    box = latent_box((0.3, 0.25, 0.3, 0.25), (128, 128))
    assert box == LatentBox(y0=4, y1=8, x0=4, x1=9)


def test_latent_box_float_error_does_not_shift_exact_values():
    # 0.29*800/8 = 28.999999999999996 in floats: floor must still give 29, ceil must not give 30
    box = latent_box((0.29, 0.0, 0.29, 1.0), (800, 512))
    assert (box.x0, box.w) == (29, 29)


def test_latent_box_non_square_canvas():
    # W=768, H=512: latent 96 wide, 64 high
    box = latent_box((0.5, 0.5, 0.5, 0.5), (768, 512))
    assert box == LatentBox(y0=32, y1=64, x0=48, x1=96)


def test_latent_box_clamps_to_canvas_and_min_size():
    assert latent_box((0.8, 0.9, 0.5, 0.5), (512, 512)) == LatentBox(y0=57, y1=64, x0=51, x1=64)
    tiny = latent_box((0.5, 0.5, 0.0, 0.0), (512, 512))
    assert tiny.size == (1, 1)
    edge = latent_box((1.0, 1.0, 0.1, 0.1), (512, 512))
    assert edge == LatentBox(y0=63, y1=64, x0=63, x1=64)
    full = latent_box((-0.1, 0.0, 1.5, 1.0), (512, 512))
    assert full == LatentBox(y0=0, y1=64, x0=0, x1=64)


def test_slices_index_last_two_dims():
    x = torch.arange(2 * 3 * 6 * 6).reshape(2, 3, 6, 6)
    box = LatentBox(y0=1, y1=3, x0=2, x1=5)
    assert torch.equal(x[box.slices], x[..., 1:3, 2:5])
    assert torch.equal(x[0, 0][box.slices], x[0, 0, 1:3, 2:5])


# ---------------------------------------------------------------- feather_mask


def test_feather_mask_5x7_hand_computed():
    # r = floor(5/2 * 0.8) = 2: d=0 -> 0, d=1 -> 0.25, d>=2 -> 1
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0.25, 0.25, 0.25, 0.25, 0.25, 0],
            [0, 0.25, 1, 1, 1, 0.25, 0],
            [0, 0.25, 0.25, 0.25, 0.25, 0.25, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    mask = feather_mask(5, 7, 0.8)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("h, w", [(5, 7), (6, 8), (9, 9), (10, 10), (7, 12), (33, 20)])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_feather_mask_symmetric_edge_zero_interior_one(h, w, ratio):
    mask = feather_mask(h, w, ratio)
    assert mask.shape == (h, w)
    assert torch.equal(mask, mask.flip(0))
    assert torch.equal(mask, mask.flip(1))
    if h == w:
        assert torch.equal(mask, mask.T)
    assert torch.equal(feather_mask(w, h, ratio), mask.T)
    radius = int(min(h, w) / 2 * ratio)
    if radius > 0:
        assert mask[0].eq(0).all() and mask[:, 0].eq(0).all()
        assert mask[-1].eq(0).all() and mask[:, -1].eq(0).all()
    # the centre reaches 1 only when its edge distance reaches r (not for even sides at ratio 1)
    centre_distance = (min(h, w) - 1) // 2
    assert (mask[h // 2, w // 2] == 1) == (centre_distance >= radius)
    assert ((mask >= 0) & (mask <= 1)).all()


def test_feather_mask_zero_radius_is_ones():
    assert torch.equal(feather_mask(3, 8, 0.2), torch.ones(3, 8))  # floor(1.5*0.2) = 0
    assert torch.equal(feather_mask(4, 4, 0.0), torch.ones(4, 4))


def test_feather_mask_even_size_values():
    # 6x6, ratio 1: r = 3, d = 0,1,2,2,1,0 along a row through the centre
    mask = feather_mask(6, 6, 1.0)
    assert torch.allclose(mask[2], torch.tensor([0, 1 / 9, 4 / 9, 4 / 9, 1 / 9, 0]))


# ---------------------------------------------------------------- composite

FULL = LatentBox(0, 4, 0, 4)


def _const(value, h=4, w=4):
    return torch.full((1, 2, h, w), float(value))


def test_composite_single_full_background_returns_it():
    bg = torch.randn(1, 2, 4, 4)
    out = composite(torch.zeros(1, 2, 4, 4), [(FULL, bg)], [])
    assert torch.equal(out, bg)


def test_composite_foreground_with_mask_one_replaces():
    box = LatentBox(1, 3, 1, 4)
    fg = torch.randn(1, 2, 2, 3)
    out = composite(torch.zeros(1, 2, 4, 4), [(FULL, _const(5))], [(box, fg, torch.ones(2, 3))])
    assert torch.equal(out[box.slices], fg)
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[box.slices] = False
    assert out[..., outside].eq(5).all()


def test_composite_two_overlapping_foregrounds_average():
    a, b = LatentBox(0, 4, 0, 3), LatentBox(0, 4, 1, 4)
    out = composite(
        torch.zeros(1, 2, 4, 4),
        [(FULL, _const(0))],
        [(a, _const(2, 4, 3), torch.ones(4, 3)), (b, _const(4, 4, 3), torch.ones(4, 3))],
    )
    assert out[..., 0].eq(2).all()
    assert out[..., 1:3].eq(3).all()
    assert out[..., 3].eq(4).all()


def test_composite_mask_is_averaged_over_overlap():
    a, b = LatentBox(0, 4, 0, 4), LatentBox(0, 4, 0, 4)
    out = composite(
        torch.zeros(1, 2, 4, 4),
        [(FULL, _const(0))],
        [(a, _const(2), torch.ones(4, 4)), (b, _const(2), torch.zeros(4, 4))],
    )
    assert torch.allclose(out, _const(1))  # m = 0.5, fg = 2, bg = 0


def test_composite_half_mask_blends():
    out = composite(
        torch.zeros(1, 2, 4, 4), [(FULL, _const(2))], [(FULL, _const(6), torch.full((4, 4), 0.25))]
    )
    assert torch.allclose(out, _const(3))  # 0.75*2 + 0.25*6


def test_composite_backgrounds_average_and_uncovered_take_canvas():
    left, mid = LatentBox(0, 4, 0, 2), LatentBox(0, 4, 1, 3)
    out = composite(_const(-1), [(left, _const(2, 4, 2)), (mid, _const(4, 4, 2))], [])
    assert out[..., 0].eq(2).all()
    assert out[..., 1].eq(3).all()
    assert out[..., 2].eq(4).all()
    assert out[..., 3].eq(-1).all()


def test_composite_foreground_over_uncovered_blends_with_canvas():
    box = LatentBox(0, 2, 0, 2)
    out = composite(_const(10), [], [(box, _const(0, 2, 2), torch.full((2, 2), 0.5))])
    assert out[box.slices].eq(5).all()
    assert out[..., 2:, :].eq(10).all()


def test_composite_returns_new_tensor_and_keeps_dtype():
    canvas = _const(1).half()
    out = composite(canvas, [(FULL, _const(3).half())], [])
    assert out.dtype == torch.float16
    assert out.data_ptr() != canvas.data_ptr()
    assert canvas.eq(1).all()


def test_composite_rejects_mismatched_mask():
    with pytest.raises(ValueError):
        composite(_const(0), [], [(FULL, _const(1), torch.ones(3, 4))])


def test_composite_weights_of_one_are_the_plain_means():
    a, b = LatentBox(0, 4, 0, 3), LatentBox(0, 4, 1, 4)
    fgs = [(a, _const(2, 4, 3), torch.full((4, 3), 0.5)), (b, _const(4, 4, 3), torch.ones(4, 3))]
    plain = composite(_const(0), [(FULL, _const(1))], fgs)
    weighted = composite(_const(0), [(FULL, _const(1))], [(*f, torch.ones(f[2].shape)) for f in fgs])
    assert torch.equal(plain, weighted)


def test_composite_weight_zero_drops_a_crop_and_a_low_total_fades_to_the_background():
    box = LatentBox(0, 4, 0, 4)
    top, under = _const(8), _const(2)
    out = composite(_const(0), [(FULL, _const(1))],
                    [(box, top, torch.ones(4, 4)), (box, under, torch.ones(4, 4), torch.zeros(4, 4))])
    assert torch.allclose(out, top)  # the weight-0 crop is not averaged in
    faded = composite(_const(0), [(FULL, _const(1))], [(box, top, torch.ones(4, 4), torch.full((4, 4), 0.25))])
    assert torch.allclose(faded, _const(0.75 * 1 + 0.25 * 8))
    gone = composite(_const(0), [(FULL, _const(1))], [(box, top, torch.ones(4, 4), torch.zeros(4, 4))])
    assert torch.allclose(gone, _const(1))
    with pytest.raises(ValueError):
        composite(_const(0), [], [(box, top, torch.ones(4, 4), torch.ones(3, 4))])


def test_an_edited_box_on_top_takes_its_overlap_from_its_own_crop():
    inherent, added = LatentBox(0, 4, 0, 3), LatentBox(0, 4, 1, 4)
    added_mask = torch.ones(4, 3)
    (weight,) = under_weights((4, 4), [(added, added_mask)], [inherent])
    assert weight[:, 0].eq(1).all() and weight[:, 1:].eq(0).all()  # 1 outside the added box, 0 under its core
    out = composite(_const(0), [(FULL, _const(0))],
                    [(inherent, _const(2, 4, 3), torch.ones(4, 3), weight), (added, _const(6, 4, 3), added_mask)])
    assert out[..., 0].eq(2).all() and out[..., 1:].eq(6).all()  # the averaged composite gave 4 in the overlap
    feathered = feather_mask(4, 3, 1.0)
    (soft,) = under_weights((4, 4), [(added, feathered)], [inherent])
    assert torch.allclose(soft[..., 1:], 1 - feathered[..., :2])


def test_clear_mask_and_grow_box():
    box = LatentBox(2, 6, 2, 6)
    mask = clear_mask((8, 8), [box], 0.0)
    assert mask[box.slices].eq(0).all() and mask.sum() == 64 - 16
    soft = clear_mask((8, 8), [box], 1.0)
    assert soft[2, 2] == 1 and soft[3, 3] == 0.75 and soft[0, 0] == 1  # hole feathered inside the box (r = 2)
    assert grow_box(box, 0.25, (8, 8)) == LatentBox(1, 7, 1, 7)
    assert grow_box(LatentBox(0, 4, 5, 8), 0.5, (8, 8)) == LatentBox(0, 6, 3, 8)  # clamped
    assert grow_box(box, 0.0, (8, 8)) == box


def test_needs_canvas_fallback():
    assert not needs_canvas_fallback((4, 4), [FULL])
    assert needs_canvas_fallback((4, 4), [])
    assert needs_canvas_fallback((4, 4), [LatentBox(0, 4, 0, 3)])
    assert not needs_canvas_fallback((4, 4), [LatentBox(0, 4, 0, 3), LatentBox(0, 4, 2, 4)])


# ---------------------------------------------------------------- initial_noise

SHAPE = (2, 4, 16, 16)


def test_initial_noise_without_regions_matches_diffusers():
    ours = initial_noise(SHAPE, torch.Generator("cpu").manual_seed(7), [])
    reference = randn_tensor(SHAPE, generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    assert torch.equal(ours, reference)


def test_initial_noise_seeded_box_takes_its_own_draw():
    box = LatentBox(2, 7, 3, 12)
    ours = initial_noise(SHAPE, torch.Generator("cpu").manual_seed(7), [(box, 123)])
    region = torch.randn((2, 4, 5, 9), generator=torch.Generator("cpu").manual_seed(123))
    glob = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(ours[box.slices], region)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[box.slices] = False
    assert torch.equal(ours[..., outside], glob[..., outside])


def test_initial_noise_overlap_is_sum_over_sqrt_count():
    a, b, c = LatentBox(0, 8, 0, 8), LatentBox(4, 12, 4, 12), LatentBox(6, 10, 6, 10)
    ours = initial_noise(SHAPE, torch.Generator("cpu").manual_seed(0), [(a, 1), (b, 2), (c, 3)])
    expected = torch.zeros(SHAPE)
    for box, seed in [(a, 1), (b, 2), (c, 3)]:
        expected[box.slices] += torch.randn((2, 4, box.h, box.w), generator=torch.Generator().manual_seed(seed))
    # counts by construction: 3 on rows/cols 6:8, 2 on the rest of a∩b and of b∩c
    expected[..., 6:8, 6:8] /= 3**0.5
    for ys, xs in [(slice(4, 6), slice(4, 8)), (slice(6, 8), slice(4, 6))]:
        expected[..., ys, xs] /= 2**0.5
    for ys, xs in [(slice(8, 10), slice(6, 10)), (slice(6, 8), slice(8, 10))]:
        expected[..., ys, xs] /= 2**0.5
    # region-only pixels of a, b, c keep n / 1; check the whole union
    union = torch.zeros(16, 16, dtype=torch.bool)
    for box in (a, b, c):
        union[box.slices] = True
    assert torch.allclose(ours[..., union], expected[..., union], atol=1e-6)


def test_initial_noise_overlap_keeps_unit_variance():
    box = LatentBox(0, 64, 0, 64)
    noise = initial_noise((1, 4, 64, 64), torch.Generator().manual_seed(0), [(box, 10), (box, 11), (box, 12)])
    assert abs(noise.std().item() - 1) < 0.03
    assert abs(noise.mean().item()) < 0.03


def test_initial_noise_dtype():
    noise = initial_noise(SHAPE, torch.Generator().manual_seed(0), [(LatentBox(0, 4, 0, 4), 1)], dtype=torch.float16)
    assert noise.dtype == torch.float16


# ---------------------------------------------------------------- padding and grouping


@pytest.mark.parametrize("h, w", [(8, 8), (5, 13), (1, 1), (16, 9)])
def test_pad_unpad_round_trip(h, w):
    x = torch.randn(2, 4, h, w)
    padded, hw = pad_to_multiple(x, 8)
    assert hw == (h, w)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert padded.shape[-2] - h < 8 and padded.shape[-1] - w < 8
    assert torch.equal(unpad(padded, hw), x)
    # replicate: the padded strip repeats the last row / column
    assert torch.equal(padded[..., -1, :w], x[..., -1, :])
    assert torch.equal(padded[..., :h, -1], x[..., :, -1])


def test_group_by_size():
    boxes = [LatentBox(0, 4, 0, 8), LatentBox(0, 2, 0, 2), LatentBox(4, 8, 0, 8), LatentBox(1, 3, 5, 7)]
    groups = group_by_size(boxes)
    assert groups == {(4, 8): [0, 2], (2, 2): [1, 3]}
    assert list(groups) == [(4, 8), (2, 2)]


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 40), st.integers(8, 40), st.integers(0, 39), st.integers(0, 39), st.integers(1, 40),
       st.integers(1, 40), st.sampled_from([1, 2, 4, 8]), st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]))
def test_context_window_holds_the_box_inside_the_canvas(ch, cw, y0, x0, h, w, multiple, context):
    y0, x0 = min(y0, ch - 1), min(x0, cw - 1)
    box = LatentBox(y0, min(y0 + h, ch), x0, min(x0 + w, cw))
    win = context_window(box, (ch, cw), multiple, context)
    assert 0 <= win.y0 <= box.y0 and box.y1 <= win.y1 <= ch
    assert 0 <= win.x0 <= box.x0 and box.x1 <= win.x1 <= cw
    for length, box_len, canvas in ((win.h, box.h, ch), (win.w, box.w, cw)):
        # each side grows by ceil(context x length), then to a multiple, unless the canvas itself is the limit
        grown = box_len + 2 * math.ceil(round(context * box_len, 6))
        assert length == min(canvas, -(-grown // multiple) * multiple)
        assert length % multiple == 0 or length == canvas
    x = torch.randn(1, 2, ch, cw)
    assert torch.equal(x[win.slices][within(box, win)], x[box.slices])


def test_context_window_centres_the_box_and_keeps_exact_crops():
    assert context_window(LatentBox(4, 8, 4, 8), (16, 16), 4) == LatentBox(4, 8, 4, 8)
    assert context_window(LatentBox(4, 8, 4, 8), (16, 16), 4, context=0.5) == LatentBox(2, 10, 2, 10)
    # 3 rows + 1 a side -> 8 rows, clamped at the top; 3 columns at the right edge -> shifted left
    assert context_window(LatentBox(0, 3, 13, 16), (16, 16), 4, context=0.25) == LatentBox(0, 8, 8, 16)
