"""An attention whose q.k product is an op fxprune cannot read.

The scores then carry no head labels, while v's channels still live in heads: ``scores @ v``
pairs head ``h`` of the scores with head ``h`` of v, and nothing says which scores those are.
Pruning v per channel (as if it were a plain Linear output) gave heads of different widths and
a SliceError at slice time, which stopped the whole ``prune`` although the MLPs were fine.
The analysis now freezes v there with a reason, and the rest of the model is pruned exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import outputs, rel_err, zeroed_original


@torch.fx.wrap
def unreadable_scores(q, k):
    """Stands for any op without a rule (a custom kernel): fx keeps it as one opaque call."""
    return q @ k.transpose(-2, -1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, folded: bool):
        super().__init__()
        self.heads, self.folded = heads, folded
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H, D = self.heads, C // self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if self.folded:  # (B * H, N, D) for bmm
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
        attn = unreadable_scores(q, k * D ** -0.5).softmax(-1)
        out = torch.bmm(attn, v) if self.folded else attn @ v
        return self.proj(out.reshape(B, H, N, D).transpose(1, 2).reshape(B, N, C))


class _Net(nn.Module):
    def __init__(self, folded: bool, dim: int = 24, heads: int = 3):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.attn = _Attention(dim, heads, folded)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def _build(folded: bool):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Net(folded).eval(), torch.randn(2, 7, 5)


@pytest.mark.parametrize("folded", [False, True], ids=["4d", "folded_heads"])
def test_v_behind_an_unreadable_qk_product_is_frozen_with_the_reason(folded):
    model, x = _build(folded)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    assert a.attention == []  # the site cannot be seen
    assert any("unreadable_scores" in what for _, what in a.opaque), a.opaque
    v_rows = [g for g in a.groups if any(s.node.target == "attn.proj" for s in g.sinks)]
    assert len(v_rows) == 1 and not v_rows[0].prunable
    assert "batch dim (heads)" in v_rows[0].frozen
    fc2 = [g for g in a.groups if any(s.node.target == "fc2" for s in g.sinks)]
    assert [(g.size, g.prunable) for g in fc2] == [(32, True)]


@pytest.mark.parametrize("folded", [False, True], ids=["4d", "folded_heads"])
def test_the_rest_of_the_model_is_pruned_exactly(folded):
    """Before the fix: SliceError ("kept entries ... do not form a dense tensor")."""
    model, x = _build(folded)
    with pytest.warns(UserWarning, match="frozen groups stay dense"):
        pruned = fxprune.prune(model, x, macs_ratio=0.6, criterion="l1", align=1)
    assert pruned.get_submodule("fc1").out_features < 32
    assert pruned.get_submodule("attn.proj").in_features == 24
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4
