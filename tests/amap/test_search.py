"""AMAP search and refine: indicators, straight-through
gradients, head synchronisation, similarity weights, the differentiable MACs model, search,
refine, bad input, and a 2-process DistributedDataParallel run.

Everything runs on tiny models (``tiny_vit``, the zoo) for a few steps, one torch thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.amap.indicators import Indicator
from fxprune.amap.macs_model import MacsModel
from fxprune.amap.search import SearchConfig, refine, refresh_similarity, search
from fxprune.errors import InputError, PlanError
from fxprune.models.reference import tiny_vit
from fxprune.passbase import copy_graph_module
from fxprune.passes.insert_indicators import (
    InsertIndicators,
    indicator_modules,
    masks_from_indicators,
)
from fxprune.passes.reweight import Reweight
from fxprune.passes.slice import Slice
from fxprune.pipeline import prepare
from fxprune.planning.units import group_units
from zoo import ZOO

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
IMG = (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# helpers


def _prepared(model, x):
    """What ``search`` does before inserting indicators: trace, own copy, prepare, analyse."""
    gm, _ = prepare(copy_graph_module(fxprune.trace(model, x)))
    return gm, fxprune.analyze(gm)


def _gated(model, x, **options):
    gm, analysis = _prepared(model, x)
    gated = InsertIndicators(**options)(gm).graph_module
    return gated, analysis, indicator_modules(gated)


def _data(n=16, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *IMG, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _random_masks(analysis, groups, rng):
    """Random synchronised keep masks: every head keeps the same (random) number of units,
    each head its own random units. Returns (masks over layouts, keep per unit)."""
    masks, keep = {}, {}
    for g in groups:
        units = group_units(g, np.zeros(g.layout.shape))
        heads, n = units.channels.shape
        k = int(rng.integers(1, n + 1))
        chosen = np.stack([rng.permutation(n)[:k] for _ in range(heads)])
        kept = np.take_along_axis(units.channels, chosen, axis=1)
        unit_keep = np.zeros((heads, n))
        np.put_along_axis(unit_keep, chosen, 1.0, axis=1)
        masks[g.index] = np.isin(g.layout, kept.ravel())
        keep[g.index] = torch.tensor(unit_keep)
    return masks, keep


def _reweight_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("fxprune_reweight_")]


# ---------------------------------------------------------------------------------------------
# indicators: straight-through estimator, synchronisation, similarity weights


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("similarity", [True, False])
def test_keep_is_binary_and_ste_gradient_is_minus_w(similarity, sync):
    """keep() has the value of the hard mask 1[m* < tau]; its gradient w.r.t. m* is -1, so
    d sum(keep) / d m = -w (rank averaging redistributes but conserves the gradient)."""
    gen = torch.Generator().manual_seed(0)
    channels = np.arange(3 * 8).reshape(3, 8)
    m = torch.rand(3, 8, generator=gen)
    w = 1 + torch.rand(3, 8, generator=gen)
    ind = Indicator(0, channels, similarity=similarity, sync=sync, init=m)
    ind.set_similarity(w)
    keep = ind.keep()
    m_star = ind.weighted().detach()
    assert torch.equal(keep.detach(), (m_star < 0.5).float())
    assert 0 < keep.sum() < keep.numel()  # the draw crosses tau somewhere
    keep.sum().backward()
    expected = -w if similarity else -torch.ones_like(w)
    torch.testing.assert_close(ind.m.grad, expected)


@pytest.mark.parametrize("similarity", [True, False])
def test_ste_gradient_of_task_loss_reaches_every_indicator(similarity):
    torch.manual_seed(0)
    x, y = _data(4)
    gated, analysis, inds = _gated(tiny_vit(), x[:1], similarity=similarity)
    if similarity:
        refresh_similarity(gated, analysis, inds)
        assert any(bool((ind.w > 1).any()) for ind in inds.values())
    loss = nn.functional.cross_entropy(gated(x), y)
    loss.backward()
    assert len(inds) == 6  # qk, v, mlp of each of the 2 blocks
    for g, ind in inds.items():
        assert ind.m.grad is not None, g
        assert float(ind.m.grad.abs().sum()) > 0, g


def test_similarity_scales_the_ste_gradient_by_w():
    """At m = 0 the forward is the same with and without the similarity weight; the gradient
    w.r.t. m is multiplied by w (m* = w * m, eq. 3)."""
    torch.manual_seed(0)
    x, y = _data(4)
    model = tiny_vit()
    grads = {}
    for similarity in (False, True):
        gated, analysis, inds = _gated(model, x[:1], similarity=similarity, sync=False)
        refresh_similarity(gated, analysis, inds)
        nn.functional.cross_entropy(gated(x), y).backward()
        grads[similarity] = {g: (ind.m.grad.clone(), ind.w.clone()) for g, ind in inds.items()}
    for g, (grad_on, w) in grads[True].items():
        grad_off = grads[False][g][0]
        torch.testing.assert_close(grad_on, w * grad_off, rtol=1e-5, atol=1e-9)


def test_synchronised_indicators_keep_equal_counts_per_head():
    gen = torch.Generator().manual_seed(1)
    channels = np.arange(4 * 8).reshape(4, 8)
    unsynced_differ = False
    for _ in range(40):
        m = torch.rand(4, 8, generator=gen)
        w = 1 + 0.5 * torch.rand(4, 8, generator=gen)
        synced = Indicator(0, channels, sync=True, init=m)
        synced.set_similarity(w)
        counts = synced.keep().detach().sum(dim=1)
        assert len(set(counts.tolist())) == 1, counts
        # rank-wise averaging keeps each head's own order: head h keeps its k lowest m*
        m_star = m * w
        k = int(counts[0])
        for h in range(4):
            lowest = set(torch.argsort(m_star[h])[:k].tolist())
            assert set(torch.nonzero(synced.keep()[h].detach()).ravel().tolist()) == lowest
        free = Indicator(0, channels, sync=False, init=m)
        free.set_similarity(w)
        unsynced_differ |= len(set(free.keep().detach().sum(dim=1).tolist())) > 1
    assert unsynced_differ


def test_synchronised_indicators_on_a_graph_give_sliceable_masks():
    torch.manual_seed(0)
    x = torch.randn(2, *IMG)
    gated, analysis, inds = _gated(tiny_vit(), x[:1])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ind in inds.values():
            ind.m.copy_(0.2 + 0.6 * torch.rand(ind.m.shape, generator=gen))
    masks = masks_from_indicators(gated, analysis)
    assert masks
    for g, mask in masks.items():
        counts = mask.reshape(analysis.groups[g].layout.shape).sum(axis=1)
        assert len(set(counts.tolist())) == 1 and counts.min() > 0, (g, counts)
    sliced = Slice(keep=masks)(gated).graph_module
    gated.eval()
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), gated(x), rtol=1e-5, atol=1e-5)


class _Attention(nn.Module):
    """Tokens (B, N, C) -> one softmax-attention layer (2 heads of 8, no q/k/v bias) -> mean
    -> linear head. ``fused``: one qkv Linear (timm layout); otherwise separate q, k, v
    Linears. Head 0 has planted near-duplicates: q/k channel 1 = 2 * channel 0 (cos ~ 1) and
    v channel 3 = -channel 2 with the out-projection column negated too (cos = -1: |cos|
    counts)."""

    C, H, D = 16, 2, 8

    def __init__(self, fused: bool, seed: int = 0):
        super().__init__()
        C = self.C
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(3 * C, C, generator=gen)
        w[1] = 2 * w[0] + 1e-3 * torch.randn(C, generator=gen)            # q, head 0
        w[C + 1] = 2 * w[C + 0] + 1e-3 * torch.randn(C, generator=gen)    # k, head 0
        w[2 * C + 3] = -w[2 * C + 2]                                       # v, head 0
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(C, 3 * C, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(C, C, bias=False) for _ in range(3))
        with torch.random.fork_rng(devices=[]):  # the same proj bias and head either way
            torch.manual_seed(seed)
            self.proj = nn.Linear(C, C)
            self.head = nn.Linear(C, 10)
        with torch.no_grad():
            if fused:
                self.qkv.weight.copy_(w)
            else:
                for i, lin in enumerate((self.q, self.k, self.v)):
                    lin.weight.copy_(w[i * C:(i + 1) * C])
            self.proj.weight.copy_(torch.randn(C, C, generator=gen))
            self.proj.weight[:, 3] = -self.proj.weight[:, 2]
        self.w_qkv = w.double().numpy()
        self.w_proj = self.proj.weight.detach().double().numpy()

    def forward(self, x):
        B, N, C = x.shape
        H, D = self.H, self.D
        if self.fused:
            q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(x).reshape(B, N, H, D).permute(0, 2, 1, 3)
                       for lin in (self.q, self.k, self.v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj(out.transpose(1, 2).reshape(B, N, C)).mean(dim=1))


def _hand_weight(features: np.ndarray) -> np.ndarray:
    """AMAP eq. 1-2 by hand: w_i = 1 + max_{n != i} |cos(f_i, f_n)|."""
    n = len(features)
    out = np.empty(n)
    for i in range(n):
        best = 0.0
        for j in range(n):
            if j != i:
                a, b = features[i], features[j]
                best = max(best, abs(float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))))
        out[i] = 1.0 + best
    return out


def _similarity_check(fused: bool, kind: str):
    """refresh_similarity against numpy, every head of the group of ``kind``. A channel's
    feature vector is the concatenation of its tied parameter entries (fxprune.planning.criteria):
    q row + k row for a q/k channel, v row + out-projection column for a v channel."""
    model = _Attention(fused)
    C, D = model.C, model.D
    gated, analysis, inds = _gated(model, torch.randn(2, 5, C))
    refresh_similarity(gated, analysis, inds)
    g = next(g for g in inds if analysis.groups[g].kind == kind)
    ind, layout = inds[g], analysis.groups[g].layout
    w = ind.w.numpy()
    assert (w >= 1).all() and (w <= 2 + 1e-6).all()
    for h in range(layout.shape[0]):
        # unit j of head h is the head's channel d (its position in the layout)
        pos = [int(np.nonzero(layout[h] == c)[0][0]) for c in ind.channels[h]]
        rows = [h * D + d for d in pos]
        if kind == "qk":
            feats = np.concatenate([model.w_qkv[rows], model.w_qkv[[C + r for r in rows]]], 1)
        else:
            feats = np.concatenate([model.w_qkv[[2 * C + r for r in rows]],
                                    model.w_proj[:, rows].T], axis=1)
        np.testing.assert_allclose(w[h], _hand_weight(feats), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{kind} head {h}")
    planted = (0, 1) if kind == "qk" else (2, 3)
    assert all(float(w[0, i]) > 1.99 for i in planted)
    assert sorted(np.argsort(-w[0])[:2].tolist()) == list(planted)
    for other in inds.values():  # every group, MLP included
        assert bool((other.w >= 1).all())


@pytest.mark.parametrize("fused", [True, False])
def test_similarity_weight_v_equals_one_plus_max_abs_cosine(fused):
    _similarity_check(fused, "v")


def test_similarity_weight_qk_equals_one_plus_max_abs_cosine_separate_linears():
    _similarity_check(False, "qk")


def test_similarity_weight_qk_equals_one_plus_max_abs_cosine_fused_qkv():
    _similarity_check(True, "qk")


def test_similarity_weight_does_not_depend_on_fusing_qkv():
    """The same attention written with one fused qkv Linear or with three Linears (identical
    weights, identical outputs) must get the same v and MLP similarity weights."""
    x = torch.randn(2, 5, _Attention.C)
    fused, separate = _Attention(True), _Attention(False)
    torch.testing.assert_close(fused(x), separate(x))
    weights = []
    for model in (fused, separate):
        gated, analysis, inds = _gated(model, x)
        refresh_similarity(gated, analysis, inds)
        weights.append({analysis.groups[g].kind: ind.w for g, ind in inds.items()})
    assert weights[0].keys() == weights[1].keys() >= {"qk", "v"}
    for kind in weights[0]:
        torch.testing.assert_close(weights[0][kind], weights[1][kind])


# ---------------------------------------------------------------------------------------------
# differentiable MACs model


MACS_MODELS = ["tiny_vit", "qk_dim_differs", "rotary_qk", "swiglu_mlp", "rel_pos_bias",
               "five_heads", "qk_layernorm", "focused_linear", "focused_linear_folded",
               "elu_linear"]


@pytest.mark.parametrize("name", MACS_MODELS)
def test_macs_model_equals_count_macs_of_sliced_model(name):
    if name == "tiny_vit":
        model, x = tiny_vit(), torch.randn(2, *IMG)
    else:
        model, x, _ = ZOO[name]()
    gm, analysis = _prepared(model, x)
    groups = [g for g in analysis.groups if g.prunable]
    macs_model = MacsModel(gm, analysis)
    assert macs_model.dense == fxprune.count_macs(gm)
    rng = np.random.default_rng(0)
    for _ in range(4):
        masks, keep = _random_masks(analysis, groups, rng)
        sliced = Slice(keep=masks)(gm).graph_module
        assert float(macs_model(keep)) == pytest.approx(fxprune.count_macs(sliced), abs=0.5)


def test_macs_model_on_indicator_masks_matches_sliced_model():
    """End to end: the MACs the search's loss sees (MacsModel of Indicator.keep()) are the
    MACs of the model sliced with masks_from_indicators."""
    torch.manual_seed(0)
    x = torch.randn(1, *IMG)
    gm, analysis = _prepared(tiny_vit(), x)
    macs_model = MacsModel(gm, analysis)
    gated = InsertIndicators()(gm).graph_module
    inds = indicator_modules(gated)
    refresh_similarity(gated, analysis, inds)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ind in inds.values():
            ind.m.copy_(0.15 + 0.4 * torch.rand(ind.m.shape, generator=gen))
    keep = {g: ind.keep().detach() for g, ind in inds.items()}
    masks = masks_from_indicators(gated, analysis)
    sliced = Slice(keep=masks)(gated).graph_module
    assert float(macs_model(keep)) == pytest.approx(fxprune.count_macs(sliced), abs=0.5)
    assert fxprune.count_macs(sliced) < macs_model.dense


# ---------------------------------------------------------------------------------------------
# search and refine


def _loader(n=16, batch=16, seed=123):
    x, y = _data(n, seed)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], x


@pytest.fixture(scope="module")
def searched():
    """10 search steps (one batch per epoch, so history has one record per step)."""
    loader, x = _loader()
    torch.manual_seed(0)
    result = search(tiny_vit(), loader, x[:1], macs_ratio=0.7, epochs=10, indicator_lr=0.2,
                    progress=False)
    return result, loader, x


def test_search_moves_macs_toward_target(searched):
    result, _, _ = searched
    ratios = [h["macs_ratio"] for h in result.history]
    assert len(ratios) == 10
    assert ratios[0] == pytest.approx(1.0)       # indicators start at 0: everything kept
    assert min(ratios) < 0.9
    target = result.config.macs_ratio
    # Adam moves every indicator by about its learning rate per step, so a 10-step search
    # lands near the target, not on it: require it to close at least half of the distance
    assert abs(ratios[-1] - target) < 0.5 * (1.0 - target)
    assert abs(result.macs_ratio - target) < 0.5 * (1.0 - target)
    assert result.masks  # something was pruned


def test_sliced_model_after_search_equals_masked_model(searched):
    result, _, _ = searched
    gm = result.graph_module.eval()
    sliced = Slice(keep=result.masks)(gm).graph_module.eval()
    x = torch.randn(4, *IMG, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        masked, small = gm(x), sliced(x)
    torch.testing.assert_close(small, masked, rtol=1e-5, atol=1e-5)
    assert not [n for n in sliced.graph.nodes if "fxprune_ind" in str(n.target)]
    # the ratio reported by the search (MacsModel) is the sliced model's
    dense = fxprune.count_macs(_prepared(tiny_vit(), x[:1])[0])
    assert fxprune.count_macs(sliced) / dense == pytest.approx(result.macs_ratio, abs=1e-6)


def test_reweight_is_exact_at_insertion(searched):
    result, _, _ = searched
    sliced = Slice(keep=result.masks)(result.graph_module).graph_module.eval()
    fxprune.analyze(sliced)
    r = Reweight()(sliced)
    assert r.info["inserted"] == 2 and not r.info["refused"]
    assert len(_reweight_nodes(r.graph_module)) == 2
    x = torch.randn(4, *IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(r.graph_module.eval()(x), sliced(x))


@pytest.mark.filterwarnings("ignore:.*ReweightModule.*opaque leaf")
def test_refine_slices_and_adds_reweight(searched):
    result, loader, x = searched
    before = {n: p.detach().clone() for n, p in result.graph_module.named_parameters()}
    model, history = refine(result, loader, epochs=2)
    assert model.meta["fxprune.sliced"] is True
    assert len(_reweight_nodes(model)) == 2
    assert not [n for n in model.graph.nodes if "fxprune_ind" in str(n.target)]
    assert len(history) == 2
    # it is the sliced size: same MACs as the searched masks, plus the (tiny) reweight fcs
    dense = fxprune.count_macs(_prepared(tiny_vit(), x[:1])[0])
    assert fxprune.count_macs(model) / dense == pytest.approx(result.macs_ratio, abs=0.01)
    # refine trained a copy: the search result is untouched
    after = dict(result.graph_module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    plain, _ = refine(result, loader, epochs=1, reweight=False)
    assert plain.meta["fxprune.sliced"] is True and not _reweight_nodes(plain)


def test_refine_without_sync_runs_masked():
    loader, x = _loader()
    torch.manual_seed(0)
    result = search(tiny_vit(), loader, x[:1], macs_ratio=0.7, epochs=12, indicator_lr=0.2,
                    sync=False, progress=False)
    layouts = {g: result.analysis.groups[g].layout.shape for g in result.masks}
    uneven = [g for g, m in result.masks.items()
              if len(set(m.reshape(layouts[g]).sum(axis=1).tolist())) > 1]
    assert uneven, "the unsynchronised search should leave different counts per head"
    with pytest.raises(PlanError):
        Slice(keep=result.masks)(result.graph_module)
    model, _ = refine(result, loader, epochs=1)
    assert model.meta["fxprune.sliced"] is False
    assert not _reweight_nodes(model)
    # the fixed gates carry the searched masks: the refined model runs masked
    from fxprune.passes.insert_gates import gate_modules
    gates = gate_modules(model)
    for g, mask in result.masks.items():
        assert np.array_equal(gates[g].values.detach().numpy() > 0.5, mask.reshape(layouts[g]))
        assert not gates[g].values.requires_grad
    assert model(x[:2]).shape == (2, 10)


def test_search_is_reproducible_and_leaves_the_model_alone():
    loader, x = _loader()
    model = tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [search(model, loader, x[:1], macs_ratio=0.6, epochs=4, indicator_lr=0.2,
                   seed=7, progress=False) for _ in range(2)]
    assert runs[0].history == runs[1].history
    assert runs[0].masks.keys() == runs[1].masks.keys()
    assert all(np.array_equal(runs[0].masks[g], runs[1].masks[g]) for g in runs[0].masks)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_search_config_defaults_follow_appendix_a():
    cfg = SearchConfig()
    assert (cfg.lr, cfg.lr_min, cfg.weight_decay, cfg.tau) == (5e-4, 5e-6, 1e-6, 0.5)
    assert cfg.similarity and cfg.sync


def test_search_masks_are_aligned_and_paired_for_sdpa(searched):
    """Defaults: every kept count per head is a multiple of 8 (or the whole head) and q/k and
    v of an SDPA site keep the same head dim, so the sliced model stays on SDPA's fused
    kernels; refine slices exactly these masks (gated == sliced above)."""
    result, _, _ = searched
    assert result.config.align == 8 and result.config.match_qk_v is None
    assert result.masks
    for g, mask in result.masks.items():
        group = result.analysis.groups[g]
        counts = set(mask.reshape(group.layout.shape).sum(axis=1).tolist())
        assert len(counts) == 1 and counts.pop() % 8 == 0, (g, group.kind)
    for site in result.analysis.attention:
        assert site.uses_sdpa
        dims = [int(result.masks[g].sum(axis=1).max()) if g in result.masks
                else result.analysis.groups[g].size for g in (site.qk_group, site.v_group)]
        assert dims[0] == dims[1], (site.index, dims)


def test_synchronised_search_keeps_at_least_one_unit_per_head():
    loader, x = _loader()
    torch.manual_seed(0)
    result = search(tiny_vit(), loader, x[:1], macs_ratio=0.5, epochs=20, indicator_lr=0.2,
                    progress=False)
    for g, mask in result.masks.items():
        counts = mask.reshape(result.analysis.groups[g].layout.shape).sum(axis=1)
        assert counts.min() >= 1, (g, result.analysis.groups[g].kind, counts.tolist())
    Slice(keep=result.masks)(result.graph_module)


def test_refine_adds_reweight_when_qk_keeps_one_channel_per_head():
    """A q/k head dim of 1 is still an attention site (it was not: a size-1 dim carries no
    labels), so refine reweights it."""
    loader, x = _loader()
    torch.manual_seed(0)
    result = search(tiny_vit(), loader, x[:1], macs_ratio=0.5, epochs=12, indicator_lr=0.2,
                    progress=False, align=1, match_qk_v=False)  # unaligned: head dims of 1
    qk = [g for g in result.masks if result.analysis.groups[g].kind == "qk"]
    assert qk and all(result.masks[g].reshape(result.analysis.groups[g].layout.shape)
                      .sum(axis=1).tolist() == [1, 1, 1] for g in qk)  # the case in point
    model, _ = refine(result, loader, epochs=1)
    assert model.meta["fxprune.sliced"] is True
    assert len(_reweight_nodes(model)) == 2


# ---------------------------------------------------------------------------------------------
# bad input: clear errors before training starts


class _CountingLoader:
    """A re-iterable loader that counts the batches drawn from it."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.drawn = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the search gets as far as building its optimiser."""

    def boom(*args, **kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(torch.optim, "AdamW", boom)


def _check_fails_fast(exc, match, model, loader, example, **kw):
    counting = _CountingLoader(loader)
    with pytest.raises(exc, match=match) as info:
        search(model, counting, example, progress=False, **kw)
    assert counting.drawn <= 1
    return info


def test_loader_with_wrong_input_shape(no_training):
    x, y = _data(8)
    small = torch.randn(8, 3, 16, 16)
    info = _check_fails_fast(InputError, "shape", tiny_vit(), [(small, y)], x[:1])
    assert "(8, 3, 16, 16)" in str(info.value)


def test_loader_with_wrong_target_count(no_training):
    x, y = _data(8)
    _check_fails_fast(InputError, "target", tiny_vit(), [(x, y[:3])], x[:1])


def test_loader_not_yielding_pairs(no_training):
    x, _ = _data(8)
    _check_fails_fast(InputError, "pairs", tiny_vit(), [x], x[:1])


def test_empty_loader(no_training):
    x, _ = _data(2)
    _check_fails_fast(InputError, "empty", tiny_vit(), [], x[:1])


def test_model_without_prunable_group(no_training):
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    batch = (torch.randn(4, 8), torch.randint(0, 8, (4,)))
    _check_fails_fast(PlanError, "no prunable", model, [batch], torch.randn(1, 8))


def test_unreachable_target_names_the_reachable_minimum(no_training):
    x, y = _data(8)
    gm, analysis = _prepared(tiny_vit(), x[:1])
    # the smallest model the search may produce: one unit per head in every prunable group,
    # sliced and counted (independent of MacsModel)
    masks = {}
    for g in analysis.groups:
        if g.prunable:
            units = group_units(g, np.zeros(g.layout.shape))
            masks[g.index] = np.isin(g.layout, units.channels[:, :1].ravel())
    lowest = fxprune.count_macs(Slice(keep=masks)(gm).graph_module) / fxprune.count_macs(gm)
    info = _check_fails_fast(PlanError, "cannot be reached", tiny_vit(), [(x, y)], x[:1],
                             macs_ratio=0.01)
    assert f"{lowest:.3f}" in str(info.value)
    assert 0.01 < lowest < 1


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.5, float("nan")])
def test_macs_ratio_out_of_range(no_training, ratio):
    x, y = _data(8)
    _check_fails_fast(InputError, "macs_ratio", tiny_vit(), [(x, y)], x[:1], macs_ratio=ratio)


def test_loader_without_len_runs_with_max_steps():
    x, y = _data(16)

    class Stream:
        def __iter__(self):
            yield x[:8], y[:8]
            yield x[8:], y[8:]

    result = search(tiny_vit(), Stream(), x[:1], macs_ratio=0.6, epochs=1, max_steps=2,
                    indicator_lr=0.2, progress=False)
    assert len(result.history) == 1


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 CPU processes, gloo


def test_ddp_two_ranks_end_with_identical_masks(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                                       [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "support" / "ddp_search_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # each rank trained on its own shard ...
    assert ranks[0]["shard_checksum"] != ranks[1]["shard_checksum"]
    # ... and DDP averaged the gradients: identical indicators, masks and weights
    a, b = ranks
    assert a["masks"].keys() == b["masks"].keys()
    assert all(torch.equal(a["masks"][g], b["masks"][g]) for g in a["masks"])
    assert all(torch.equal(a["indicators"][g], b["indicators"][g]) for g in a["indicators"])
    assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    assert a["macs_ratio"] == b["macs_ratio"]
    # the indicators were trained
    assert any(float(m.abs().max()) > 0 for m in a["indicators"].values())
    assert a["masks"] and a["macs_ratio"] < 1.0
