"""Pooling attention (MViTv2): q, k and v are split into heads, pooled per head by a depthwise
conv over the head dim (shared by the heads) and normalised over the head dim. timm registers
the reshapes into and out of the pooled layout as functions torch.fx must not trace; where
fxprune's trace keeps them as leaves they were opaque and the attention went unseen (0 sites,
MLPs only). The preparation now inlines them: the site is found, q/k stay dense because the
LayerNorm normalises over their channels (refused, with that reason), v prunes exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprune
from exactness import outputs, rel_err, zeroed_original

mvitv2 = pytest.importorskip("timm.models.mvitv2")
# called by their global names, as timm calls them, so that torch.fx can keep them as leaves
reshape_pre_pool, reshape_post_pool = mvitv2.reshape_pre_pool, mvitv2.reshape_post_pool


class _PooledAttention(nn.Module):
    def __init__(self, dim=16, heads=2, grid=(4, 4)):
        super().__init__()
        self.h, self.d, self.grid = heads, dim // heads, list(grid)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.pool_q, self.pool_k, self.pool_v = (
            nn.Conv2d(self.d, self.d, 3, stride=s, padding=1, groups=self.d, bias=False)
            for s in (1, 2, 2))
        self.norm_q, self.norm_k = nn.LayerNorm(self.d), nn.LayerNorm(self.d)

    def _pool(self, t, pool):
        t, tok = reshape_pre_pool(t, self.grid, False)
        t, _ = reshape_post_pool(pool(t), self.h, tok)
        return t

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.norm_q(self._pool(q, self.pool_q))
        k = self.norm_k(self._pool(k, self.pool_k))
        v = self._pool(v, self.pool_v)
        attn = ((q * self.d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = _PooledAttention()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def _traced_with_leaves():
    """The model and its graph with timm's helpers kept as leaves, as fxprune's trace keeps
    them when a plain trace of the model fails."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = _Net().eval(), torch.randn(2, 16, 6)
    tracer = torch.fx.Tracer(autowrap_functions=(reshape_pre_pool, reshape_post_pool))
    gm = torch.fx.GraphModule(model, tracer.trace(model), "Net")
    assert sum(n.target in (reshape_pre_pool, reshape_post_pool) for n in gm.graph.nodes) == 6
    return model, x, fxprune.trace(gm, x)


def test_leaf_helpers_are_inlined_and_the_pooled_site_is_found():
    model, x, gm = _traced_with_leaves()
    assert fxprune.analyze(gm, prepare=False).attention == []  # leaves: unseen
    a = fxprune.analyze(gm, x)  # traced and prepared
    assert a.opaque == []
    assert len(a.attention) == 1
    site = a.attention[0]
    assert (site.num_heads, site.qk_head_dim, site.v_head_dim) == (2, 8, 8)
    qk, v = a.groups[site.qk_group], a.groups[site.v_group]
    assert not qk.prunable and "LayerNorm normalizes over these channels" in qk.frozen
    # v's pooling conv is shared by the heads: each head keeps the same channels
    assert v.prunable and v.shared_across_heads


def test_pooled_attention_prunes_exactly():
    model, x, gm = _traced_with_leaves()
    # the inlined reshapes fix the spatial sizes they were traced with: prune says so
    with pytest.warns(UserWarning, match="runs at the traced input size only"):
        pruned = fxprune.prune(gm, x, macs_ratio=0.75, criterion="l1", align=1)
    assert pruned.get_submodule("attn.pool_v").out_channels < 8
    assert pruned.get_submodule("attn.pool_q").out_channels == 8
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


@pytest.mark.slow
def test_timm_mvitv2_pooling_attention_is_found():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mvitv2_tiny", pretrained=False).eval()
    a = fxprune.analyze(model, torch.randn(1, 3, 224, 224))
    assert len(a.attention) == 10
    for site in a.attention:
        qk = a.groups[site.qk_group]
        assert not qk.prunable and "LayerNorm normalizes over these channels" in qk.frozen
