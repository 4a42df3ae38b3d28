"""The pipeline's speed-ups compute what the straightforward code computes (issue 3, pipeline
time): scores from batched and blocked products, the l1 read off the feature matrix, numpy's
median, local values after split-fused-heads, the memoized meta propagation, the parameters
``prune`` shares with the model until slicing, and ``ensures`` not recompiling unchanged
modules. Each test compares with the reference formulation written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxprune
import fxprune.planning.criteria as criteria
import fxprune.shapes as shapes
from fxprune.models.reference import tiny_vit
from fxprune.passbase import FxPass, PassResult
from fxprune.passes.split_fused_heads import SplitFusedHeads, local_meta_values
from fxprune.pipeline import prepare
from zoo import ZOO

ZOO_NAMES = ["einsum_attention", "qkv_no_bias", "qk_dim_differs", "five_heads", "fused_q_kv",
             "rel_pos_bias", "swiglu_mlp", "rotary_qk"]


def _prepared(model, x):
    gm, _ = prepare(fxprune.trace(model, x))
    return gm, fxprune.analyze(gm)


def _tiny():
    return _prepared(tiny_vit(), torch.randn(1, 3, 32, 32))


def _zoo(name):
    model, x, _ = ZOO[name]()
    return _prepared(model, x)


# -- reference formulations (the code before the speed-ups) --------------------------------

def _ref_l1(n, blocks):
    l1 = np.zeros(n)
    for pos, feat in blocks:
        ok = pos >= 0
        np.add.at(l1, pos[ok], np.abs(feat[ok]).sum(axis=1))
    return l1


def _ref_feature_matrix(n, blocks):
    parts = []
    for pos, feat in blocks:
        ok = pos >= 0
        pos, feat = pos[ok], feat[ok]
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_pos))[0] + 1]
        rank = np.empty(len(pos), dtype=np.int64)
        rank[order] = np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
        for r in range(int(rank.max()) + 1 if len(rank) else 0):
            sel = rank == r
            block = np.zeros((n, feat.shape[1]), dtype=np.float32)
            block[pos[sel]] = feat[sel]
            parts.append(block)
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)


def _ref_similarity_weight(g, blocks):
    n = g.layout.size
    f = _ref_feature_matrix(n, blocks)
    width = f.shape[1]
    if not width:
        return np.ones(n)
    heads, size = g.layout.shape
    ft = torch.from_numpy(f)
    if width > criteria.SKETCH_DIM and size > criteria.SKETCH_DIM:
        gen = torch.Generator().manual_seed(0)
        ft = ft @ torch.randn(width, criteria.SKETCH_DIM, generator=gen)
    ft = ft / ft.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ft = ft.reshape(heads, size, -1)
    sim = (ft @ ft.transpose(1, 2)).abs()
    sim.diagonal(dim1=1, dim2=2).zero_()
    return (1.0 + sim.max(dim=2).values).reshape(-1).double().numpy()


def _ref_median_distance(g, blocks):
    n = g.layout.size
    f = _ref_feature_matrix(n, blocks)
    if not f.shape[1]:
        return np.ones(n)
    ft = torch.from_numpy(f).reshape(g.layout.shape[0], g.layout.shape[1], f.shape[1])
    median = ft.median(dim=1, keepdim=True).values
    return (ft - median).norm(dim=2).reshape(-1).double().numpy()


def _ref_scores(gm, analysis, criterion):
    groups = [g for g in analysis.groups if g.prunable]
    blocks = criteria.features(gm, analysis, groups)
    out = {}
    for g in groups:
        l1 = _ref_l1(g.layout.size, blocks[g.index])
        if criterion == "similarity":
            score = l1 / _ref_similarity_weight(g, blocks[g.index])
        elif criterion == "toast":
            score = _ref_median_distance(g, blocks[g.index])
        else:
            score = l1
        out[g.index] = score.reshape(g.layout.shape)
    return out


# -- criteria -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", *ZOO_NAMES])
def test_feature_matrix_and_l1_equal_the_reference_exactly(name):
    gm, analysis = _tiny() if name == "tiny" else _zoo(name)
    groups = [g for g in analysis.groups if g.prunable]
    blocks = criteria.features(gm, analysis, groups)
    for g in groups:
        n = g.layout.size
        ref = _ref_feature_matrix(n, blocks[g.index])
        np.testing.assert_array_equal(criteria.feature_matrix(n, blocks[g.index]), ref)
        width, todo = criteria.feature_layout(n, blocks[g.index])
        f = np.full((n, width), np.nan, dtype=np.float32)  # stale scratch must not leak
        parts = criteria.fill_features(f, blocks[g.index], todo)
        np.testing.assert_array_equal(f, ref)
        l1 = _ref_l1(n, blocks[g.index])
        np.testing.assert_array_equal(criteria.l1_norms(n, blocks[g.index]), l1)
        np.testing.assert_array_equal(criteria.l1_norms_from_matrix(n, f, parts), l1)


@pytest.mark.parametrize("sketch,block", [(256, 768), (16, 8), (16, 1000), (4, 5)])
@pytest.mark.parametrize("criterion", ["similarity", "l1", "toast"])
@pytest.mark.parametrize("name", ["tiny", "qk_dim_differs", "swiglu_mlp", "rotary_qk"])
def test_channel_scores_equal_the_reference(monkeypatch, name, criterion, sketch, block):
    """Small SKETCH_DIM / GRAM_BLOCK / CHUNK_BYTES / SIM_BYTES force the sketched, blocked
    and chunked paths on tiny models. Products may be summed in another order by another
    BLAS: 1e-6."""
    monkeypatch.setattr(criteria, "SKETCH_DIM", sketch)
    monkeypatch.setattr(criteria, "GRAM_BLOCK", block)
    monkeypatch.setattr(criteria, "CHUNK_BYTES", 1 << 12)
    monkeypatch.setattr(criteria, "SIM_BYTES", 1 << 10)
    gm, analysis = _tiny() if name == "tiny" else _zoo(name)
    got = criteria.channel_scores(gm, analysis, criterion)
    ref = _ref_scores(gm, analysis, criterion)
    assert got.keys() == ref.keys()
    for gi in ref:
        assert got[gi].shape == ref[gi].shape
        np.testing.assert_allclose(got[gi], ref[gi], rtol=1e-6, atol=0, err_msg=f"group {gi}")


@pytest.mark.parametrize("block", [1, 3, 16, 49, 50, 100])
@pytest.mark.parametrize("sim_bytes", [1, 4 * 20 * 20, 1 << 20])
def test_max_abs_offdiag_blocked_equals_full_product(monkeypatch, block, sim_bytes):
    monkeypatch.setattr(criteria, "GRAM_BLOCK", block)
    monkeypatch.setattr(criteria, "SIM_BYTES", sim_bytes)
    torch.manual_seed(0)
    ft = torch.randn(3, 50, 7)
    ft = ft / ft.norm(dim=2, keepdim=True)
    sim = ft @ ft.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).zero_()
    ref = sim.abs().max(dim=2).values.numpy()
    got = criteria.max_abs_offdiag(ft)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_similarity_weight_single_group_api_unchanged():
    """fxprune.search calls similarity_weight(group, blocks) per group."""
    gm, analysis = _tiny()
    groups = [g for g in analysis.groups if g.prunable]
    blocks = criteria.features(gm, analysis, groups)
    for g in groups:
        np.testing.assert_allclose(criteria.similarity_weight(g, blocks[g.index]),
                                   _ref_similarity_weight(g, blocks[g.index]), rtol=1e-6)


# -- prune: parameters shared until slicing ----------------------------------------------------

@pytest.mark.parametrize("criterion", ["similarity", "l1"])
def test_prune_result_owns_its_tensors_and_leaves_the_model_untouched(criterion):
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {id(m) for m in model.modules()}
    pruned = fxprune.prune(model, x, macs_ratio=0.6, criterion=criterion, align=4)
    mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    theirs = [n for n, t in [*pruned.named_parameters(remove_duplicate=False),
                             *pruned.named_buffers(remove_duplicate=False)]
              if t.untyped_storage().data_ptr() in mine]
    assert theirs == []
    assert not ids & {id(m) for m in pruned.modules()}
    assert all(isinstance(p, torch.nn.Parameter) for p in pruned.parameters())
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
        for b in pruned.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_plan_still_returns_a_graph_that_owns_its_parameters():
    from fxprune.planning.oneshot import plan

    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    p = plan(model, x, macs_ratio=0.6, align=4)
    mine = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in mine
                   for t in p.graph_module.parameters())


# -- shape values: split-fused-heads, memoized meta propagation --------------------------------

def _desc(v):
    if isinstance(v, torch.Tensor):
        return (type(v).__name__, tuple(v.shape), v.dtype, v.stride(), v.storage_offset(),
                v.device.type, v.requires_grad)
    if isinstance(v, (list, tuple)):
        return tuple(_desc(e) for e in v)
    return repr(v)


def _vals(gm):
    return {n.name: _desc(n.meta.get("val")) for n in gm.graph.nodes}


@pytest.mark.parametrize("name", ["tiny", *ZOO_NAMES])
def test_split_fused_heads_local_values_equal_a_full_propagation(name):
    if name == "tiny":
        model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    else:
        model, x, _ = ZOO[name]()
    gm = fxprune.trace(model, x)
    result = SplitFusedHeads()(gm)
    out = result.graph_module
    local = _vals(out)
    shapes.propagate_shapes(out, shapes.example_zeros(out))
    assert local == _vals(out)


def test_split_fused_heads_local_values_need_meta_propagated_values():
    gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32))
    gm.meta[shapes.SHAPE_PROP_KEY] = "fake"  # e.g. values refreshed by fake tensors
    assert local_meta_values(gm, [], []) is False
    gm.meta[shapes.SHAPE_PROP_KEY] = "meta"
    assert local_meta_values(gm, [], []) is True


@pytest.mark.parametrize("name", ["tiny", "rel_pos_bias", "swiglu_mlp", "fused_q_kv"])
def test_memoized_meta_propagation_equals_the_plain_one(monkeypatch, name):
    if name == "tiny":
        model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    else:
        model, x, _ = ZOO[name]()
    graphs = [fxprune.trace(model, x), fxprune.prune(model, x, macs_ratio=0.7, align=1)]
    for gm in graphs:
        shapes.propagate_shapes(gm, shapes.example_zeros(gm))
        assert gm.meta[shapes.SHAPE_PROP_KEY] == "meta"
        memo = _vals(gm)
        with monkeypatch.context() as m:
            m.setattr(shapes, "_MEMO_FUNCTIONS", frozenset())
            m.setattr(shapes, "_MEMO_MODULES", ())
            shapes.propagate_shapes(gm, shapes.example_zeros(gm))
        assert memo == _vals(gm)


def test_memoized_meta_propagation_runs_module_hooks():
    """Same-shaped Linears share a memo entry, but not one whose forward hook reshapes."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    m[1].register_forward_hook(lambda mod, args, out: out.unsqueeze(0))
    gm = fxprune.trace(m, torch.randn(2, 4))
    shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    assert shapes == [(2, 4), (1, 2, 4), (1, 2, 4)]


# -- ensures ----------------------------------------------------------------------------------

class _Noop(FxPass):
    name = "noop"

    def __init__(self, modify):
        super().__init__()
        self.modify = modify

    def run(self, gm):
        return PassResult(gm, modified=self.modify, changes=["x"] if self.modify else [])


@pytest.mark.parametrize("modify", [False, True])
def test_ensures_recompiles_only_changed_modules(monkeypatch, modify):
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    calls = []
    monkeypatch.setattr(gm, "recompile", lambda: calls.append(1))
    _Noop(modify)(gm)
    assert len(calls) == int(modify)
