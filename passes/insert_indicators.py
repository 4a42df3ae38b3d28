"""``insert-indicators``: AMAP's learnable pruning indicators on every prunable group.

Like ``insert-gates`` (same places: where a group's channels are contracted away, so masking
equals removal), but the gate value is the indicator's straight-through binary keep mask
(:mod:`fxprune.amap.indicators`), trained by :func:`fxprune.amap.search.search`. Q and K share one
indicator (they form one group), V has its own, each MLP hidden layer its own.

Graph before and after (one attention site, SDPA)::

    q, k, v -> sdpa(q, k, v) -> proj(...)
    q, k, v -> sdpa(ind_gate_qk(q), k, v) -> proj(ind_gate_v(...))

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)); _ = fxprune.analyze(gm)
    >>> r = InsertIndicators()(gm)
    >>> sorted(r.info["indicators"])[:3], r.info["sites"]
    ([1, 2, 3], 6)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx

from fxprune.amap.indicators import Indicator, IndicatorGate
from fxprune.analysis.engine import get_analysis
from fxprune.errors import PassOrderError
from fxprune.meta import INDICATOR_GATE_PREFIX, INDICATOR_PREFIX, INDICATORS_KEY
from fxprune.passbase import FxPass, PassResult, copy_graph_module

from .insert_gates import gate_sinks


@dataclasses.dataclass(frozen=True)
class InsertIndicatorsOptions:
    tau: float = 0.5
    similarity: bool = True
    sync: bool = True
    inplace: bool = False


class InsertIndicators(FxPass):
    name = "insert-indicators"
    Options = InsertIndicatorsOptions

    def requires(self, gm):
        super().requires(gm)
        get_analysis(gm, self.name)
        if gm.meta.get(INDICATORS_KEY):
            raise PassOrderError(self.name, "the graph already has indicators",
                                 hint="run insert-indicators once per graph")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxprune.planning.units import group_units

        out = gm if self.options.inplace else copy_graph_module(gm)
        analysis = get_analysis(out, self.name)
        indicators: dict[int, str] = {}
        changes, n_sites = [], 0
        for g in analysis.groups:
            if not g.prunable:
                continue
            units = group_units(g, np.zeros(g.layout.shape))
            unit_of = {int(c): i for i, c in enumerate(units.channels.ravel())}
            ind = Indicator(g.index, units.channels, tau=self.options.tau,
                            similarity=self.options.similarity, sync=self.options.sync)
            ind_name = f"{INDICATOR_PREFIX}g{g.index}"
            out.add_submodule(ind_name, ind)
            indicators[g.index] = ind_name
            names = gate_sinks(out, analysis, g, unit_of, f"{INDICATOR_GATE_PREFIX}g{g.index}",
                               lambda index, ind=ind: IndicatorGate(ind, index))
            n_sites += len(names)
            changes += [f"indicator of group {g.index} ({g.kind}) before {n}" for _, n in names]
        out.meta[INDICATORS_KEY] = indicators
        out.recompile()
        return PassResult(out, bool(indicators), changes,
                          {"indicators": indicators, "sites": n_sites})


def indicator_modules(gm: torch.fx.GraphModule) -> dict[int, Indicator]:
    return {g: gm.get_submodule(name) for g, name in (gm.meta.get(INDICATORS_KEY) or {}).items()}


def masks_from_indicators(gm: torch.fx.GraphModule, analysis) -> dict[int, np.ndarray]:
    """Binary keep masks over each group's layout (heads, size) from the current indicators."""
    masks = {}
    for g, ind in indicator_modules(gm).items():
        keep_units = ind.keep().detach().cpu().numpy() > 0.5
        kept_channels = ind.channels[keep_units]
        mask = np.isin(analysis.groups[g].layout, kept_channels)
        if not mask.all():
            masks[g] = mask
    return masks
