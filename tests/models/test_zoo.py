"""Sanity checks of the test zoo and the shipped reference ViTs: they run, trace, and have the
shapes and structure their truth claims."""

import pytest
import torch
import torch.fx

from fxprune.models.reference import digits_vit, tiny_vit
from zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_runs_and_traces(name):
    model, x, truth = ZOO[name]()
    assert not model.training
    assert x.shape == (2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 10)
        assert torch.isfinite(y).all()
        gm = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    assert set(truth) >= {"sites", "mlp_hidden", "frozen_qk"}
    for site in truth["sites"]:
        assert site["kind"] in {"softmax", "window", "linear"}
        # linear attention has no score scale (no softmax to temper)
        expected = 1.0 if site["kind"] == "linear" else site["qk_head_dim"] ** -0.5
        assert site["scale"] == pytest.approx(expected)
    # the Linear shapes agree with the truth: each site's output projection takes H * Dv
    # inputs, each MLP's fc2 takes the hidden width
    proj = [m for n, m in model.named_modules() if n.endswith("attn.proj")]
    fc2 = [m for n, m in model.named_modules() if n.endswith("mlp.fc2")]
    assert [p.in_features for p in proj] == [s["num_heads"] * s["v_head_dim"]
                                             for s in truth["sites"]]
    assert [f.in_features for f in fc2] == truth["mlp_hidden"]
    assert truth["frozen_qk"] is (name == "qk_layernorm")


def test_zoo_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m1, x1, _ = ZOO["rotary_qk"]()
    m2, x2, _ = ZOO["rotary_qk"]()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(x1, x2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    m3, _, _ = ZOO["rotary_qk"](seed=1)
    assert not torch.equal(next(m1.parameters()), next(m3.parameters()))


def test_zoo_variant_details():
    # a few claims from the truth that can be read off the modules directly
    assert tiny_vit(qk_dim=16).blocks[0].attn.qkv.out_features == 3 * (16 + 16 + 16)
    m, _, t = ZOO["qk_dim_differs"]()
    assert m.blocks[0].attn.qkv.out_features == 4 * (16 + 16 + 8)
    assert t["sites"][0]["qk_head_dim"] == 16 and t["sites"][0]["v_head_dim"] == 8
    m, _, t = ZOO["swiglu_mlp"]()
    assert m.blocks[0].mlp.fc1.out_features == 2 * t["mlp_hidden"][0]
    m, _, t = ZOO["qkv_no_bias"]()
    assert m.blocks[0].attn.qkv.bias is None
    m, _, t = ZOO["rel_pos_bias"]()
    attn = m.blocks[0].attn
    assert attn.relative_position_bias_table.shape == (49, t["sites"][0]["num_heads"])
    idx = attn.relative_position_index
    assert idx.shape == (16, 16) and idx.min() == 0 and idx.max() == 48
    assert torch.equal(idx.diagonal(), torch.full((16,), 24))  # zero offset -> centre entry
    assert ZOO["no_attention"]()[2]["sites"] == []


def test_rel_pos_bias_is_used():
    """Changing the bias table changes the output (the bias is really on the scores)."""
    m, x, _ = ZOO["rel_pos_bias"]()
    with torch.no_grad():
        y = m(x)
        for blk in m.blocks:
            blk.attn.relative_position_bias_table.zero_()
        assert not torch.allclose(m(x), y)


def test_rotary_is_a_rotation_of_pairs():
    """Rotate-half rotary keeps each (d, d + D/2) pair's norm: it only rotates the pair."""
    m, _, _ = ZOO["rotary_qk"]()
    attn = m.blocks[0].attn
    q = torch.randn(2, 2, 17, 16)
    r = q * attn.rope_cos + attn._rotate_half(q) * attn.rope_sin
    pair_norm = q[..., :8] ** 2 + q[..., 8:] ** 2
    torch.testing.assert_close(r[..., :8] ** 2 + r[..., 8:] ** 2, pair_norm)


@pytest.mark.parametrize("kwargs, x_shape, qkv_out", [
    ({}, (2, 3, 32, 32), 144),
    ({"qk_dim": 8}, (2, 3, 32, 32), 3 * (8 + 8 + 16)),
    ({"class_token": False, "qkv_bias": False}, (2, 3, 32, 32), 144),
])
def test_tiny_vit(kwargs, x_shape, qkv_out):
    model = tiny_vit(**kwargs).eval()
    x = torch.randn(x_shape)
    assert model.blocks[0].attn.qkv.out_features == qkv_out
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 10)
        gm = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


def test_digits_vit():
    model = digits_vit().eval()
    assert len(model.blocks) == 4
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.qk_head_dim, attn.v_head_dim) == (4, 16, 16)
    assert model.blocks[0].mlp.fc1.out_features == 128
    assert model.pos_embed.shape == (1, 17, 64)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert torch.fx.symbolic_trace(model)(x).shape == (2, 10)
