"""KSSA (method.md §5): scaling key vectors inside SDPA equals scaling the logits of an explicit attention."""

import torch
from diffusers.models.attention_processor import Attention

from mrgd.attention import AttentionState, ControlledAttnProcessor


def _layers():
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4), Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)


def test_scaled_keys_equal_scaled_logits():
    self_attn, _ = _layers()
    x = torch.randn(2, 9, 8)
    pixels = torch.zeros(1, 9, dtype=torch.bool)
    pixels[0, [1, 4, 7]] = True
    state = AttentionState(kssa_rows=[1], kssa_scale=1.5)
    state._kssa_pixels[0] = pixels
    out = ControlledAttnProcessor(state, "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor", 0, False)(self_attn, x)

    q = self_attn.to_q(x).view(2, 9, 2, 4).transpose(1, 2)
    k = self_attn.to_k(x).view(2, 9, 2, 4).transpose(1, 2)
    v = self_attn.to_v(x).view(2, 9, 2, 4).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * self_attn.scale
    logits[1, :, :, [1, 4, 7]] *= 1.5  # the key columns of the selected pixels, row 1 only
    expected = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 8)
    expected = self_attn.to_out[0](expected)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not state._kssa_pixels  # used once: only the next self-attention layer


def test_down_block_cross_attention_picks_top_half_of_pixels_by_keyword_logits():
    _, cross = _layers()
    x, ctx = torch.randn(1, 8, 8), torch.randn(1, 5, 6)
    state = AttentionState(kssa_rows=[0], kssa_tokens={0: torch.tensor([2, 3])}, kssa_levels=frozenset({1}))
    ControlledAttnProcessor(state, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 1, True)(cross, x, ctx)
    picked = state._kssa_pixels[1]
    q = cross.to_q(x).view(1, 8, 2, 4).transpose(1, 2)
    k = cross.to_k(ctx).view(1, 5, 2, 4).transpose(1, 2)
    score = (q @ k.transpose(-1, -2) * cross.scale)[0][..., [2, 3]].sum(dim=(0, 2))
    assert picked.shape == (1, 8) and picked.sum() == 4
    assert set(picked[0].nonzero().flatten().tolist()) == set(score.topk(4).indices.tolist())
    # up-block cross-attention does not select
    state2 = AttentionState(kssa_rows=[0], kssa_tokens={0: torch.tensor([2, 3])}, kssa_levels=frozenset({1}))
    ControlledAttnProcessor(state2, "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 1, True)(cross, x, ctx)
    assert not state2._kssa_pixels


def test_kssa_lands_in_down_blocks_and_only_falls_back_to_the_decoder_with_one_layer_per_block():
    from mrgd.attention import _kssa_target

    def names(layers):
        out = []
        for level in range(2):
            for i in range(layers):
                out += [f"down_blocks.{level}.attentions.{i}.transformer_blocks.0.attn{a}.processor" for a in (1, 2)]
        out += [f"up_blocks.{3 - level}.attentions.0.transformer_blocks.0.attn1.processor" for level in range(2)]
        return out

    sd_like, ours = names(2), names(1)
    assert _kssa_target("down_blocks.0.attentions.1.transformer_blocks.0.attn1.processor", sd_like, 4)
    assert not _kssa_target("up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor", sd_like, 4)
    assert _kssa_target("up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor", ours, 4)
    assert not _kssa_target("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", ours, 4)


def test_kssa_never_changes_the_source(tiny_pipe):
    import copy

    from conftest import THREE_REGION_EDIT
    from mrgd.layout import Edit

    data = copy.deepcopy(THREE_REGION_EDIT)
    data["steps"] = 12

    def run(**mrgd):
        return tiny_pipe.edit(Edit.from_dict({**data, "mrgd": {"method": "mrgd", "guidance": False, **mrgd}}))

    with_kssa, without = run(keywords=2, kssa=True), run(keywords=2, kssa=False)
    assert torch.allclose(with_kssa.latents["source"], without.latents["source"], atol=1e-4)
    assert (with_kssa.latents["target"] - without.latents["target"]).abs().max() > 1e-3


def test_a_region_keyword_count_overrides_the_edit_setting(tiny_pipe):
    import copy

    from conftest import THREE_REGION_EDIT
    from mrgd.layout import Edit

    data = copy.deepcopy(THREE_REGION_EDIT)
    data["steps"] = 12
    data["regions"][1]["keyword_count"] = 1  # "a red circle": three candidate words
    data["mrgd"] = {"method": "mrgd", "guidance": False, "keywords": 3}
    chosen = tiny_pipe.edit(Edit.from_dict(data)).info["keywords"]
    first = data["regions"][1]["id"]
    for image in ("source", "target"):
        assert len(chosen[image][first]) == 1
        assert max(len(words) for rid, words in chosen[image].items() if rid != first) >= 2
