"""The cost model: multiply-accumulates saved by narrowing a group, measured on the graph.

A group's MACs are affine in its kept count per head, so the saving of one unit is measured
once: the shapes of the group's member nodes are recomputed with the removed channels' labels
dropped, and every affected node (the members and their users) is priced before and after.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> from fxprune.planning.units import group_units
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)); a = fxprune.analyze(gm)
    >>> g = next(g for g in a.groups if g.kind == "mlp")
    >>> CostModel(gm, a).per_unit(g, group_units(g, g.layout * 0.0), 1) > 0
    True
"""

from __future__ import annotations

import numpy as np

from fxprune.macs import node_macs
from fxprune.meta import SHAPE_KEY
from fxprune.planning.units import Units
from fxprune.slicing import new_shape


class CostModel:
    """MACs saved when every head of a group keeps fewer channels (or a site fewer heads)."""

    def __init__(self, gm, analysis):
        self.gm = gm
        self.analysis = analysis
        comps = analysis.components
        self.lab_keep = np.ones(comps.n_labels, dtype=bool)
        order = np.argsort(comps.channel, kind="stable")
        self.order = order
        self.bounds = np.searchsorted(comps.channel[order],
                                      np.arange(int(comps.channel.max()) + 2))

    def labels_of(self, channels: np.ndarray) -> np.ndarray:
        """Every label of the given channel ids."""
        parts = [self.order[self.bounds[c]:self.bounds[c + 1]] for c in channels.tolist()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def per_head(self, qk_group, v_group) -> float:
        """MACs saved by removing one whole head (its q/k and v channels)."""
        removed = np.concatenate([qk_group.layout[0], v_group.layout[0]])
        return self.saving([qk_group, v_group], removed)

    def per_unit(self, group, units: Units, removed_per_head: int) -> float:
        """MACs saved per unit when every head of ``group`` drops ``removed_per_head`` units."""
        removed = units.channels[:, :removed_per_head].ravel()
        return self.saving([group], removed) / removed_per_head

    def saving(self, groups, removed) -> float:
        """MACs saved by removing the channel ids ``removed`` from ``groups``' members."""
        labels = self.labels_of(np.unique(removed))
        self.lab_keep[labels] = False
        try:
            nodes = {n for g in groups for n, _ in g.members}
            affected = set(nodes)
            for n in nodes:
                affected.update(n.users)

            def shape_of(node):
                shape = new_shape(node, self.lab_keep) if node in nodes else None
                return shape if shape is not None else node.meta[SHAPE_KEY]

            saved = 0
            for node in affected:
                if node.op in ("placeholder", "output", "get_attr"):
                    continue
                try:
                    saved += node_macs(node, self.gm) - node_macs(node, self.gm, shape_of)
                except Exception:  # noqa: BLE001 - a node macs cannot price costs nothing
                    continue
        finally:
            self.lab_keep[labels] = True
        return saved
