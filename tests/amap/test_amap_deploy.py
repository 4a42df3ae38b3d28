"""Deployable search masks (fxprune/amap/deploy.py): counts rounded to align, q/k and v of an
SDPA site paired at the count nearest their mean, each head keeping its best units, and the
indicators pinned so that the gated model computes what is sliced."""

from __future__ import annotations

import numpy as np
import torch

import fxprune
from fxprune.amap.deploy import (
    allowed_counts,
    deployable_masks,
    nearest,
    pin_indicators,
    unit_keep,
)
from fxprune.amap.macs_model import MacsModel
from fxprune.models.reference import tiny_vit
from fxprune.passes.insert_indicators import InsertIndicators, indicator_modules
from fxprune.pipeline import prepare


def test_allowed_and_nearest_counts():
    assert allowed_counts(16, 1, 8) == [16, 8]
    assert allowed_counts(16, 2, 8) == [16, 12, 8, 4]   # rotary pairs: 2 channels per unit
    assert allowed_counts(6, 1, 8) == [6]               # a head narrower than align stays
    assert allowed_counts(4, 1, 1) == [4, 3, 2, 1]
    assert [nearest(k, [16, 8]) for k in (3, 11, 12, 13)] == [8, 8, 16, 16]


def _indicators():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm, _ = prepare(fxprune.trace(tiny_vit(qk_dim=16), x))
    analysis = fxprune.analyze(gm)
    gated = InsertIndicators(inplace=True)(gm).graph_module
    return gated, analysis, indicator_modules(gated), MacsModel(gated, analysis)


def test_counts_rounded_paired_and_best_units_kept():
    gated, analysis, inds, macs = _indicators()
    site = analysis.attention[0]
    qk, v = site.qk_group, site.v_group
    mlp = next(g.index for g in analysis.groups if g.kind == "mlp")
    with torch.no_grad():  # qk keeps 13 per head, v keeps 5: mean 9 -> 8 for both
        for g, keep in ((qk, 13), (v, 5), (mlp, 150)):
            m = 0.1 * torch.rand(inds[g].m.shape)           # w * m < tau: kept
            order = m.argsort(dim=1)
            m.scatter_(1, order[:, keep:], 5.0)             # the worst units above tau
            inds[g].m.copy_(m)
    before = {g: inds[g].weighted().detach().clone() for g in (qk, v)}
    masks = deployable_masks(analysis, {g: inds[g] for g in (qk, v, mlp)}, macs.units)
    for g in (qk, v):
        counts = masks[g].sum(axis=1)
        assert (counts == 8).all()
        # each head keeps its 8 lowest weighted scores
        best = np.argsort(before[g].numpy(), axis=1, kind="stable")[:, :8]
        want = np.isin(analysis.groups[g].layout,
                       np.take_along_axis(macs.units[g].channels, best, axis=1))
        assert (masks[g] == want).all()
    assert masks[mlp].sum() == 152                          # 150 -> nearest multiple of 8
    unpaired = deployable_masks(analysis, {g: inds[g] for g in (qk, v)}, macs.units,
                                match_qk_v=False)
    assert qk not in unpaired                               # 13 -> 16: the whole head
    assert set(unpaired[v].sum(axis=1).tolist()) == {8}     # 5 -> 8


def test_pinned_indicators_gate_exactly_the_masks():
    gated, analysis, inds, macs = _indicators()
    with torch.no_grad():
        for ind in inds.values():
            ind.m.copy_(torch.rand(ind.m.shape))
    masks = deployable_masks(analysis, inds, macs.units, align=4)
    keep = unit_keep(masks, analysis, macs.units)
    pin_indicators(inds, keep)
    for g, ind in inds.items():
        assert torch.equal(ind.keep().detach(), keep[g])
