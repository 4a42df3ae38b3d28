"""Softmax or a reduction along one dim of channels that also span other dims.

A selective-kernel block (SKNet, ResNeSt's split attention) stacks its branches, computes one
weight per (branch, channel) with a conv whose rows are viewed as ``(branches, C)``, takes a
softmax over the branches and sums the weighted branches. Channel ``c`` of the block is the
fibre ``(:, c)`` of the weights: removing it removes whole softmaxes, which is exact. Before,
the softmax froze the weights (``softmax over channels``) while the branches' channels were
left prunable, so slicing the branches failed and every such group stayed dense.
A softmax over channels that live on that dim alone is still refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original


class _SelectiveKernel(nn.Module):
    def __init__(self, c: int = 12, paths: int = 2, hidden: int = 6, over_channels=False):
        super().__init__()
        self.paths, self.over_channels = paths, over_channels
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1 + i, dilation=1 + i)
                                   for i in range(paths))
        self.reduce = nn.Conv2d(c, hidden, 1)
        self.select = nn.Conv2d(hidden, paths * c, 1)

    def forward(self, x):
        xs = torch.stack([F.relu(conv(x)) for conv in self.convs], dim=1)
        w = self.select(F.relu(self.reduce(xs.sum(1).mean((2, 3), keepdim=True))))
        B, C, H, W = w.shape
        w = w.view(B, self.paths, C // self.paths, H, W)
        # over the branches (exact per channel), or over the channels themselves (refused)
        w = w.softmax(dim=2 if self.over_channels else 1)
        return (xs * w).sum(dim=1)


class _Net(nn.Module):
    def __init__(self, over_channels=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.sk = _SelectiveKernel(over_channels=over_channels)
        self.out = nn.Conv2d(12, 8, 1)

    def forward(self, x):
        return self.out(self.sk(F.relu(self.stem(x)))).mean((2, 3))


def _build(over_channels=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Net(over_channels).eval(), torch.randn(2, 3, 8, 8)


def _branch_group(a):
    """The group of the branch convs' output channels."""
    gs = [g for g in a.groups if any(n.target == "sk.convs.0" for n, _ in g.members)]
    assert len(gs) == 1
    return gs[0]


def test_softmax_over_branches_ties_the_weights_to_the_branch_channels():
    model, x = _build()
    a = fxprune.analyze(fxprune.trace(model, x))
    g = _branch_group(a)
    members = {n.target if n.op == "call_module" else n.name for n, _ in g.members}
    # the branch convs, the weight conv's rows (two per channel) and the softmax: one group
    assert {"sk.convs.0", "sk.convs.1", "sk.select", "softmax"} <= members, members
    assert g.prunable and g.kind == "mlp" and (g.num_heads, g.size) == (None, 12)


def test_selective_kernel_prunes_exactly():
    model, x = _build()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    g = _branch_group(a)
    keep = torch.ones(g.width, dtype=torch.bool)
    keep[[1, 4, 5, 9]] = False
    gated, sliced = gated_and_sliced(gm, {g.index: keep.numpy().reshape(g.layout.shape)})
    assert sliced.get_submodule("sk.convs.1").out_channels == 8
    assert sliced.get_submodule("sk.select").out_channels == 16  # both branches' weights
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5

    pruned = fxprune.prune(model, x, macs_ratio=0.7, criterion="l1", align=1)
    assert pruned.get_submodule("sk.convs.0").out_channels < 12
    assert pruned.get_submodule("sk.select").out_channels == \
        2 * pruned.get_submodule("sk.convs.0").out_channels
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


def test_softmax_over_the_channels_themselves_is_refused():
    model, x = _build(over_channels=True)
    a = fxprune.analyze(fxprune.trace(model, x))
    g = _branch_group(a)
    # tying the channels along the softmax leaves the branch dim as the weights' channels,
    # which meet the branches' plain branch dim in the product: frozen there
    assert not g.prunable
    assert "channels combined elementwise with a tensor that has no channel labels at mul" \
        in g.frozen
    pruned = fxprune.prune(model, x, macs_ratio=0.9, criterion="l1", align=1)
    assert pruned.get_submodule("sk.convs.0").out_channels == 12


@pytest.mark.parametrize("reduce", ["mean", "amax"])
def test_reduction_over_one_dim_of_a_two_dim_comp_ties_it(reduce):
    """Heads x channels reduced over the channels: each head is one unit (all or nothing)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(3, 5)

        def forward(self, x):
            h = F.relu(self.fc1(x)).reshape(x.shape[0], 3, 4)
            h = getattr(h, reduce)(dim=-1)
            return self.fc2(h)

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(4, 6)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    g = next(g for g in a.groups if any(n.target == "fc1" for n, _ in g.members))
    assert g.prunable and g.size == 3  # fc1's 12 rows in 3 tied fibres of 4
    keep = torch.tensor([True, False, True])
    gated, sliced = gated_and_sliced(gm, {g.index: keep.numpy().reshape(g.layout.shape)})
    assert sliced.get_submodule("fc1").out_features == 8
    assert sliced.get_submodule("fc2").in_features == 2
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["skresnet18"])
def test_timm_selective_kernel_prunes_exactly_to_the_target(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    pruned = fxprune.prune(model, x, macs_ratio=0.7)
    report = pruned.meta["fxprune.report"]
    assert abs(report["reached"] - 0.7) <= 0.02, report["reached"]
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4
