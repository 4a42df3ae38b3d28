"""An analysis describes one graph: a user pass run between ``fxprune.analyze`` and a pass
that reads the analysis makes that pass refuse (PassOrderError naming it), never slice a
graph the analysis no longer describes; fxprune's own edits (gates, indicators) keep it.

Graph before and after the user pass of the regression case (an MLP's hidden activation)::

    fc1 -> act -> fc2            fc1 -> act -> mean(-1) -> sub -> fc2

``h - h.mean(-1)`` mixes every hidden channel, so slicing the MLP with the stale analysis gave
a model 0.24 relative off the zeroed original; now it is refused, and after a fresh
``fxprune.analyze`` the hidden channels stay dense.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.fx
from genmodels import budget, build, vit_specs
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxprune
from exactness import outputs, rel_err, zeroed_original
from fxprune.errors import FxPruneError, PassOrderError, PlanError
from fxprune.meta import ANALYSIS_FINGERPRINT_KEY
from fxprune.passes.insert_gates import InsertGates, gate_modules
from fxprune.passes.slice import Slice
from fxprune.passes.sync_head_ranks import SyncHeadRanks
from fxprune.pipeline import prepare
from fxprune.planning.oneshot import plan as make_plan


def _mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    return m.eval(), torch.randn(4, 8)


def _center_hidden(gm: torch.fx.GraphModule) -> None:
    """The user pass: ``h - h.mean(-1)`` on the input of the last Linear."""
    fc2 = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
    h = fc2.args[0]
    with gm.graph.inserting_before(fc2):
        mean = gm.graph.call_method("mean", (h, -1), {"keepdim": True})
        centered = gm.graph.call_function(operator.sub, (h, mean))
    fc2.args = (centered,) + tuple(fc2.args[1:])
    gm.recompile()


def test_user_pass_between_analyze_and_slice_is_refused():
    model, x = _mlp()
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    before = [n.op for n in gm.graph.nodes]
    _center_hidden(gm)
    assert [n.op for n in gm.graph.nodes] == before[:3] + ["call_method", "call_function"] + \
        before[3:]
    keep = {0: np.arange(16).reshape(1, 16) < 8}
    with pytest.raises(PassOrderError, match=r"\[slice\] the graph changed after analyze: "
                       r"run fxprune.analyze again"):
        Slice(keep=keep)(gm)
    with pytest.raises(PassOrderError, match=r"\[insert-gates\] the graph changed"):
        InsertGates()(gm)


def test_after_a_fresh_analyze_the_centered_channels_stay_dense():
    model, x = _mlp()
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    _center_hidden(gm)
    analysis = fxprune.analyze(gm)  # the remedy the error names
    assert not any(g.prunable for g in analysis.groups)
    with pytest.raises(PlanError, match="no prunable channel group"):
        fxprune.prune(gm, x, macs_ratio=0.5)


def test_user_pass_between_insert_gates_and_slice_is_refused():
    model, x = _mlp()
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    gated = InsertGates()(gm).graph_module   # fxprune's own edit keeps the analysis current
    SyncHeadRanks()(gated)
    _center_hidden(gated)
    with pytest.raises(PassOrderError, match=r"\[slice\] the graph changed"):
        Slice()(gated)


def test_own_pipeline_keeps_the_stamp():
    model, x = _mlp()
    gm = fxprune.trace(model, x)
    analysis = fxprune.analyze(gm)
    gated = InsertGates()(gm).graph_module
    assert gated.meta[ANALYSIS_FINGERPRINT_KEY] != analysis.fingerprint  # re-stamped
    for gate in gate_modules(gated).values():
        gate.set_mask(torch.arange(16).reshape(1, 16) < 8)
    sliced = Slice()(gated).graph_module
    assert ANALYSIS_FINGERPRINT_KEY not in sliced.meta  # the analysis is gone with it
    torch.testing.assert_close(sliced(x), zeroed_original(model, sliced.meta["fxprune.plan"])(x))


def test_training_the_weights_keeps_the_analysis():
    model, x = _mlp()
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(2.0)
    Slice(keep={0: np.arange(16).reshape(1, 16) < 8})(gm)  # values changed, graph did not


# --------------------------------------------------------------------------------------------
# property: a random rewrite between analyze and slice gives an exact model or a typed refusal

REWRITES = ("center", "scale", "neg-residual", "none")


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, how: str) -> None:
    """Insert a user op after ``node`` (a tensor of shape (..., C)) feeding all its users."""
    graph = gm.graph
    users = list(node.users)
    with graph.inserting_after(node):
        if how == "center":
            mean = graph.call_method("mean", (node, -1), {"keepdim": True})
            with graph.inserting_after(mean):
                new = graph.call_function(operator.sub, (node, mean))
        elif how == "scale":
            new = graph.call_function(operator.mul, (node, 0.5))
        else:  # neg-residual: x - x.flip(-1) mixes channels across the last dim
            flip = graph.call_method("flip", (node, -1))
            with graph.inserting_after(flip):
                new = graph.call_function(operator.sub, (node, flip))
    for user in users:
        user.replace_input_with(node, new)
    graph.lint()
    gm.recompile()


@settings(max_examples=budget(40), deadline=None)
@given(vit_specs(max_depth=2), st.data())
def test_random_rewrite_between_analyze_and_slice_is_exact_or_refused(spec, data):
    model, x, _ = build(spec)
    try:
        decided = make_plan(model, x, macs_ratio=0.6, criterion="l1", align=1)
    except FxPruneError:
        event("nothing prunable")
        return
    gm = decided.graph_module
    candidates = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")
                  and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].ndim >= 2
                  and n.users]
    how = data.draw(st.sampled_from(REWRITES), label="rewrite")
    if how != "none":
        node = data.draw(st.sampled_from(candidates), label="node")
        _rewrite(gm, node, how)
    try:
        sliced = Slice(keep=decided.masks)(gm).graph_module
    except FxPruneError as exc:
        assert isinstance(exc, PassOrderError) and how != "none", exc
        event("refused")
        return
    assert how == "none"
    event("exact")
    assert rel_err(outputs(sliced, x), outputs(zeroed_original(model, sliced.meta[
        "fxprune.plan"]), x)) < 1e-4


def test_prepare_then_analyze_is_current():
    model, x = _mlp()
    gm, _ = prepare(fxprune.trace(model, x))
    fxprune.analyze(gm)
    InsertGates()(gm)
