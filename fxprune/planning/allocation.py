"""Allocating the MACs budget: how many units (or heads) every group keeps, then which ones.

Greedy over steps of ``align`` channels per head: each step removes the lowest-ranked
channels (scores averaged across heads rank by rank, AMAP's synchronisation) of the candidate
where they cost the least importance, until the MACs reach the target. A candidate is a
group (:class:`KeptChannels`), a site pruned by whole heads (:class:`KeptHeads`), or a site
whose q/k and v keep the same head dim (:class:`KeptPairedChannels`); the decisions are
returned as these records and :func:`keep_masks` turns them into binary masks per group.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> from fxprune.planning.criteria import channel_scores
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)); a = fxprune.analyze(gm)
    >>> scores = channel_scores(gm, a, "l1")
    >>> dense = fxprune.count_macs(gm)
    >>> kept = allocate(gm, a, scores, 0.7 * dense, dense, align=4)
    >>> all(isinstance(k, KeptChannels) for k in kept)
    True
    >>> masks = keep_masks(a, scores, kept)
    >>> sorted({a.groups[g].kind for g in masks})
    ['mlp', 'qk', 'v']
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import numpy as np

from fxprune.planning.cost import CostModel
from fxprune.planning.units import Units, group_units
from fxprune.slicing import label_keep


@dataclasses.dataclass(frozen=True)
class KeptChannels:
    """Every head of group ``group`` keeps its best ``units`` units."""

    group: int
    units: int


@dataclasses.dataclass(frozen=True)
class KeptHeads:
    """Attention site ``site`` keeps its best ``heads`` heads whole (q/k and v together)."""

    site: int
    heads: int


@dataclasses.dataclass(frozen=True)
class KeptPairedChannels:
    """The q/k and the v group of attention site ``site`` each keep ``units`` units per
    head (equal head dims, as SDPA's fast kernels need)."""

    site: int
    units: int


Kept = KeptChannels | KeptHeads | KeptPairedChannels


def allowed_counts(units: int, per_unit: int, align: int) -> list[int]:
    """Allowed kept unit counts, largest first: every head keeps ``k * per_unit`` positions,
    which must be a multiple of ``align`` (or everything).

    Example:
        >>> allowed_counts(6, 1, 2)
        [6, 4, 2]
    """
    return [units] + [k for k in range(units - 1, 0, -1) if (k * per_unit) % align == 0]


def head_scores(scores: dict[int, np.ndarray], site) -> np.ndarray:
    """Score per head of a site: mean normalised score of its q/k and v channels."""
    parts = []
    for gi in (site.qk_group, site.v_group):
        sc = scores[gi]
        parts.append(sc.mean(axis=1) / max(float(sc.mean()), 1e-12))
    return np.mean(parts, axis=0)


@dataclasses.dataclass
class _Candidate:
    """One allocation candidate while the budget is spent: its allowed counts, how far down
    them it went, its ranks' normalised scores and the MACs one count step saves."""

    kind: type
    index: int         # group index for KeptChannels, site index otherwise
    steps: list[int]
    ranked: np.ndarray
    cost: float
    i: int = 0

    def priority(self) -> float:
        """Mean normalised score of the ranks the next step removes: the globally least
        important ranks go first, whatever the group (MACs only decide when to stop)."""
        k_now, k_next = self.steps[self.i], self.steps[self.i + 1]
        return float(self.ranked[k_next:k_now].mean())

    def heap_entry(self, seq: int) -> tuple:
        # groups before sites on equal priority, then by index: a deterministic order
        return (self.priority(), 0 if self.kind is KeptChannels else 1, self.index, seq)

    def decision(self) -> Kept:
        return self.kind(self.index, self.steps[self.i])


def _ranked(units: Units) -> np.ndarray:
    """Scores sorted within each head, averaged rank by rank over heads, normalised to mean 1
    (AMAP's synchronisation)."""
    ranked = np.sort(units.scores, axis=1)[:, ::-1].mean(axis=0)
    return ranked / max(float(ranked.mean()), 1e-12)


def _whole_head_candidates(cost_model, analysis, scores, sites) -> list[_Candidate]:
    out = []
    for i in sites:
        site = analysis.attention[i]
        heads = site.num_heads
        if heads < 2:
            continue
        qk, v = analysis.groups[site.qk_group], analysis.groups[site.v_group]
        ranked = np.sort(head_scores(scores, site))[::-1]
        out.append(_Candidate(KeptHeads, i, list(range(heads, 0, -1)), ranked,
                              cost_model.per_head(qk, v)))
    return out


def _paired_candidates(cost_model, analysis, scores, sites, align) -> list[_Candidate]:
    out = []
    for i in sites:
        site = analysis.attention[i]
        qk, v = analysis.groups[site.qk_group], analysis.groups[site.v_group]
        uq, uv = group_units(qk, scores[qk.index]), group_units(v, scores[v.index])
        if uq.channels.shape != uv.channels.shape or uq.per_unit != uv.per_unit:
            continue
        steps = allowed_counts(uq.channels.shape[1], uq.per_unit, align)
        if len(steps) < 2:
            continue
        step = max(1, steps[0] - steps[1])
        cost = cost_model.per_unit(qk, uq, step) + cost_model.per_unit(v, uv, step)
        ranked = np.mean([_ranked(uq), _ranked(uv)], axis=0)
        out.append(_Candidate(KeptPairedChannels, i, steps, ranked, cost))
    return out


def _group_candidates(cost_model, analysis, scores, skip, align) -> list[_Candidate]:
    out = []
    for gi, score in scores.items():
        if gi in skip:
            continue
        g = analysis.groups[gi]
        units = group_units(g, score)
        steps = allowed_counts(units.channels.shape[1], units.per_unit, align)
        if len(steps) < 2:
            continue
        cost = cost_model.per_unit(g, units, max(1, steps[0] - steps[1]))
        if cost <= 0:
            continue
        out.append(_Candidate(KeptChannels, gi, steps, _ranked(units), cost))
    return out


#: how far from the target (a fraction of the dense MACs) the greedy's plan may land before
#: it is corrected: below, a coarse last step (few heads, a small stem width, a large
#: alignment) cut far more than the target asks; above, the per-unit prices missed an
#: interaction (a layer between two narrowed groups, k^T v in linear attention)
SLACK = 0.01


def allocate(gm, analysis, scores: dict[int, np.ndarray], target_macs: float,
             dense_macs: float, align: int, whole_head_sites=(),
             paired_sites=(), slack: float = SLACK) -> list[Kept]:
    """Kept count per head for every scored group so that MACs land at or below target.

    Sites in ``whole_head_sites`` are pruned by whole heads instead (:class:`KeptHeads`),
    their q/k and v groups together; sites in ``paired_sites`` keep the same head dim for q/k
    and v (:class:`KeptPairedChannels`); every other scored group gets a
    :class:`KeptChannels`. Returns one record per candidate (a group or site that had room
    to shrink), whole-head sites first, then paired sites, then groups.

    The greedy prices steps with per-unit savings; the plan it reaches is then measured
    exactly (all groups narrowed at once, as ``count_macs`` of the sliced model counts it).
    A plan within ``slack * dense`` of the target stands; any other is refined (see
    :func:`refine`) to land in ``[target - slack * dense, target]`` where the steps allow.
    """
    cost_model = CostModel(gm, analysis)
    candidates = _whole_head_candidates(cost_model, analysis, scores, whole_head_sites)
    candidates += _paired_candidates(cost_model, analysis, scores, paired_sites, align)
    # a site's groups are allocated with the site; the groups of a whole-head site with a
    # single head stay as they are, those of a pair that could not be paired go alone
    skip = {gi for c in candidates for gi in (analysis.attention[c.index].qk_group,
                                               analysis.attention[c.index].v_group)}
    skip.update(gi for i in whole_head_sites for gi in (analysis.attention[i].qk_group,
                                                         analysis.attention[i].v_group))
    candidates += _group_candidates(cost_model, analysis, scores, skip, align)
    heap = [c.heap_entry(seq) for seq, c in enumerate(candidates)]
    heapq.heapify(heap)
    macs = float(dense_macs)
    taken: list[int] = []
    while macs > target_macs and heap:
        *_, seq = heapq.heappop(heap)
        c = candidates[seq]
        macs -= c.cost * (c.steps[c.i] - c.steps[c.i + 1])
        c.i += 1
        taken.append(seq)
        if c.i + 1 < len(c.steps):
            heapq.heappush(heap, c.heap_entry(seq))
    measure = _ExactMacs(cost_model, analysis, scores, candidates, dense_macs)
    refine(measure, candidates, heap, taken, target_macs, slack * float(dense_macs))
    return [c.decision() for c in candidates]


class _ExactMacs:
    """MACs of the model with every candidate at its current step, all groups narrowed at
    once (a layer between two narrowed groups shrinks on both sides)."""

    def __init__(self, cost_model, analysis, scores, candidates, dense_macs):
        self.cost_model, self.analysis, self.scores = cost_model, analysis, scores
        self.candidates, self.dense = candidates, float(dense_macs)
        self._masks: dict[tuple[int, int], dict[int, np.ndarray]] = {}

    def __call__(self) -> float:
        masks: dict[int, np.ndarray] = {}
        for seq, c in enumerate(self.candidates):
            if c.i == 0:
                continue
            if (seq, c.i) not in self._masks:
                self._masks[seq, c.i] = keep_masks(self.analysis, self.scores, [c.decision()])
            masks.update(self._masks[seq, c.i])
        if not masks:
            return self.dense
        groups = [self.analysis.groups[gi] for gi in masks]
        lab_keep = label_keep(self.analysis, masks)
        return self.dense - self.cost_model.saved_under(groups, lab_keep)


def refine(measure, candidates, heap, taken: list[int], target: float, slack: float) -> None:
    """Bring the greedy's plan (``taken``: its steps in order, ``heap``: the next ones) into
    ``[target - slack, target]`` measured by ``measure()``, where the steps allow: while below
    give back the latest steps; while above ``target`` take the next steps by priority,
    passing over any that would land below ``target - slack`` (a coarse one), then try each
    passed-over step. A plan within ``slack`` of the target is left as it is; otherwise the
    plan kept is the best one measured (at or below the target and closest to it, the
    greedy's own included), so refining never makes a plan worse.
    """
    best: list = []

    def measured() -> float:
        macs = measure()
        key = (macs <= target, macs if macs <= target else -macs)
        if not best or key > best[0]:
            best[:] = [key, [c.i for c in candidates]]
        return macs

    macs = measured()
    if abs(macs - target) <= slack:
        return
    floor = target - slack
    passed: set[int] = set()
    while macs < floor and taken:
        seq = taken.pop()
        candidates[seq].i -= 1
        passed.add(seq)
        macs = measured()
    while macs > target and heap:
        *_, seq = heapq.heappop(heap)
        c = candidates[seq]
        if seq in passed or c.i + 1 >= len(c.steps):
            continue
        c.i += 1
        after = measured()
        if after < floor:
            c.i -= 1
            passed.add(seq)
            continue
        macs = after
        taken.append(seq)
        if c.i + 1 < len(c.steps):
            heapq.heappush(heap, c.heap_entry(seq))
    if macs > target:
        for seq in sorted(passed):
            c = candidates[seq]
            if c.i + 1 < len(c.steps):
                c.i += 1
                measured()
                c.i -= 1
    for c, i in zip(candidates, best[1]):
        c.i = i


def keep_masks(analysis, scores: dict[int, np.ndarray],
               kept: Sequence[Kept]) -> dict[int, np.ndarray]:
    """Binary keep masks (heads, size) per group index from scores and :func:`allocate`'s
    decisions: every head keeps its own top units (the same ones in every head where channels
    are shared across heads). Groups that keep everything get no mask."""
    masks = {}
    for k in kept:
        if isinstance(k, KeptPairedChannels):
            site = analysis.attention[k.site]
            masks.update(keep_masks(analysis, scores, [KeptChannels(site.qk_group, k.units),
                                                       KeptChannels(site.v_group, k.units)]))
        elif isinstance(k, KeptHeads):
            site = analysis.attention[k.site]
            if k.heads >= site.num_heads:
                continue
            top = np.argsort(-head_scores(scores, site), kind="stable")[:k.heads]
            for group in (site.qk_group, site.v_group):
                mask = np.zeros(analysis.groups[group].layout.shape, dtype=bool)
                mask[top] = True
                masks[group] = mask
        else:
            g = analysis.groups[k.group]
            units = group_units(g, scores[k.group])
            if k.units >= units.channels.shape[1]:
                continue
            top = np.argsort(-units.scores, axis=1, kind="stable")[:, :k.units]
            kept_channels = np.take_along_axis(units.channels, top, axis=1).ravel()
            masks[k.group] = np.isin(g.layout, kept_channels)
    return masks
