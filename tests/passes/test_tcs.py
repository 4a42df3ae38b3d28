"""Token Channel Selection pass: graph before/after, a hand-computed reference, the refusal."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import PlanError
from fxprune.models.reference import tiny_vit
from fxprune.passes.token_channel_selection import TokenChannelSelection


def _traced(model, x):
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    return gm


def test_graph_before_and_after():
    model, x = tiny_vit(depth=2).eval(), torch.randn(2, 3, 32, 32)
    gm = _traced(model, x)
    before = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(t.endswith("mlp.fc1") for t in before) == 2
    result = TokenChannelSelection(keep_ratio=0.5, sample=4)(gm)
    after = [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"]
    assert not any(t.endswith(("mlp.fc1", "mlp.fc2")) for t in after)
    assert sum(t.startswith("fxprune_tcs_") for t in after) == 2
    assert result.info["rewritten"] == 2
    # the input graph is untouched
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == before


def test_keep_everything_is_exact():
    model, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    gm = _traced(model, x)
    out = TokenChannelSelection(keep_ratio=1.0)(gm).graph_module
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), atol=1e-6)


def test_matches_hand_computed_reference():
    torch.manual_seed(0)
    model, x = tiny_vit(depth=1).eval(), torch.randn(2, 3, 32, 32)
    gm = _traced(model, x)
    out = TokenChannelSelection(keep_ratio=0.25, sample=5, seed=7)(gm).graph_module
    block = model.blocks[0]
    with torch.no_grad():
        # hand computation with the same random patch sample (generator seeded with 7)
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1) + model.pos_embed
        y = block.norm1(h)
        B, N, C = y.shape
        heads = block.attn.num_heads
        qkv = block.attn.qkv(y).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        h = h + block.attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v)
                                .transpose(1, 2).reshape(B, N, C))
        z = block.norm2(h)
        attn = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * (C // heads) ** -0.5, -1)
        attn = attn.mean(1)[:, 0]
        patches = torch.randperm(N - 1, generator=torch.Generator().manual_seed(7))[:5] + 1
        hidden = block.mlp.act(block.mlp.fc1(z))
        score = hidden[:, 0].abs().sum(0) + (attn[:, patches, None] * hidden[:, patches].abs()
                                             ).sum((0, 1))
        keep = max(1, round(0.25 * hidden.shape[-1]))
        kept = score.topk(keep).indices.sort().values
        mlp = torch.nn.functional.linear(block.mlp.act(torch.nn.functional.linear(
            z, block.mlp.fc1.weight[kept], block.mlp.fc1.bias[kept])),
            block.mlp.fc2.weight[:, kept], block.mlp.fc2.bias)
        h = model.norm(h + mlp)
        expected = model.head(h[:, 0])
        assert torch.allclose(out(x), expected, atol=1e-5)


def test_reduces_macs():
    model, x = tiny_vit(img_size=64).eval(), torch.randn(1, 3, 64, 64)
    gm = _traced(model, x)
    out = TokenChannelSelection(keep_ratio=0.5, sample=4)(gm).graph_module
    assert fxprune.count_macs(out) < 0.9 * fxprune.count_macs(gm)


def test_refuses_model_without_class_token():
    model, x = tiny_vit(class_token=False).eval(), torch.randn(1, 3, 32, 32)
    gm = _traced(model, x)
    with pytest.raises(PlanError, match="no class token"):
        TokenChannelSelection()(gm)
