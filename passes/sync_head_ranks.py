"""``sync-head-ranks``: binary gates with the same kept count in every head of a group.

AMAP's multi-head synchronisation (DESIGN.md section 6): scores are sorted inside each head,
averaged across heads rank by rank, and the number of ranks whose averaged score reaches the
threshold is the kept count of every head; each head then keeps its own top channels.

Modes:
  ``rank`` (default): per-head top-k, the same k everywhere.
  ``same-index``: one score per within-head index (averaged over heads) so every head keeps
  the same indices, required where a parameter is shared across heads.
  ``whole-head``: heads are kept or removed entirely (head dim unchanged).

Example:
    >>> import torch
    >>> sync_scores(torch.tensor([[0.9, 0.1, 0.7], [0.2, 0.8, 0.6]]), threshold=0.5)
    tensor([[ True, False,  True],
            [False,  True,  True]])
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx

from fxprune.errors import PassOrderError, PlanError
from fxprune.meta import GATES_KEY
from fxprune.passbase import FxPass, PassResult

from .insert_gates import gate_modules

MODES = ("rank", "same-index", "whole-head")


def sync_scores(scores: torch.Tensor, *, threshold: float | None = 0.5, keep: int | None = None,
                mode: str = "rank", min_keep: int = 1, align: int = 1) -> torch.Tensor:
    """Binary keep mask (heads, size) from keep-scores (higher = keep)."""
    if mode not in MODES:
        raise PlanError("sync-head-ranks", f"unknown mode {mode!r}", hint=f"use one of {MODES}")
    scores = scores.detach().float()
    heads, size = scores.shape
    if mode == "whole-head":
        per_head = scores.mean(dim=1)
        k = keep if keep is not None else int((per_head >= threshold).sum())
        _check(k, heads, min_keep, "heads")
        top = per_head.topk(k).indices
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[top] = True
        return mask
    if mode == "same-index":
        per_index = scores.mean(dim=0)
        k = keep if keep is not None else int((per_index >= threshold).sum())
        _check(k, size, min_keep, "channels per head")
        k = _aligned(k, size, align)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[per_index.topk(k).indices] = True
        return mask.expand(heads, size).clone()
    ranked = scores.sort(dim=1, descending=True).values.mean(dim=0)
    k = keep if keep is not None else int((ranked >= threshold).sum())
    _check(k, size, min_keep, "channels per head")
    k = _aligned(k, size, align)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask


def _aligned(k: int, size: int, align: int) -> int:
    if align <= 1 or k >= size:
        return min(k, size)
    return max(align, int(round(k / align)) * align) if size >= align else size


def _check(k, total, min_keep, what):
    if k < min_keep:
        raise PlanError("sync-head-ranks", f"the scores keep {k} {what} (of {total}); at least "
                        f"{min_keep} must stay", hint="lower the threshold or the pruning target;"
                        " whole heads are removed only in mode='whole-head'")


@dataclasses.dataclass(frozen=True)
class SyncHeadRanksOptions:
    mode: str = "rank"
    threshold: float = 0.5
    align: int = 1


class SyncHeadRanks(FxPass):
    """Turns every gate of a gated graph into a synchronised binary mask (in place)."""

    name = "sync-head-ranks"
    Options = SyncHeadRanksOptions

    def requires(self, gm):
        super().requires(gm)
        if not gm.meta.get(GATES_KEY):
            raise PassOrderError(self.name, "the graph has no gates",
                                 hint="run insert-gates (fxprune.passes.insert_gates) first")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        from fxprune.analysis.engine import get_analysis
        from fxprune.planning.units import group_units

        analysis = get_analysis(gm, self.name)
        changes = []
        for group, gate in gate_modules(gm).items():
            g = analysis.groups[group]
            # rank units, not positions: positions that share a channel (rotary pairs, a
            # parameter shared by all heads) must be kept or dropped together
            units = group_units(g, gate.values.detach().double().numpy())
            mode = self.options.mode
            if mode == "rank" and units.channels.shape[0] == 1 and g.layout.shape[0] > 1:
                mode = "same-index"
            unit_mask = sync_scores(torch.as_tensor(units.scores), mode=mode,
                                    threshold=self.options.threshold,
                                    align=max(1, self.options.align // units.per_unit))
            kept = units.channels[unit_mask.numpy()]
            mask = torch.from_numpy(np.isin(g.layout, kept))
            gate.set_mask(mask)
            changes.append(f"group {group}: keep {int(mask.sum(dim=1).max())} of {mask.shape[1]}"
                           f" per head in {int(mask.any(dim=1).sum())} of {mask.shape[0]} "
                           f"heads ({mode})")
        return PassResult(gm, True, changes)
