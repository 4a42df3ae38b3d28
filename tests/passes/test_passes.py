"""Graph-level tests of the pruning passes: ``insert-gates``, ``sync-head-ranks``, ``slice``,
``split-fused-heads`` (xDSL / FileCheck style: the graph before and after, the numerics, and
a case each pass must refuse).

Each pass: the graph before and after (op counts, specific nodes and their args, ``CHECK``
lines in order on ``gm.code``), the numerics (gates at 1 are bit-identical; gated with binary
gates == sliced == the zeroed original, fp32 1e-5 abs on unit-scale outputs) and the inputs the
pass must refuse (typed errors naming what to run first) or leave alone (``modified=False``).

Library bugs these tests found (rotary pairs ranked per position, stale analysis after
split-fused-heads, whole-head removal refused, align hiding an empty keep) are fixed; their
tests stay as regression tests.
"""

from __future__ import annotations

import functools
import math
import operator
import re

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, zeroed_original
from fxprune.amap.gates import ChannelGate
from fxprune.errors import PassOrderError, PlanError, SliceError
from fxprune.meta import GATES_KEY, PLAN_KEY
from fxprune.models.reference import tiny_vit
from fxprune.passes.insert_gates import InsertGates, gate_modules
from fxprune.passes.slice import Slice
from fxprune.passes.split_fused_heads import SplitFusedHeads
from fxprune.passes.sync_head_ranks import SyncHeadRanks, sync_scores
from fxprune.pipeline import prepare
from zoo import ZOO

ATOL = 1e-5
GATE_PREFIX = "fxprune_gate_"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: intra-op threads only add contention (3x slower on a busy 2-core
    machine). Restored afterwards so other test modules are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_entry(seed: int = 0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_vit(**kw).eval()
        x = torch.randn(2, 3, 32, 32)
    return model, x, None


ENTRIES = {**ZOO, "tiny_vit": _tiny_entry}
ATTENTION_ENTRIES = sorted(n for n in ENTRIES if n != "no_attention")


@functools.cache
def traced(name: str):
    """(model, x, gm, analysis): traced and analysed, no preparation. Tests never mutate it
    (every pass below runs with ``inplace=False``)."""
    model, x, _ = ENTRIES[name]()
    gm = fxprune.trace(model, x)
    return model, x, gm, fxprune.analyze(gm)


@functools.cache
def prepared(name: str):
    """(model, x, gm, analysis) after the preparation pipeline (split-fused-heads etc.)."""
    model, x, _ = ENTRIES[name]()
    gm, _log = prepare(fxprune.trace(model, x))
    return model, x, gm, fxprune.analyze(gm)


def gate_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith(GATE_PREFIX)]


def node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    found = [n for n in gm.graph.nodes if n.name == name]
    assert found, f"no node {name!r} in the graph"
    return found[0]


def op_count(gm: torch.fx.GraphModule, target) -> int:
    """Nodes calling ``target`` (a method name or a function)."""
    return sum(1 for n in gm.graph.nodes if n.op in ("call_method", "call_function")
               and (n.target == target or getattr(n.target, "__name__", None) == target))


def filecheck(code: str, *checks: str, not_: tuple[str, ...] = ()) -> None:
    """FileCheck: every ``CHECK`` regex matches a line after the previous match; no line
    matches a ``CHECK-NOT`` regex."""
    lines = code.splitlines()
    pos = 0
    for pattern in checks:
        while pos < len(lines) and not re.search(pattern, lines[pos]):
            pos += 1
        assert pos < len(lines), f"CHECK {pattern!r} not found in order in:\n{code}"
        pos += 1
    for pattern in not_:
        hits = [line for line in lines if re.search(pattern, line)]
        assert not hits, f"CHECK-NOT {pattern!r} matched {hits}"


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


def random_masks(analysis, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A random valid binary keep mask for every prunable group: each head keeps the same
    number of its own random channels (the same channels in every head where the group shares
    channels across heads); positions that are one channel (rotary pairs) go together."""
    masks = {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        layout = g.layout
        if g.shared_across_heads:
            units = np.unique(layout)
            chosen = rng.choice(units, rng.integers(1, len(units) + 1), replace=False)
            masks[g.index] = np.isin(layout, chosen)
            continue
        rows = [np.unique(row) for row in layout]
        k = int(rng.integers(1, len(rows[0]) + 1))
        masks[g.index] = np.stack([np.isin(layout[h], rng.choice(rows[h], k, replace=False))
                                   for h in range(layout.shape[0])])
    return masks


def set_gate_values(gm, fill) -> None:
    """``fill(group, shape) -> Tensor`` for every gated group."""
    for group, gate in gate_modules(gm).items():
        with torch.no_grad():
            gate.values.copy_(fill(group, tuple(gate.values.shape)))


def head_mask(shape, drop_head=None, per_head=None, rng=None) -> np.ndarray:
    """(heads, size) mask keeping ``per_head`` channels of every head (all if None)."""
    heads, size = shape
    mask = np.ones(shape, dtype=bool)
    if per_head is not None:
        mask[:] = False
        for h in range(heads):
            idx = rng.choice(size, per_head, replace=False) if rng is not None else \
                np.arange(per_head)
            mask[h, idx] = True
    if drop_head is not None:
        mask[drop_head] = False
    return mask


# --------------------------------------------------------------------------------------------
# insert-gates
# --------------------------------------------------------------------------------------------

def test_insert_gates_before_after_tiny_vit():
    model, x, gm, analysis = traced("tiny_vit")
    prunable = [g.index for g in analysis.groups if g.prunable]
    assert [analysis.groups[i].kind for i in prunable] == ["qk", "v", "mlp"] * 2
    # before: no gate anywhere
    assert gate_nodes(gm) == []
    code_before = gm.code

    result = InsertGates()(gm)
    out = result.graph_module
    assert result.modified and out is not gm
    # after: exactly one ChannelGate call_module per gate site (one site per group here)
    gates = gate_nodes(out)
    assert len(gates) == len(prunable) == 6
    assert all(isinstance(out.get_submodule(n.target), ChannelGate) for n in gates)
    assert result.info["gates"] == {g: [f"fxprune_gate_g{g}_0"] for g in prunable}
    assert out.meta[GATES_KEY] == result.info["gates"]
    assert len(result.changes) == 6
    assert sum(1 for n in out.graph.nodes if n.op == "call_module") == \
        sum(1 for n in gm.graph.nodes if n.op == "call_module") + 6
    # the input graph is left as it was
    assert gm.code == code_before and GATES_KEY not in gm.meta

    for site in analysis.attention:
        qk_gate = node(out, f"fxprune_gate_g{site.qk_group}_0")
        sdpa = node(out, site.qk_node.name)
        # qk gate right before SDPA, on the q operand only
        assert qk_gate.args == (node(out, site.q.name),)
        assert sdpa.args[0] is qk_gate and qk_gate.next is sdpa
        assert sdpa.args[1].name == site.k.name and sdpa.args[2].name == site.v.name
        # v gate right before the consuming Linear (the output projection)
        v_gate = node(out, f"fxprune_gate_g{site.v_group}_0")
        proj = node(out, site.proj.name)
        assert proj.op == "call_module" and isinstance(out.get_submodule(proj.target), nn.Linear)
        assert proj.args == (v_gate,) and v_gate.next is proj
        assert v_gate.args[0].target == "reshape"
    mlp_groups = [g for g in prunable if analysis.groups[g].kind == "mlp"]
    for i, group in enumerate(mlp_groups):
        mlp_gate = node(out, f"fxprune_gate_g{group}_0")
        fc2 = node(out, f"blocks_{i}_mlp_fc2")
        assert fc2.args == (mlp_gate,) and mlp_gate.args == (node(out, f"blocks_{i}_mlp_act"),)

    filecheck(
        out.code,
        r"^\s*unbind = permute\.unbind\(0\)",
        r"fxprune_gate_g1_0 = self\.fxprune_gate_g1_0\(getitem_4\)",
        r"scaled_dot_product_attention\(fxprune_gate_g1_0, getitem_5, getitem_6\)",
        r"fxprune_gate_g2_0 = self\.fxprune_gate_g2_0\(reshape_1\)",
        r"attn\.proj\(fxprune_gate_g2_0\)",
        r"fxprune_gate_g3_0 = self\.fxprune_gate_g3_0\(blocks_0_mlp_act\)",
        r"mlp\.fc2\(fxprune_gate_g3_0\)",
        r"fxprune_gate_g4_0 = self\.fxprune_gate_g4_0\(getitem_10\)",
        r"scaled_dot_product_attention_1 = .*attention\(fxprune_gate_g4_0,",
        r"attn\.proj\(fxprune_gate_g5_0\)",
        r"mlp\.fc2\(fxprune_gate_g6_0\)",
        not_=(r"fxprune_gate_g0", r"self\.fxprune_gate_g\d+_0\(getitem_5\)"))
    out.graph.lint()


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_insert_gates_at_one_is_bit_identical(name):
    model, x, gm, analysis = traced(name)
    out = InsertGates()(gm).graph_module
    expected_groups = {g.index for g in analysis.groups if g.prunable}
    assert set(out.meta[GATES_KEY]) == expected_groups
    assert len(gate_nodes(out)) >= len(expected_groups)
    for gate in gate_modules(out).values():
        assert torch.equal(gate.values, torch.ones_like(gate.values))
    with torch.no_grad():
        assert torch.equal(out(x), model(x))
        assert torch.equal(out(x), gm(x))


@pytest.mark.parametrize("name", ATTENTION_ENTRIES)
def test_insert_gates_qk_gate_on_q_operand(name):
    """Whatever the attention form (SDPA, q @ k^T, einsum, Swin's scaled q): the qk gate is the
    operand of the q.k product that was q, and k is never gated."""
    _, _, gm, analysis = traced(name)
    out = InsertGates()(gm).graph_module
    for site in analysis.attention:
        if analysis.groups[site.qk_group].frozen is not None:
            continue
        qk_node = node(out, site.qk_node.name)
        gates = [a for a in qk_node.args if isinstance(a, torch.fx.Node)
                 and str(a.target).startswith(GATE_PREFIX)]
        # one gate per q operand; linear attention also gates q's normaliser product and
        # the norms over q's and k's channels, so the index in the name varies
        assert len(gates) == 1 and gates[0].target.startswith(f"fxprune_gate_g{site.qk_group}_")
        gate = gates[0]
        assert gate.args[0].name == site.q.name
        q_position = 1 if op_count(out, "einsum") else 0  # einsum's args[0] is the equation
        assert qk_node.args[q_position] is gate
        assert not any(str(u.target).startswith(GATE_PREFIX) for u in node(out, site.k.name).users)


def test_insert_gates_frozen_groups_get_no_gate():
    model, x, gm, analysis = traced("qk_layernorm")
    frozen = {g.index for g in analysis.groups if g.frozen is not None}
    qk_groups = {s.qk_group for s in analysis.attention}
    assert qk_groups <= frozen  # LayerNorm over the head dim freezes q/k
    out = InsertGates()(gm).graph_module
    gated_groups = {out.get_submodule(n.target).group for n in gate_nodes(out)}
    assert gated_groups.isdisjoint(frozen)
    assert sorted(analysis.groups[g].kind for g in gated_groups) == ["mlp", "mlp", "v", "v"]
    assert len(gate_nodes(out)) == 4
    for site in analysis.attention:
        sdpa = node(out, site.qk_node.name)
        assert not any(str(a.target).startswith(GATE_PREFIX) for a in sdpa.all_input_nodes)
    filecheck(out.code, r"scaled_dot_product_attention\(", not_=(r"self\.fxprune_gate_g1_",
                                                                 r"self\.fxprune_gate_g4_"))
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_insert_gates_groups_option():
    _, _, gm, analysis = traced("tiny_vit")
    mlp = [g.index for g in analysis.groups if g.kind == "mlp"][0]
    result = InsertGates(groups=(mlp,))(gm)
    assert [n.target for n in gate_nodes(result.graph_module)] == [f"fxprune_gate_g{mlp}_0"]


def test_insert_gates_refuses_graph_without_analysis():
    model, x, _ = _tiny_entry()
    gm = fxprune.trace(model, x)
    with pytest.raises(PassOrderError, match=r"fxprune\.analyze") as err:
        InsertGates()(gm)
    assert "[insert-gates]" in str(err.value)
    with pytest.raises(PassOrderError, match="fxprune.trace"):
        InsertGates()(model)


def test_insert_gates_refuses_second_run():
    _, _, gm, _ = traced("tiny_vit")
    once = InsertGates()(gm).graph_module
    with pytest.raises(PassOrderError, match="already has gates"):
        InsertGates()(once)
    assert len(gate_nodes(once)) == 6


# --------------------------------------------------------------------------------------------
# sync-head-ranks
# --------------------------------------------------------------------------------------------

HAND_SCORES = torch.tensor([[0.9, 0.1, 0.7], [0.2, 0.8, 0.6]])


def test_sync_scores_hand_example_rank_mode():
    # sorted per head: [0.9, 0.7, 0.1] and [0.8, 0.6, 0.2]; rank means [0.85, 0.65, 0.15]
    ranked = HAND_SCORES.sort(dim=1, descending=True).values.mean(dim=0)
    assert torch.allclose(ranked, torch.tensor([0.85, 0.65, 0.15]))
    # two rank means reach 0.5 -> k = 2; each head keeps its own top 2
    mask = sync_scores(HAND_SCORES, threshold=0.5)
    assert mask.tolist() == [[True, False, True], [False, True, True]]
    assert mask.sum(dim=1).tolist() == [2, 2]
    # threshold between the rank means moves k: 0.7 -> 1 (0.85 only)
    assert sync_scores(HAND_SCORES, threshold=0.7).tolist() == [[True, False, False],
                                                                [False, True, False]]
    # an explicit keep count overrides the threshold
    assert sync_scores(HAND_SCORES, keep=3).all()


def test_sync_scores_hand_example_other_modes():
    # same-index: per-index means [0.55, 0.45, 0.65] -> indices {0, 2} in every head
    same = sync_scores(HAND_SCORES, threshold=0.5, mode="same-index")
    assert same.tolist() == [[True, False, True], [True, False, True]]
    # whole-head: head means [0.567, 0.533]
    assert sync_scores(HAND_SCORES, threshold=0.5, mode="whole-head").all()
    whole = sync_scores(HAND_SCORES, threshold=0.55, mode="whole-head")
    assert whole.tolist() == [[True, True, True], [False, False, False]]


def test_sync_head_ranks_pass_hand_example():
    """The hand example through the pass: a ViT with 2 heads of 3 channels."""
    model, x, _ = _tiny_entry(embed_dim=6, num_heads=2, mlp_ratio=2.0)
    gm = fxprune.trace(model, x)
    analysis = fxprune.analyze(gm)
    qk = analysis.attention[0].qk_group
    assert analysis.groups[qk].layout.shape == (2, 3)
    gated = InsertGates()(gm).graph_module
    set_gate_values(gated, lambda g, shape: HAND_SCORES if g == qk else torch.ones(shape))
    result = SyncHeadRanks()(gated)
    assert result.modified and result.graph_module is gated  # in place
    values = gate_modules(gated)[qk].values.detach()
    assert values.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert f"group {qk}: keep 2 of 3 per head in 2 of 2 heads (rank)" in result.changes
    # groups whose scores were all 1 keep everything
    for g, gate in gate_modules(gated).items():
        if g != qk:
            assert bool(gate.values.eq(1).all())
    # the graph is unchanged by sync (only gate values move)
    assert len(gate_nodes(gated)) == 6
    gated.graph.lint()


@pytest.mark.parametrize("name", ["tiny_vit", "five_heads", "qk_dim_differs", "rel_pos_bias",
                                  "rotary_qk", "swiglu_mlp"])
def test_sync_head_ranks_random_scores_equal_counts(name):
    _, x, gm, analysis = prepared(name)
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(0)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    result = SyncHeadRanks()(gated)
    assert len(result.changes) == len(gate_modules(gated))
    for g, gate in gate_modules(gated).items():
        values = gate.values.detach()
        assert bool(((values == 0) | (values == 1)).all()), f"group {g} not binary"
        counts = values.sum(dim=1)
        assert counts.min() >= 1
        assert bool((counts == counts[0]).all()), f"group {g}: per-head counts {counts}"
        if analysis.groups[g].shared_across_heads:  # e.g. rotary: forced to same-index
            assert bool((values == values[0]).all())
    with torch.no_grad():
        gated(x)  # still runs


def test_sync_head_ranks_same_index_mode():
    _, _, gm, analysis = traced("tiny_vit")
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(1)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    result = SyncHeadRanks(mode="same-index")(gated)
    assert all("(same-index)" in c for c in result.changes)
    for g, gate in gate_modules(gated).items():
        values = gate.values.detach()
        if analysis.groups[g].num_heads:
            assert values.shape[0] == 3
            assert bool((values == values[0]).all()), f"group {g}: heads keep different indices"
            assert 1 <= int(values[0].sum()) < values.shape[1]


def test_sync_head_ranks_whole_head_mode():
    _, x, gm, analysis = traced("tiny_vit")
    gated = InsertGates()(gm).graph_module

    def fill(g, shape):
        if analysis.groups[g].num_heads:  # head 1 scores low, heads 0 and 2 high
            return torch.tensor([0.9, 0.2, 0.7])[:, None] + 0.05 * torch.rand(shape)
        return torch.full(shape, 0.9)

    set_gate_values(gated, fill)
    SyncHeadRanks(mode="whole-head")(gated)
    for g, gate in gate_modules(gated).items():
        values = gate.values.detach()
        rows_all = values.eq(1).all(dim=1) | values.eq(0).all(dim=1)
        assert bool(rows_all.all()), f"group {g}: a head was cut partially"
        if analysis.groups[g].num_heads:
            assert values.sum(dim=1).tolist() == [16.0, 0.0, 16.0]  # head dim unchanged
        else:
            assert bool(values.eq(1).all())


@pytest.mark.parametrize("align", [
    1,
    8,
])
def test_sync_scores_refuses_threshold_keeping_nothing(align):
    scores = torch.full((3, 16), 0.1)
    with pytest.raises(PlanError, match="keep 0 channels per head"):
        sync_scores(scores, threshold=0.5, align=align)


def test_sync_head_ranks_refuses_threshold_keeping_nothing():
    _, _, gm, _ = traced("tiny_vit")
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(2)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    with pytest.raises(PlanError, match=r"\[sync-head-ranks\].*keep 0") as err:
        SyncHeadRanks(threshold=1.5)(gated)
    assert "lower the threshold" in str(err.value)
    with pytest.raises(PlanError, match="unknown mode"):
        sync_scores(HAND_SCORES, mode="per-head")


def test_sync_head_ranks_refuses_graph_without_gates():
    _, _, gm, _ = traced("tiny_vit")
    with pytest.raises(PassOrderError, match=r"\[sync-head-ranks\] the graph has no gates") \
            as err:
        SyncHeadRanks()(gm)
    assert "insert-gates" in str(err.value)


# --------------------------------------------------------------------------------------------
# slice
# --------------------------------------------------------------------------------------------

def _linear(gm, name) -> nn.Linear:
    mod = gm.get_submodule(name)
    assert isinstance(mod, nn.Linear)
    return mod


def test_slice_before_after_tiny_vit():
    """Same per-head count for q/k and v (no split needed): the fused (B, N, 3, H, D) reshape
    gets D = 8, the merge reshape gets H * 8, SDPA gets the original scale."""
    model, x, gm, analysis = traced("tiny_vit")
    site0 = analysis.attention[0]
    mlp0 = [g.index for g in analysis.groups if g.kind == "mlp"][0]
    rng = np.random.default_rng(0)
    keep = {site0.qk_group: head_mask((3, 16), per_head=8, rng=rng),
            site0.v_group: head_mask((3, 16), per_head=8, rng=rng),
            mlp0: head_mask((1, 192), per_head=96, rng=rng)}

    # before
    assert (_linear(gm, "blocks.0.attn.qkv").in_features,
            _linear(gm, "blocks.0.attn.qkv").out_features) == (48, 144)
    assert node(gm, "reshape").args[3:] == (3, 3, 16)
    assert node(gm, "reshape_1").args[3:] == (48,)
    assert "scale" not in node(gm, "scaled_dot_product_attention").kwargs

    result = Slice(keep=keep)(gm)
    out = result.graph_module
    assert result.modified and out is not gm

    # after: Linear widths and weight shapes
    qkv, proj = _linear(out, "blocks.0.attn.qkv"), _linear(out, "blocks.0.attn.proj")
    fc1, fc2 = _linear(out, "blocks.0.mlp.fc1"), _linear(out, "blocks.0.mlp.fc2")
    assert (qkv.in_features, qkv.out_features) == (48, 72)
    assert qkv.weight.shape == (72, 48) and qkv.bias.shape == (72,)
    assert (proj.in_features, proj.out_features) == (24, 48) and proj.weight.shape == (48, 24)
    assert proj.bias.shape == (48,)
    assert (fc1.out_features, fc2.in_features) == (96, 96)
    assert fc1.weight.shape == (96, 48) and fc1.bias.shape == (96,)
    assert fc2.weight.shape == (48, 96)
    # block 1 and the residual stream are untouched
    assert _linear(out, "blocks.1.attn.qkv").weight.shape == (144, 48)
    assert _linear(out, "blocks.1.mlp.fc1").weight.shape == (192, 48)
    assert out.get_submodule("blocks.0.norm1").weight.shape == (48,)

    # after: view/reshape constants (B and N stay symbolic: they are nodes)
    reshape, reshape_1 = node(out, "reshape"), node(out, "reshape_1")
    assert all(isinstance(a, torch.fx.Node) for a in reshape.args[:3])
    assert reshape.args[3:] == (3, 3, 8)
    assert reshape_1.args[3:] == (24,)
    assert node(out, "reshape_2").args[3:] == (3, 3, 16)
    assert node(out, "reshape_3").args[3:] == (48,)
    # after: SDPA of block 0 gets the ORIGINAL scale, block 1 keeps the default
    assert node(out, "scaled_dot_product_attention").kwargs == {"scale": 0.25}
    assert "scale" not in node(out, "scaled_dot_product_attention_1").kwargs
    filecheck(out.code,
              r"reshape = blocks_0_attn_qkv\.reshape\(getitem_1, getitem_2, 3, 3, 8\)",
              r"scaled_dot_product_attention\(getitem_4, getitem_5, getitem_6, scale = 0\.25\)",
              r"reshape_1 = transpose_1\.reshape\(getitem_1, getitem_2, 24\)",
              r"reshape_2 = blocks_1_attn_qkv\.reshape\(getitem_7, getitem_8, 3, 3, 16\)",
              not_=(GATE_PREFIX,))
    assert any("reshape: reshape sizes" in c for c in result.changes)

    # the plan names original parameters; the input graph is untouched
    plan = out.meta[PLAN_KEY]
    assert set(plan) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                         "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
                         "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight"}
    assert [len(v) for v in plan["blocks.0.attn.qkv.weight"].values()] == [72]
    assert _linear(gm, "blocks.0.attn.qkv").weight.shape == (144, 48)
    assert node(gm, "reshape").args[3:] == (3, 3, 16)

    # numerics: sliced == gated == zeroed original
    gated, sliced = gated_and_sliced(gm, keep)
    close(outputs(out, x), outputs(gated, x))
    close(outputs(out, x), outputs(zeroed_original(model, plan), x))
    out.graph.lint()


def test_slice_qk_and_v_differ_after_split_fused_heads():
    """q/k keep 8 of 16 per head, v keeps 12: only possible once split-fused-heads gave each
    part its own reshape; SDPA must then pass the ORIGINAL 1/sqrt(16) explicitly."""
    model, x, gm, analysis = prepared("tiny_vit")
    site = analysis.attention[0]
    assert site.uses_sdpa and site.qk_head_dim == 16
    rng = np.random.default_rng(3)
    keep = {site.qk_group: head_mask((3, 16), per_head=8, rng=rng),
            site.v_group: head_mask((3, 16), per_head=12, rng=rng)}
    out = Slice(keep=keep)(gm).graph_module

    sdpa = node(out, site.qk_node.name)
    assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(16))
    assert sdpa.kwargs["scale"] == site.scale
    assert _linear(out, "blocks.0.attn.qkv").weight.shape == (8 * 3 * 2 + 12 * 3, 48)
    assert _linear(out, "blocks.0.attn.proj").in_features == 36
    # one slice + reshape per part, with the new bounds and head dims
    parts = [n for n in out.graph.nodes if n.op == "call_function" and n.target is
             operator.getitem and getattr(n.args[0], "name", None) == "blocks_0_attn_qkv"]
    assert [p.args[1][1] for p in parts] == [slice(0, 24), slice(24, 48), slice(48, 84)]
    assert [next(iter(p.users)).args[3:] for p in parts] == [(3, 8), (3, 8), (3, 12)]
    filecheck(out.code, rf"{site.qk_node.name} = .*attention\(permute_2, permute_3, permute_4, "
              r"scale = 0\.25\)")
    gated, _ = gated_and_sliced(gm, keep)
    close(outputs(out, x), outputs(gated, x))
    close(outputs(out, x), outputs(zeroed_original(model, out.meta[PLAN_KEY]), x))


def test_slice_v_only_keeps_default_sdpa_scale():
    _, x, gm, analysis = prepared("tiny_vit")
    site = analysis.attention[1]
    keep = {site.v_group: head_mask((3, 16), per_head=4)}
    out = Slice(keep=keep)(gm).graph_module
    assert "scale" not in node(out, site.qk_node.name).kwargs
    gated, _ = gated_and_sliced(gm, keep)
    close(outputs(out, x), outputs(gated, x))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_slice_gated_equals_sliced(name, seed):
    """Gated model with binary gates == sliced model, on random binary patterns; the plan
    zeroed in the original model reproduces the sliced outputs; the result lints and
    recompiles."""
    model, x, gm, analysis = prepared(name)
    masks = random_masks(analysis, np.random.default_rng(seed))
    assert masks, "nothing to prune"
    gated, sliced = gated_and_sliced(gm, masks)
    y = outputs(sliced, x)
    close(y, outputs(gated, x))
    if name not in ZOO or ZOO[name]()[2].get("zeroed_equals_removed", True):
        close(y, outputs(zeroed_original(model, sliced.meta[PLAN_KEY]), x))
    # a clean result: no gates, no analysis, lints, recompiles, still runs the same
    assert gate_nodes(sliced) == []
    assert not any(isinstance(m, ChannelGate) for m in sliced.modules())
    assert "fxprune.analysis" not in sliced.meta and GATES_KEY not in sliced.meta
    sliced.graph.lint()
    sliced.recompile()
    assert torch.equal(outputs(sliced, x), y)
    n_params = sum(p.numel() for p in sliced.parameters())
    dropped = sum(int((~np.asarray(m)).sum()) for m in masks.values())
    assert (n_params < sum(p.numel() for p in gm.parameters())) == (dropped > 0)


def test_slice_from_synced_gates_pipeline():
    """insert-gates -> scores -> sync-head-ranks -> slice reading the gates."""
    model, x, gm, _ = prepared("tiny_vit")
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(4)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    SyncHeadRanks()(gated)
    result = Slice()(gated)
    sliced = result.graph_module
    assert sum(c.startswith("removed gate") for c in result.changes) == 6
    assert gate_nodes(sliced) == [] and len(gate_nodes(gated)) == 6
    close(outputs(sliced, x), outputs(gated, x))
    close(outputs(sliced, x), outputs(zeroed_original(model, sliced.meta[PLAN_KEY]), x))


def test_slice_from_synced_gates_rotary_pairs():
    _, x, gm, _ = prepared("rotary_qk")
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(0)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    SyncHeadRanks()(gated)
    sliced = Slice()(gated).graph_module
    close(outputs(sliced, x), outputs(gated, x))


def test_slice_refuses_graph_without_analysis():
    model, x, _ = _tiny_entry()
    gm = fxprune.trace(model, x)
    with pytest.raises(PassOrderError, match=r"\[slice\].*fxprune\.analyze"):
        Slice(keep={1: np.ones((3, 16), bool)})(gm)


def test_slice_refuses_head_with_zero_channels():
    _, _, gm, analysis = traced("tiny_vit")
    qk = analysis.attention[0].qk_group
    with pytest.raises(PlanError, match=rf"group {qk} \(qk\) would keep no channel in head 1"):
        Slice(keep={qk: head_mask((3, 16), drop_head=1)})(gm)
    v = analysis.attention[1].v_group
    mask = head_mask((3, 16), per_head=4)
    mask[2] = False
    with pytest.raises(PlanError, match="in head 2"):
        Slice(keep={v: mask})(gm)


def test_slice_refuses_unequal_counts_per_head():
    _, _, gm, analysis = traced("tiny_vit")
    qk = analysis.attention[0].qk_group
    mask = head_mask((3, 16), per_head=8)
    mask[1, 8] = True  # head 1 keeps 9
    with pytest.raises(PlanError, match=r"keeps different counts per head \[8, 9, 8\]") as err:
        Slice(keep={qk: mask})(gm)
    assert "sync-head-ranks" in str(err.value)


def test_slice_refuses_qk_and_v_counts_differing_without_split():
    """The fused (B, N, 3, H, D) reshape forces one D: refused, pointing at split-fused-heads."""
    _, _, gm, analysis = traced("tiny_vit")
    site = analysis.attention[0]
    keep = {site.qk_group: head_mask((3, 16), per_head=8),
            site.v_group: head_mask((3, 16), per_head=12)}
    with pytest.raises(SliceError, match="split-fused-heads"):
        Slice(keep=keep)(gm)


def test_slice_refuses_non_binary_gates():
    _, _, gm, _ = traced("tiny_vit")
    gated = InsertGates()(gm).graph_module
    gen = torch.Generator().manual_seed(5)
    set_gate_values(gated, lambda g, shape: torch.rand(shape, generator=gen))
    with pytest.raises(PlanError, match="is not binary") as err:
        Slice()(gated)
    assert "sync-head-ranks" in str(err.value)


def test_slice_refuses_dropping_channels_of_frozen_group():
    _, _, gm, analysis = traced("qk_layernorm")
    qk = analysis.attention[0].qk_group
    assert analysis.groups[qk].frozen is not None
    with pytest.raises(PlanError, match=rf"group {qk} \(qk\) is frozen") as err:
        Slice(keep={qk: head_mask((4, 8), per_head=4)})(gm)
    assert "LayerNorm" in str(err.value)
    # the residual stream of tiny_vit is frozen as well
    _, _, gm, analysis = traced("tiny_vit")
    embed = [g for g in analysis.groups if g.kind == "embed"][0]
    with pytest.raises(PlanError, match=r"\(embed\) is frozen"):
        Slice(keep={embed.index: head_mask((1, 48), per_head=40)})(gm)


def test_slice_refuses_missing_or_malformed_plan():
    _, _, gm, analysis = traced("tiny_vit")
    with pytest.raises(PlanError, match="nothing says what to keep"):
        Slice()(gm)
    with pytest.raises(PlanError, match="has 47 entries"):
        Slice(keep={1: np.ones(47, bool)})(gm)
    with pytest.raises(PlanError, match=f"no group {len(analysis.groups)}"):
        Slice(keep={len(analysis.groups): np.ones(3, bool)})(gm)


def test_slice_whole_head_removal():
    _, x, gm, analysis = traced("tiny_vit")
    gated = InsertGates()(gm).graph_module

    def fill(g, shape):
        if analysis.groups[g].num_heads:
            return torch.tensor([0.9, 0.1, 0.9])[:, None].expand(shape)
        return torch.ones(shape)

    set_gate_values(gated, fill)
    SyncHeadRanks(mode="whole-head")(gated)
    sliced = Slice()(gated).graph_module
    assert node(sliced, "reshape").args[3:] == (3, 2, 16)
    assert node(sliced, "reshape_1").args[3:] == (32,)
    close(outputs(sliced, x), outputs(gated, x))


def test_stale_analysis_after_split_fused_heads_is_refused():
    model, x, _ = _tiny_entry()
    gm = fxprune.trace(model, x)
    fxprune.analyze(gm)
    split = SplitFusedHeads()(gm)
    assert split.modified
    with pytest.raises(PassOrderError, match=r"fxprune\.analyze"):
        Slice(keep={1: head_mask((3, 16), per_head=8)})(split.graph_module)
    with pytest.raises(PassOrderError, match=r"fxprune\.analyze"):
        InsertGates()(split.graph_module)


# --------------------------------------------------------------------------------------------
# split-fused-heads
# --------------------------------------------------------------------------------------------

def test_split_fused_heads_before_after_tiny_vit():
    model, x, gm, _ = traced("tiny_vit")
    # before: one (B, N, 3, H, D) reshape of the qkv output + permute + unbind per block
    qkv_reshape = node(gm, "reshape")
    assert qkv_reshape.args[0].name == "blocks_0_attn_qkv" and qkv_reshape.args[3:] == (3, 3, 16)
    assert op_count(gm, "unbind") == 2
    assert op_count(gm, "permute") == 2
    code_before = gm.code

    result = SplitFusedHeads()(gm)
    out = result.graph_module
    assert result.modified and result.info == {"rewritten": 2, "refused": []}
    assert result.changes == ["reshape: 3 parts of blocks_0_attn_qkv reshaped separately",
                              "reshape_2: 3 parts of blocks_1_attn_qkv reshaped separately"]
    assert op_count(out, "unbind") == 0
    assert op_count(out, "permute") == 6
    for block in (0, 1):
        qkv = node(out, f"blocks_{block}_attn_qkv")
        parts = [u for u in qkv.users if u.target is operator.getitem]
        assert len(parts) == len(qkv.users) == 3
        assert [p.args[1] for p in parts] == [(Ellipsis, slice(i * 48, (i + 1) * 48))
                                              for i in range(3)]
        for p in parts:
            (r,) = p.users
            assert r.target == "reshape" and r.args[3:] == (3, 16)
            (perm,) = r.users
            assert perm.target == "permute" and perm.args[1:] == (0, 2, 1, 3)
        sdpa = [n for n in out.graph.nodes if n.target is F.scaled_dot_product_attention][block]
        assert [a.args[0].args[0] for a in sdpa.args] == parts  # q, k, v in order
    filecheck(out.code,
              r"getitem_\d+ = blocks_0_attn_qkv\[\(Ellipsis, slice\(0, 48, None\)\)\]",
              r"\.reshape\(getitem_1, getitem_2, 3, 16\)",
              r"\.permute\(0, 2, 1, 3\)",
              r"blocks_0_attn_qkv\[\(Ellipsis, slice\(48, 96, None\)\)\]",
              r"blocks_0_attn_qkv\[\(Ellipsis, slice\(96, 144, None\)\)\]",
              r"scaled_dot_product_attention\(permute_\d+, permute_\d+, permute_\d+\)",
              not_=(r"\.unbind\(", r"3, 3, 16\)"))
    assert gm.code == code_before  # input left alone
    out.graph.lint()
    assert all("val" in n.meta for n in out.graph.nodes if n.op != "output")
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_split_fused_heads_zoo_outputs_identical(name):
    model, x, gm, _ = traced(name)
    result = SplitFusedHeads()(gm)
    out = result.graph_module
    fused = op_count(gm, "unbind")
    assert result.modified == (fused > 0)
    assert result.info["rewritten"] == fused and result.info["refused"] == []
    assert op_count(out, "unbind") == 0
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


class _HeadMajorQKV(nn.Module):
    """Fused qkv laid out head-major: reshape (B, N, H, 3, D), so the q/k/v part dim (3) is
    not the leading factor of the channels: parts are not contiguous slices."""

    def __init__(self, dim: int = 24, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                         .reshape(B, N, C))


class _PartDimMinusOne(_HeadMajorQKV):
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, -1, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
                         .reshape(B, N, C))


def _small_traced(cls):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls().eval()
        x = torch.randn(2, 5, 24)
    return model, x, fxprune.trace(model, x)


@pytest.mark.parametrize("case", ["head_major", "minus_one", "separate_qkv_explicit"])
def test_split_fused_heads_leaves_alone(case):
    if case == "separate_qkv_explicit":
        model, x, gm, _ = traced(case)
    else:
        model, x, gm = _small_traced({"head_major": _HeadMajorQKV,
                                      "minus_one": _PartDimMinusOne}[case])
    code_before = gm.code
    result = SplitFusedHeads()(gm)
    assert result.modified is False and result.changes == []
    assert result.info["rewritten"] == 0
    assert result.graph_module.code == code_before
    assert op_count(result.graph_module, "unbind") == op_count(gm, "unbind")
    if case == "minus_one":  # reported, with the node and the reason
        assert result.info["refused"] == [
            ("reshape", "the part dim is given as -1 or the shape is not spelled per dim")]
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))


def test_split_fused_heads_leaves_head_major_layout_alone():
    _, _, gm = _small_traced(_HeadMajorQKV)
    result = SplitFusedHeads()(gm)
    assert not result.modified and result.info["refused"] == []
