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
from fxprune.slicing import new_shape, param_mask


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
            return self.saved_under(groups, self.lab_keep)
        finally:
            self.lab_keep[labels] = True

    def saved_under(self, groups, lab_keep: np.ndarray) -> float:
        """MACs saved, all at once, when the labels with ``lab_keep`` False are sliced away
        from ``groups`` (joint: a layer between two narrowed groups is priced at both widths).

        Example:
            >>> import torch, fxprune
            >>> from fxprune.slicing import label_keep
            >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
            ...                         torch.nn.Linear(16, 8))
            >>> gm = fxprune.trace(m, torch.randn(2, 8)); a = fxprune.analyze(gm)
            >>> g = a.groups[0]; keep = {0: g.layout < g.layout.min() + 4}   # 4 of 16 kept
            >>> CostModel(gm, a).saved_under([g], label_keep(a, keep))       # 2*12*8 twice
            384.0
        """
        nodes = {n for g in groups for n, _ in g.members}
        affected = set(nodes)
        for n in nodes:
            affected.update(n.users)
        params = self.analysis.param_comps

        def shape_of(node):
            if node in nodes:
                shape = new_shape(node, lab_keep)
            elif node.op == "get_attr" and node.target in params:
                # a functional conv reads its widths off the weight, not off its input
                shape = param_shape(self.analysis, node.target, lab_keep)
            else:
                shape = None
            return shape if shape is not None else node.meta[SHAPE_KEY]

        saved = 0
        for node in affected:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            try:
                saved += node_macs(node, self.gm) - node_macs(node, self.gm, shape_of)
            except Exception:  # noqa: BLE001 - a node macs cannot price costs nothing
                continue
        return float(saved)


def param_shape(analysis, name: str, lab_keep: np.ndarray) -> tuple[int, ...]:
    """Shape of parameter or buffer ``name`` once the labels with ``lab_keep`` False are
    sliced away (every dim keeps the indices some kept entry uses).

    Example:
        >>> import torch, fxprune
        >>> gm = fxprune.trace(torch.nn.Linear(4, 6), torch.randn(2, 4))
        >>> a = fxprune.analyze(gm)
        >>> param_shape(a, "weight", np.ones(a.components.n_labels, dtype=bool))
        (6, 4)
    """
    mask = param_mask(analysis, name, lab_keep)
    return tuple(int(mask.any(axis=tuple(o for o in range(mask.ndim) if o != d)).sum())
                 for d in range(mask.ndim))
