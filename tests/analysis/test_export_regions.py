"""Constructs that only ``torch.export`` graphs have, seen by the analysis.

* A ``with torch.autocast(...)`` block (ReLU linear attention runs its products in float32
  that way) becomes one ``wrap_with_autocast`` call of a nested graph: the analysis could not
  see into it and froze everything reaching it. It is inlined between ``_enter_autocast`` and
  ``_exit_autocast`` calls, so the graph still computes exactly what it did.
* In-place activations (``nn.Hardswish(inplace=True)`` is ``aten.hardswish_``) and functional
  pools (``aten.adaptive_avg_pool2d``) had no rule and froze the channels through them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original
from fxprune.autocast_regions import inline_autocast_regions
from fxprune.meta import COMPS_KEY


class _Block(nn.Module):
    def __init__(self, c=8, hidden=16, pool_channels=False):
        super().__init__()
        self.pool_channels = pool_channels
        self.expand = nn.Conv2d(c, hidden, 1)
        self.act = nn.Hardswish(inplace=True)
        self.project = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        h = self.act(self.expand(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            g = h.float() @ h.float().transpose(-1, -2)  # mixes the spatial dims only
        h = h + 0.1 * g.mean(-1, keepdim=True)
        if self.pool_channels:  # a pool over the channels themselves: refused
            h = F.avg_pool1d(h.flatten(2).transpose(1, 2), 2).transpose(1, 2).reshape(
                h.shape[0], -1, *h.shape[2:])
            h = torch.cat([h, h], 1)
        return x + self.project(h)


class _Net(nn.Module):
    def __init__(self, pool_channels=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Block(pool_channels=pool_channels)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _exported(pool_channels=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = _Net(pool_channels).eval(), torch.randn(2, 3, 6, 6)
    return model, x, torch.export.export(model, (x,))


def test_autocast_region_is_inlined_and_computes_the_same():
    model, x, ep = _exported()
    gm = ep.module()
    hop = torch.ops.higher_order.wrap_with_autocast
    before = [n.name for n in gm.graph.nodes if n.target is hop]
    assert len(before) == 1
    want = outputs(gm, x)
    assert inline_autocast_regions(gm) == 1
    gm.recompile()
    targets = [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes]
    assert not any(n.target is hop for n in gm.graph.nodes)
    assert "_enter_autocast" in targets and "_exit_autocast" in targets
    assert targets.index("_enter_autocast") < targets.index("matmul.default") \
        < targets.index("_exit_autocast")
    assert torch.equal(outputs(gm, x), want)


def test_hidden_channels_through_autocast_inplace_act_and_pool_prune_exactly():
    model, x, ep = _exported()
    gm = fxprune.trace(ep, x)
    a = fxprune.analyze(gm)
    assert a.opaque == []
    hidden = [g for g in a.groups if g.size == 16]
    assert len(hidden) == 1 and hidden[0].prunable, [(g.size, g.frozen) for g in a.groups]
    g = hidden[0]
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 3, 7, 8, 15]] = False
    gated, sliced = gated_and_sliced(gm, {g.index: keep.numpy().reshape(g.layout.shape)})
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5

    pruned = fxprune.prune(ep, x, macs_ratio=0.7, criterion="l1", align=1)
    plan = pruned.meta["fxprune.plan"]
    assert any(dims for dims in plan.values())
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


def test_a_pool_over_the_channels_is_refused():
    model, x, ep = _exported(pool_channels=True)
    gm = fxprune.trace(ep, x)
    a = fxprune.analyze(gm)
    expand = next(n for n in gm.graph.nodes if n.op == "call_function"
                  and "expand" in str(n.args[1]))
    (lab, span), = expand.meta[COMPS_KEY]
    channels = np.unique(a.components.channel_of(lab))
    assert len(channels) == 16
    reasons = {a.components.frozen_reason.get(int(c)) for c in channels}
    assert len(reasons) == 1 and "pooling along channels" in reasons.pop()
    assert all(a.group_of_channel[c] < 0 or not a.groups[a.group_of_channel[c]].prunable
               for c in channels if c < len(a.group_of_channel))


@pytest.mark.slow
def test_timm_efficientvit_mit_prunes_its_convolutions_exactly():
    """The whole model was refused before (nothing prunable); its LiteMLA attention stays
    dense (q/k/v pass a grouped convolution, frozen with that reason)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b1", pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with pytest.warns(UserWarning, match="traced it with torch.export"):
        pruned = fxprune.prune(model, x, macs_ratio=0.7)
    report = pruned.meta["fxprune.report"]
    assert report["target_met"] and report["pruned_groups"]
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


def test_planner_prices_a_functional_convs_pruned_inputs():
    """In an exported graph every conv is ``aten.conv2d`` on a weight ``get_attr``: the MACs
    saved on the consumer's input side come from the input's shape (the weight node is not a
    member of the group). Before, the saving was underestimated and the plan overshot the
    target (efficientvit_b1 stopped at 0.49 for a target of 0.7)."""
    from fxprune.passes.slice import Slice
    from fxprune.planning.cost import CostModel

    model, x, ep = _exported()
    gm = fxprune.trace(ep, x)
    a = fxprune.analyze(gm)
    g = next(g for g in a.groups if g.size == 16)
    keep = np.ones(g.layout.shape, bool)
    keep[:, :5] = False
    real = fxprune.count_macs(gm) - fxprune.count_macs(Slice(keep={g.index: keep})(gm)
                                                       .graph_module)
    assert real > 0
    assert CostModel(gm, a).saving([g], g.layout[:, :5].ravel()) == real
