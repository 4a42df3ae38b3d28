"""Blocked local attention with halos (HaloNet): keys and values are read from overlapping
windows cut with ``Tensor.unfold`` (a window dim per spatial dim), and relative-position logits
are computed from q. ``unfold`` had no rule, so k and v lost their channel labels and every
q.k product froze q ("channels contracted against a tensor without channel labels"): 0 sites.
Windows along spatial dims now carry the channels through; windows cut along the channels
themselves are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original
from fxprune.meta import COMPS_KEY

PosEmbedRel = pytest.importorskip("timm.layers.halo_attn").PosEmbedRel


class _Halo(nn.Module):
    def __init__(self, dim=16, heads=2, block=2, halo=1, unfold_channels=False):
        super().__init__()
        self.h, self.d, self.block, self.halo = heads, dim // heads, block, halo
        self.win = block + 2 * halo
        self.unfold_channels = unfold_channels
        self.q = nn.Conv2d(dim, dim, 1, bias=False)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        # relative-position logits from q, as HaloNet computes them (shift by pad/flatten)
        self.pos = PosEmbedRel(block, self.win, self.d, scale=self.d ** -0.5)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        bs, nh, nw = self.block, H // self.block, W // self.block
        q = self.q(x).reshape(B * self.h, self.d, nh, bs, nw, bs).permute(0, 2, 4, 3, 5, 1)
        q = q.reshape(B * self.h, nh * nw, bs * bs, self.d)
        kv = F.pad(self.kv(x), [self.halo] * 4)
        if self.unfold_channels:  # windows over the channels: refused
            kv = kv.unfold(1, 2, 2).mean(-1).repeat(1, 2, 1, 1)
        kv = kv.unfold(2, self.win, bs).unfold(3, self.win, bs)
        kv = kv.reshape(B * self.h, 2 * self.d, nh * nw, -1).permute(0, 2, 3, 1)
        k, v = torch.split(kv, [self.d, self.d], dim=-1)
        attn = (q @ k.transpose(-1, -2)) * self.d ** -0.5 + self.pos(q)
        out = attn.softmax(-1) @ v  # (B*h, blocks, bs*bs, d)
        out = out.reshape(B, self.h, nh, nw, bs, bs, self.d).permute(0, 1, 6, 2, 4, 3, 5)
        return self.proj(out.reshape(B, C, H, W))


class _Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = _Halo(**kw)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.attn(x)
        return self.fc(x.mean((2, 3)))


def _build(**kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Net(**kw).eval(), torch.randn(2, 3, 8, 8)


def test_halo_attention_site_is_found_with_its_groups():
    model, x = _build()
    a = fxprune.analyze(fxprune.trace(model, x))
    assert len(a.attention) == 1
    site = a.attention[0]
    assert (site.num_heads, site.qk_head_dim, site.v_head_dim) == (2, 8, 8)
    qk, v = a.groups[site.qk_group], a.groups[site.v_group]
    assert qk.prunable and v.prunable, (qk.frozen, v.frozen)
    # q's channels meet the relative-position table's columns: every head keeps the same ones
    assert qk.shared_across_heads


def test_halo_attention_prunes_exactly():
    model, x = _build()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    site = a.attention[0]
    masks = {}
    for gi, drop in ((site.qk_group, [1, 6]), (site.v_group, [0, 3, 5])):
        g = a.groups[gi]
        keep = torch.ones(g.layout.shape, dtype=torch.bool)
        keep[:, drop] = False
        masks[gi] = keep.numpy()
    gated, sliced = gated_and_sliced(gm, masks)
    assert sliced.get_submodule("attn.q").out_channels == 12
    assert sliced.get_submodule("attn.kv").out_channels == 12 + 10
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5

    pruned = fxprune.prune(model, x, macs_ratio=0.7, criterion="l1", align=1)
    plan = pruned.meta["fxprune.plan"]
    assert pruned.get_submodule("attn.kv").out_channels < 32
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


def test_windows_cut_along_channels_are_refused():
    model, x = _build(unfold_channels=True)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    node = next(n for n in gm.graph.nodes if n.target == "attn.kv")
    (lab, _), = node.meta[COMPS_KEY]
    reasons = {a.components.frozen_reason.get(int(c))
               for c in np.unique(a.components.channel_of(lab))}
    assert len(reasons) == 1 and "unfold along channels" in reasons.pop()
    # k has no channel labels left, so q cannot be pruned against it either
    q = [g for g in a.groups if any(n.target == "attn.q" for n, _ in g.members)]
    assert q and all(not g.prunable for g in q)


@pytest.mark.slow
def test_timm_halonet_prunes_exactly_to_the_target():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("halonet_h1", pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    pruned = fxprune.prune(model, x, macs_ratio=0.7)
    report = pruned.meta["fxprune.report"]
    assert len(fxprune.analyze(model, x).attention) == 19
    assert abs(report["reached"] - 0.7) <= 0.02, report["reached"]
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4
