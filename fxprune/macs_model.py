"""Differentiable MACs model (AMAP eq. 8-9) built from the analysis, not written per model.

A group's MACs are affine in how many of its units it keeps (a unit is a channel of a head,
or a channel shared by all heads): every unit removed saves the same multiply-accumulates in
the projections that produce and consume it and in the attention products that contract it.
The per-unit saving is measured once on the graph (:class:`fxprune.oneshot._CostModel`), so

    MACs(keep) = dense - sum_g saving_g * (removed units of g) / heads_g

and ``keep`` may be soft or straight-through binary. For softmax and window attention this is
exact: it equals ``count_macs`` of the sliced model (tested). Linear attention has a
k-by-v product, bilinear in the two groups; there the model is a first-order approximation.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)); a = fxprune.analyze(gm)
    >>> model = MacsModel(gm, a)
    >>> keep = {g: torch.ones(model.units[g].channels.shape) for g in model.units}
    >>> int(model(keep)) == fxprune.count_macs(gm)
    True
"""

from __future__ import annotations

import torch
import torch.fx

from .macs import count_macs


class MacsModel(torch.nn.Module):
    """``MacsModel(gm, analysis)(keep)`` -> MACs as a 0-d tensor; ``keep[g]`` has the shape of
    ``units[g].channels`` (heads, units per head), values in [0, 1]."""

    def __init__(self, gm: torch.fx.GraphModule, analysis, groups=None):
        super().__init__()
        from .oneshot import _CostModel, _units

        self.dense = float(count_macs(gm))
        cost = _CostModel(gm, analysis)
        groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
        self.units = {}
        self.saving = {}
        for g in groups:
            units = _units(g, torch.zeros(g.layout.shape).numpy())
            self.units[g.index] = units
            heads = units.channels.shape[0]
            # saving per unit removed in ONE head (the cost model removes one unit per head)
            self.saving[g.index] = cost.per_unit(g, units, 1) / heads

    def forward(self, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        macs = torch.tensor(self.dense)
        for g, k in keep.items():
            if g in self.saving:
                macs = macs - self.saving[g] * (k.numel() - k.sum())
        return macs

    def minimum(self, min_units_per_head: int = 1) -> float:
        """MACs with every group at its smallest allowed size (to refuse unreachable targets)."""
        macs = self.dense
        for g, units in self.units.items():
            heads, n = units.channels.shape
            macs -= self.saving[g] * heads * max(0, n - min_units_per_head)
        return macs
