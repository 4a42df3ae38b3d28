"""Two patterns of real models (timm's MobileNetV5: RMSNorm2d written as
``x * rsqrt(x.pow(2).mean(channels) + eps)``, and multi-query attention calling SDPA with k/v
of one head broadcast over q's heads) that used to stay dense.

* A mean over all of a group's channels is a sink like a sum, and the slicer keeps its
  original divisor: the masked model averages zeros in place of the removed channels, so the
  sliced mean is scaled by ``kept / original``. Centering by that mean (a LayerNorm written
  out) and a variance over the channels are still refused.
* SDPA whose k/v batch dims are q's or 1 (broadcast) is read like the explicit product; k/v
  heads grouped by ``enable_gqa`` are refused (opaque, with the reason).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original


class _MeanNorm(nn.Module):
    """``kind``: "rms" (mean of squares), "center" (x - mean: a LayerNorm written out) or
    "var" (divide by the variance over channels)."""

    def __init__(self, width, kind):
        super().__init__()
        self.kind, self.w = kind, nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        if self.kind == "center":
            return (x - x.mean(-1, keepdim=True)) * self.w
        return x / (x.var(-1, keepdim=True) + 1e-3).sqrt() * self.w


class _Mlp(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 32), _MeanNorm(32, kind), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def _mlp(kind):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Mlp(kind).eval(), torch.randn(3, 5, 8)


def test_a_mean_over_channels_is_a_sink_and_keeps_its_divisor():
    model, x = _mlp("rms")
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    [hidden] = a.groups
    assert hidden.frozen is None and hidden.size == 32
    assert sorted(s.kind for s in hidden.sinks) == ["linear", "reduce"]
    mask = np.zeros(32, bool)
    mask[np.random.default_rng(0).choice(32, 12, replace=False)] = True
    gated, sliced = gated_and_sliced(gm, {hidden.index: mask})
    # before: mean feeds the add; after: the mean is scaled by 12/32 first
    means = [n for n in sliced.graph.nodes if n.op == "call_method" and n.target == "mean"]
    [scaled] = list(means[0].users)
    assert scaled.target is torch.mul and scaled.args[1] == pytest.approx(12 / 32)
    assert not any(n.target is torch.mul and n.args[0] is means[0]
                   for n in gm.graph.nodes)
    assert tuple(sliced.get_submodule("fc1").weight.shape) == (12, 8)
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5
    pruned = fxprune.prune(model, x, macs_ratio=0.5, align=1, criterion="l1")
    ref = outputs(zeroed_original(model, pruned), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5


@pytest.mark.parametrize("kind,why", [("center", "shifted by a value broadcast"),
                                      ("var", "var reduces over channels")])
def test_refused_centering_and_variance_over_channels(kind, why):
    model, x = _mlp(kind)
    [hidden] = fxprune.analyze(fxprune.trace(model, x)).groups
    assert hidden.frozen is not None and why in hidden.frozen


class _Mqa(nn.Module):
    """Multi-query attention: 4 q heads, one k/v head broadcast by SDPA (or, with ``gqa``, two
    k/v heads grouped by ``enable_gqa``)."""

    def __init__(self, gqa=False):
        super().__init__()
        self.kv_heads = 2 if gqa else 1
        self.q, self.o = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k, self.v = nn.Linear(32, 8 * self.kv_heads), nn.Linear(32, 8 * self.kv_heads)
        self.embed, self.head = nn.Linear(6, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, 4, 8).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.kv_heads, 8).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.kv_heads, 8).transpose(1, 2)
        extra = {"enable_gqa": True} if self.kv_heads > 1 else {}
        o = F.scaled_dot_product_attention(q, k, v, **extra)
        return self.head((x + self.o(o.transpose(1, 2).reshape(B, N, 32))).mean(1))


def test_sdpa_with_broadcast_kv_heads_is_a_site_and_prunes_exactly():
    torch.manual_seed(0)
    model, x = _Mqa().eval(), torch.randn(2, 7, 6)
    a = fxprune.analyze(fxprune.trace(model, x))
    assert a.opaque == [] and len(a.attention) == 1
    qk = a.groups[a.attention[0].qk_group]
    assert qk.frozen is None and qk.num_heads == 4 and qk.size == 8
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1, criterion="l1")
    kept_k = pruned.get_submodule("k").out_features
    # the q heads share k's channels: every head keeps the same ones
    assert kept_k < 8 and pruned.get_submodule("q").out_features == 4 * kept_k
    ref = outputs(zeroed_original(model, pruned), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5


def test_refused_sdpa_with_grouped_kv_heads():
    torch.manual_seed(0)
    model, x = _Mqa(gqa=True).eval(), torch.randn(2, 7, 6)
    a = fxprune.analyze(fxprune.trace(model, x))
    assert a.attention == []
    assert [w for _, w in a.opaque] == ["scaled_dot_product_attention with grouped heads"]
    assert not any(g.prunable for g in a.groups)  # q, k and v stay dense
    with pytest.raises(fxprune.PlanError, match="no prunable channel group"):
        fxprune.prune(model, x, macs_ratio=0.9, align=1, criterion="l1")
