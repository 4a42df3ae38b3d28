"""Differentiable MACs model (AMAP eq. 8-9) built from the analysis, not written per model.

A group's MACs are affine in how many of its units it keeps (a unit is a channel of a head,
or a channel shared by all heads): every unit removed saves the same multiply-accumulates in
the projections that produce and consume it and in the attention products that contract it.
The per-unit saving is measured once on the graph (:class:`fxprune.planning.cost.CostModel`), so

    MACs(keep) = dense - sum_g saving_g * (removed units of g) / heads_g

and ``keep`` may be soft or straight-through binary. For softmax and window attention this is
exact: it equals ``count_macs`` of the sliced model (tested). Linear attention's products
``k^T v`` and ``q (k^T v)`` cost ``c * d_k * d_v`` per head (eq. 9), bilinear in the q/k and v
groups: the affine savings, measured from the dense model, count the removed
``d_k``-by-``d_v`` block twice, so ``c * sum_h removed_k[h] * removed_v[h]`` is added back and
the model stays exact there too.

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

from fxprune.macs import count_macs


class MacsModel(torch.nn.Module):
    """``MacsModel(gm, analysis)(keep)`` -> MACs as a 0-d tensor; ``keep[g]`` has the shape of
    ``units[g].channels`` (heads, units per head), values in [0, 1]."""

    def __init__(self, gm: torch.fx.GraphModule, analysis, groups=None):
        super().__init__()
        from fxprune.planning.cost import CostModel
        from fxprune.planning.units import group_units

        self.dense = float(count_macs(gm))
        cost = CostModel(gm, analysis)
        groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
        self.units = {}
        self.saving = {}
        for g in groups:
            units = group_units(g, torch.zeros(g.layout.shape).numpy())
            self.units[g.index] = units
            heads = units.channels.shape[0]
            # saving per unit removed in ONE head (the cost model removes one unit per head)
            self.saving[g.index] = cost.per_unit(g, units, 1) / heads
        self.bilinear = _bilinear_terms(gm, analysis, self.units)

    def forward(self, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        macs = torch.tensor(self.dense)
        for g, k in keep.items():
            if g in self.saving:
                macs = macs - self.saving[g] * (k.numel() - k.sum())
        for gk, gv, coef in self.bilinear:
            if gk in keep and gv in keep:
                macs = macs + coef * (_removed_per_head(keep[gk], self.units[gk]) *
                                      _removed_per_head(keep[gv], self.units[gv])).sum()
        return macs

    def minimum(self, min_units_per_head: int = 1) -> float:
        """MACs with every group at its smallest allowed size (to refuse unreachable targets)."""
        macs = self.dense
        for g, units in self.units.items():
            heads, n = units.channels.shape
            macs -= self.saving[g] * heads * max(0, n - min_units_per_head)
        return macs


def _removed_per_head(keep: torch.Tensor, units) -> torch.Tensor:
    """Channels removed in each head (a group shared by all heads removes the same in each)."""
    return (keep.shape[1] - keep.sum(dim=1)) * units.per_unit


def _bilinear_terms(gm, analysis, units) -> list[tuple[int, int, float]]:
    """``(qk group, v group, c)`` per linear-attention site: c = MACs of ``q (k^T v)`` and
    ``k^T v`` per head and per (q/k channel, v channel) pair."""
    terms = []
    for s in analysis.attention:
        if s.kind != "linear" or s.qk_group not in units or s.v_group not in units:
            continue
        kv = _kv_product(s.av_node, s.k, s.v)
        products = [s.av_node] + ([kv] if kv is not None else [])
        pairs = s.num_heads * s.qk_head_dim * s.v_head_dim
        if pairs:
            terms.append((s.qk_group, s.v_group,
                          sum(_product_macs(n, gm) for n in products) / pairs))
    return terms


def _product_macs(node, gm) -> float:
    """MACs of the two-operand contraction in ``node``; an einsum's extra operands that only
    scale the result (FLatten's normaliser in 'bic,bcd,bi->bid') are linear in one group and
    already in the affine savings."""
    from fxprune.macs import einsum_macs, node_macs

    if "einsum" in str(node.target) and len(node.args) > 3:
        eq = node.args[0].replace(" ", "")
        ins, out = eq.split("->")
        terms = ins.split(",")
        main = [i for i, t in enumerate(terms) if not set(t) <= set(out)][:2]
        if len(main) == 2:
            shapes = [tuple(node.args[i + 1].meta["val"].shape) for i in main]
            return float(einsum_macs(f"{terms[main[0]]},{terms[main[1]]}->{out}", shapes))
    return float(node_macs(node, gm))


def _kv_product(av, k, v):
    """The ``k^T v`` node feeding ``av`` (possibly behind a scale or a reshape)."""
    seen, frontier = set(), list(av.all_input_nodes)
    for _ in range(4):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if k in n.all_input_nodes and v in n.all_input_nodes:
                return n
            nxt += n.all_input_nodes
        frontier = nxt
    return None
