"""Grouped convolutions (1 < groups < in channels: ResNeXt-style blocks, ResNeSt's split
attention, EfficientViT's multi-scale q/k/v aggregation). Output channel ``o`` reads only the
input channels of its group, so a plan must keep the same count of channels in every group on
both sides, and every kept row must still read its own group's inputs. The analysis reads the
group as a batch letter of the contraction (like heads): both sides become groups with one
"head" per convolution group. Where the parts cannot be kept equal (they cut across attention
heads) or the weight is not a plain parameter, the channels stay dense with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original


def _block(groups=4):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(8, 16, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, groups=groups), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 8, 1)).eval()
        model[3].running_mean.uniform_(-0.5, 0.5)
        model[3].running_var.uniform_(0.5, 2.0)
        return model, torch.randn(2, 8, 6, 6)


def _group_holding(analysis, gm, node_name, dim=1):
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return next(g for g in analysis.groups if (node, dim) in g.members)


def test_both_sides_of_a_grouped_conv_get_one_head_per_conv_group():
    model, x = _block()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    into, out_of = _group_holding(a, gm, "_1"), _group_holding(a, gm, "_2")
    # 16 inputs read in 4 groups of 4, 32 outputs written in 4 groups of 8
    assert (into.num_heads, into.size, into.frozen) == (4, 4, None)
    assert (out_of.num_heads, out_of.size, out_of.frozen) == (4, 8, None)
    # head h of each side is the conv group h: channels 4h..4h+3 in, 8h..8h+7 out
    for group, per in ((into, 4), (out_of, 8)):
        rows = [sorted(int(np.nonzero(group.layout.ravel() == c)[0][0]) // per
                       for c in row) for row in group.layout]
        assert [set(r) for r in rows] == [{h} for h in range(4)]


def test_gated_equals_sliced_and_the_conv_keeps_its_groups():
    model, x = _block()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    into, out_of = _group_holding(a, gm, "_1"), _group_holding(a, gm, "_2")
    rng = np.random.default_rng(0)
    masks = {}
    for group, keep in ((into, 2), (out_of, 5)):  # the same count in every conv group
        m = np.zeros(group.layout.shape, bool)
        for row in m:
            row[rng.choice(len(row), keep, replace=False)] = True
        masks[group.index] = m
    before = gm.get_submodule("2")
    assert (before.in_channels, before.out_channels, before.groups) == (16, 32, 4)
    gated, sliced = gated_and_sliced(gm, masks)
    after = sliced.get_submodule("2")
    assert (after.in_channels, after.out_channels, after.groups) == (8, 20, 4)
    assert tuple(after.weight.shape) == (20, 2, 3, 3)
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5


@pytest.mark.parametrize("ratio", [0.6, 0.3, 0.02])
def test_prune_is_exact_down_to_one_channel_per_group(ratio):
    model, x = _block()
    with pytest.warns(UserWarning) if ratio == 0.02 else _no_warning():
        pruned = fxprune.prune(model, x, macs_ratio=ratio, align=1, criterion="l1")
    conv = pruned.get_submodule("2")
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    if ratio == 0.02:  # the floor: one channel per group on the input side
        assert conv.in_channels == 4 and conv.weight.shape[1] == 1
    ref = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5
    assert pruned.meta["fxprune.macs_ratio"] == pytest.approx(
        fxprune.count_macs(pruned, x) / fxprune.count_macs(model, x), abs=1e-4)


class _FunctionalGrouped(nn.Module):
    """The grouped conv as ``F.conv2d`` (as exported graphs call it)."""

    def __init__(self, weight_scale=None):
        super().__init__()
        self.inp = nn.Conv2d(8, 16, 1)
        self.weight = nn.Parameter(torch.randn(24, 4, 1, 1) * 0.3)
        self.out = nn.Conv2d(24, 8, 1)
        self.weight_scale = weight_scale

    def forward(self, x):
        w = self.weight if self.weight_scale is None else self.weight * self.weight_scale
        return self.out(F.gelu(F.conv2d(torch.relu(self.inp(x)), w, groups=4)))


def test_functional_grouped_conv_prunes_exactly():
    torch.manual_seed(1)
    model, x = _FunctionalGrouped().eval(), torch.randn(2, 8, 5, 5)
    pruned = fxprune.prune(model, x, macs_ratio=0.5, align=1, criterion="l1")
    plan = pruned.meta["fxprune.plan"]
    kept_rows, kept_in = plan["weight"][0].numel(), plan["inp.weight"][0].numel()
    assert kept_rows % 4 == 0 and kept_rows < 24 and kept_in % 4 == 0 and kept_in < 16
    # the weight's columns index the inputs of each group: kept_in / 4 of them per group
    assert tuple(pruned.get_parameter("weight").shape) == (kept_rows, kept_in // 4, 1, 1)
    ref = outputs(zeroed_original(model, plan), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5


def test_refused_a_computed_weight_leaves_the_input_dense():
    torch.manual_seed(1)
    model, x = _FunctionalGrouped(weight_scale=2.0).eval(), torch.randn(2, 8, 5, 5)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    into = _group_holding(a, gm, "relu")
    assert into.frozen is not None and "grouped convolution (groups=4)" in into.frozen
    assert [g.frozen is None for g in a.groups] == [False]  # nothing else is readable
    with pytest.raises(fxprune.PlanError, match="grouped convolution"):
        fxprune.prune(model, x, macs_ratio=0.8, align=1, criterion="l1")


class _AttentionThenGroupedConv(nn.Module):
    """Attention whose merged heads (2 heads of 8) feed a grouped 1x1 conv over the channels
    seen as an image: with ``groups=2`` each conv group is one head, with ``groups=4`` each
    conv group is half a head."""

    def __init__(self, groups):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.qkv = nn.Linear(16, 48)
        self.mix = nn.Conv2d(16, 16, 1, groups=groups)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        B, N, _ = x.shape
        x = self.embed(x)
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 16)
        o = self.mix(o.transpose(1, 2).reshape(B, 16, 4, 4)).flatten(2).transpose(1, 2)
        return self.head((x + o).mean(1))


def _v_group(model, x):
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    assert len(a.attention) == 1
    return a.groups[a.attention[0].v_group]


def test_conv_groups_made_of_whole_heads_keep_v_prunable():
    torch.manual_seed(2)
    model, x = _AttentionThenGroupedConv(groups=2).eval(), torch.randn(2, 16, 6)
    v = _v_group(model, x)
    assert v.frozen is None and v.num_heads == 2
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1, criterion="l1")
    assert pruned.get_submodule("mix").groups == 2
    assert pruned.get_submodule("mix").in_channels < 16
    ref = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5


def test_refused_conv_groups_that_cut_across_heads():
    torch.manual_seed(2)
    model, x = _AttentionThenGroupedConv(groups=4).eval(), torch.randn(2, 16, 6)
    v = _v_group(model, x)
    # equal counts per head could still leave the two halves of a head unequal
    assert v.frozen is not None and "cut across the group's 2 heads" in v.frozen
    pruned = fxprune.prune(model, x, macs_ratio=0.8, align=1, criterion="l1")
    assert pruned.get_submodule("mix").in_channels == 16
    ref = outputs(zeroed_original(model, pruned.meta["fxprune.plan"]), x)
    assert rel_err(outputs(pruned, x), ref) < 1e-5


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_refused_depthwise_with_a_channel_multiplier_stays_as_it_was():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 4, 5, 5)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    into = _group_holding(a, gm, "_1")
    assert into.frozen is not None and "grouped convolution (groups=8)" in into.frozen
    assert not any(g.frozen is None for g in a.groups)
