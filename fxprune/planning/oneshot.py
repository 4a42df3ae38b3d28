"""``fxprune.prune``: one-shot structured pruning to a MACs target, no training.

Pipeline: trace -> prepare (decompose opaque attention, split fused q/k/v) -> analyze ->
score channels (:mod:`fxprune.planning.criteria`) -> allocate kept counts per group and
synchronise ranks per head (:mod:`fxprune.planning.allocation`, priced by
:mod:`fxprune.planning.cost` over :mod:`fxprune.planning.units`) -> slice.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> _ = torch.manual_seed(0)
    >>> model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    >>> pruned = fxprune.prune(model, x, macs_ratio=0.7, criterion="l1", align=4)
    >>> 0.65 <= pruned.meta["fxprune.macs_ratio"] <= 0.7   # at or just below the target
    True
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.analysis.engine import analyze
from fxprune.errors import InputError, PlanError, SliceError
from fxprune.macs import count_macs
from fxprune.meta import (
    CRITERION_KEY,
    DENSE_MACS_KEY,
    MACS_RATIO_KEY,
    PLAN_DATA_KEY,
    REPORT_KEY,
    SUMMARY_KEY,
)
from fxprune.planning.allocation import Kept, allocate, keep_masks
from fxprune.planning.criteria import CRITERIA, channel_scores
from fxprune.planning.freeze import as_inputs, freeze_unsliceable, unsliceable
from fxprune.planning.plan import Plan
from fxprune.planning.pruned import (
    dense_copy,
    note_fixed_sizes,
    own_tensors,
    restrict_plan_to_model,
    storages_of,
    summary_rows,
)
from fxprune.planning.report import prune_report, report_blockers
from fxprune.tracing import trace

WHERE = "fxprune.prune"


def _validate(macs_ratio, criterion, align) -> None:
    if isinstance(macs_ratio, bool) or not isinstance(macs_ratio, (int, float)) or not (
            0.0 < float(macs_ratio) <= 1.0):
        raise InputError(WHERE, f"macs_ratio must be in (0, 1], got {macs_ratio!r}",
                         hint="e.g. macs_ratio=0.7 keeps 70% of the dense model's MACs")
    if criterion not in CRITERIA:
        raise InputError(WHERE, f"unknown criterion {criterion!r}",
                         hint=f"use one of {', '.join(CRITERIA)}")
    if not isinstance(align, int) or align < 1:
        raise InputError(WHERE, f"align must be a positive int, got {align!r}",
                         hint="align=8 keeps widths multiples of 8 (fast GPU kernels)")


@dataclasses.dataclass
class PrunePlan:
    """Everything ``prune`` decides before slicing: the prepared graph, its analysis, the
    keep-scores per group index, the allocation's decisions (kept units or heads, see
    :mod:`fxprune.planning.allocation`) and the binary keep masks per group index."""

    graph_module: torch.fx.GraphModule
    analysis: Any
    scores: dict[int, np.ndarray]
    kept: list[Kept]
    masks: dict[int, np.ndarray]
    dense_macs: int


class Pruner:
    """A model traced, prepared and analysed once, to plan or prune at many targets.

    Tracing, preparation, analysis and the freeze step's trial slices depend on the model,
    its example inputs, ``prepare``, ``dense_sites`` and ``keep_dense`` only; every
    :meth:`prune` / :meth:`plan` then scores, allocates and slices a fresh copy of the graph.
    ``pruner.prune(r, ...)`` returns what ``fxprune.prune(model, x, r, ...)`` returns (same
    plan, same weights), at a fraction of the cost from the second call on: a sweep over
    ratios or criteria pays for one trace. The model's tensors are shared until a call slices;
    pruned models never share memory with the model or with each other. Change the model's
    parameters in place and the cached freeze decisions may no longer hold: build a new Pruner.

    Example:
        >>> import torch, fxprune
        >>> from fxprune.models.reference import tiny_vit
        >>> _ = torch.manual_seed(0)
        >>> model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
        >>> pruner = fxprune.Pruner(model, x)
        >>> [round(pruner.prune(r, criterion="l1", align=4).meta["fxprune.macs_ratio"], 1)
        ...  for r in (0.8, 0.6)]
        [0.8, 0.6]
    """

    def __init__(self, model, example_inputs, *, prepare: bool = True,
                 dense_sites: tuple[int, ...] = (), keep_dense: tuple[str, ...] = ()):
        self.model, self.example_inputs = model, example_inputs
        self.prepare, self.dense_sites = prepare, tuple(dense_sites)
        self.keep_dense = (keep_dense,) if isinstance(keep_dense, str) else tuple(keep_dense)
        self._graph, self._analysis, self._dense_macs, self._prunable = self._build()

    def _build(self):
        """The prepared graph (sharing the model's tensors), its analysis with the groups
        the slicer cannot slice frozen, its dense MACs and its prunable group indices."""
        from fxprune.passbase import copy_graph_module

        # fx shares submodules with the model it traced: own them before slicing in place
        gm = copy_graph_module(trace(self.model, self.example_inputs), share_tensors=True)
        if self.prepare:
            from fxprune.pipeline import prepare as run_prepare

            gm, _ = run_prepare(gm)
        analysis = analyze(gm)
        dense = count_macs(gm)
        dense_groups = {gi for i in self.dense_sites if 0 <= i < len(analysis.attention)
                        for gi in (analysis.attention[i].qk_group,
                                   analysis.attention[i].v_group)}
        dense_groups |= groups_of_params(analysis, self.keep_dense)
        prunable = [g.index for g in analysis.groups
                    if g.prunable and g.index not in dense_groups]
        # a group the slicer cannot slice exactly stays dense (frozen with the reason)
        freeze_unsliceable(gm, analysis, prunable, as_inputs(self.example_inputs))
        return gm, analysis, dense, [gi for gi in prunable if analysis.groups[gi].frozen is None]

    def plan(self, macs_ratio: float = 0.7, criterion: str = "similarity", align: int = 8,
             seed: int = 0, heads: str = "channels", match_qk_v: bool | None = None
             ) -> PrunePlan:
        """What :meth:`prune` would keep (see :func:`prune` for the arguments), on a copy of
        the prepared graph that owns its tensors."""
        return self._decide(macs_ratio, criterion, align, seed, heads, match_qk_v,
                            share_tensors=False)

    def prune(self, macs_ratio: float = 0.7, criterion: str = "similarity", align: int = 8,
              seed: int = 0, heads: str = "channels", match_qk_v: bool | None = None
              ) -> torch.fx.GraphModule:
        """The pruned model (see :func:`prune` for the arguments and what it carries)."""
        return self._prune(macs_ratio, criterion, align, seed, heads, match_qk_v, stacklevel=3)

    def _decide(self, macs_ratio, criterion, align, seed, heads, match_qk_v, *,
                share_tensors: bool, base=None) -> PrunePlan:
        from fxprune.passbase import copy_graph_module

        _validate(macs_ratio, criterion, align)
        base_gm, analysis, dense, prunable = base or (
            self._graph, self._analysis, self._dense_macs, self._prunable)
        if not prunable:
            reasons = sorted({g.frozen for g in analysis.groups if g.frozen})
            raise PlanError(WHERE, "the analysis found no prunable channel group"
                            + (f" (frozen: {'; '.join(reasons[:3])})" if reasons else ""),
                            hint="print(fxprune.analyze(fxprune.trace(model, x))) shows why")
        if heads not in ("channels", "whole"):
            raise InputError(WHERE, f"heads must be 'channels' or 'whole', got {heads!r}")
        gm = copy_graph_module(base_gm, share_tensors=share_tensors)
        groups = [analysis.groups[gi] for gi in prunable]
        scores = channel_scores(gm, analysis, criterion, seed=seed, groups=groups)
        ids = set(prunable)
        whole = ()
        if heads == "whole":
            whole = tuple(s.index for s in analysis.attention
                          if s.qk_group in ids and s.v_group in ids
                          and analysis.groups[s.heads_group].frozen is None
                          and not analysis.groups[s.qk_group].shared_across_heads
                          and not analysis.groups[s.v_group].shared_across_heads)
        paired = tuple(s.index for s in analysis.attention
                       if s.index not in whole and s.qk_group in ids and s.v_group in ids
                       and (match_qk_v if match_qk_v is not None else s.uses_sdpa))
        kept = allocate(gm, analysis, scores, float(macs_ratio) * dense, dense, align, whole,
                        paired)
        return PrunePlan(gm, analysis, scores, kept, keep_masks(analysis, scores, kept), dense)

    def _prune(self, macs_ratio, criterion, align, seed, heads, match_qk_v, *,
               stacklevel: int) -> torch.fx.GraphModule:
        from fxprune.passes.slice import Slice

        # the plan's graph shares the model's tensors: copying them all up front would be
        # wasted on the pruned ones, which slicing replaces; the others are copied after it
        decided = self._decide(macs_ratio, criterion, align, seed, heads, match_qk_v,
                               share_tensors=True)
        gm, analysis, masks, dense = (decided.graph_module, decided.analysis, decided.masks,
                                      decided.dense_macs)
        shared = storages_of(gm)
        try:
            result = Slice(keep=masks, inplace=True)(gm) if masks else None
        except SliceError:
            # the planned masks fail where the trial ones passed: plan again on a graph of
            # its own, leave the groups that fail with their planned masks dense (frozen,
            # in the report); the cached analysis stays as it was
            decided = self._decide(macs_ratio, criterion, align, seed, heads, match_qk_v,
                                   share_tensors=True, base=self._build())
            gm, analysis, masks = decided.graph_module, decided.analysis, decided.masks
            shared = storages_of(gm)
            for gi, why in unsliceable(gm, analysis, masks,
                                       as_inputs(self.example_inputs)).items():
                analysis.groups[gi].frozen = f"{why} (with its planned mask)"
                del masks[gi]
            result = Slice(keep=masks, inplace=True)(gm) if masks else None
        pruned = result.graph_module if result is not None else dense_copy(gm)
        # nothing the pruned model holds is shared with the model, the cached graph or
        # another pruned model (preparation creates tensors of its own, e.g. split q/k/v)
        own_tensors(pruned, shared)
        restrict_plan_to_model(pruned, self.model)
        reached = count_macs(pruned) / dense
        pruned.meta[MACS_RATIO_KEY] = round(reached, 4)
        pruned.meta[DENSE_MACS_KEY] = dense
        pruned.meta[CRITERION_KEY] = criterion
        pruned.meta[SUMMARY_KEY] = summary_rows(analysis, masks)
        if PLAN_DATA_KEY not in pruned.meta:  # nothing was sliced: an empty plan
            shapes = {n: list(t.shape) for n, t in pruned.state_dict().items()}
            pruned.meta[PLAN_DATA_KEY] = Plan.from_slice(gm, analysis, {}, {}, shapes)
        pruned.meta[PLAN_DATA_KEY].info.update(macs_ratio=round(reached, 4),
                                               dense_macs=int(dense), criterion=criterion,
                                               align=align)
        note_fixed_sizes(gm, pruned, stacklevel=stacklevel + 1)
        pruned.meta[REPORT_KEY] = report = prune_report(analysis, masks, macs_ratio, reached)
        if not report["target_met"]:
            warnings.warn(f"fxprune.prune: reached macs_ratio {reached:.3f}, above the target "
                          f"{macs_ratio} (the unfrozen groups cannot go lower at "
                          f"align={align}); frozen groups stay dense: "
                          f"{report_blockers(report)}", stacklevel=stacklevel)
        return pruned


def plan(model, example_inputs, macs_ratio: float = 0.7, criterion: str = "similarity",
         align: int = 8, seed: int = 0, prepare: bool = True,
         dense_sites: tuple[int, ...] = (), heads: str = "channels",
         match_qk_v: bool | None = None, keep_dense: tuple[str, ...] = ()) -> PrunePlan:
    """Decide what to prune without slicing (see :func:`prune` for the arguments).

    Example:
        >>> import torch
        >>> from fxprune.models.reference import tiny_vit
        >>> p = plan(tiny_vit(), torch.randn(1, 3, 32, 32), macs_ratio=0.6, align=4)
        >>> sorted({p.analysis.groups[g].kind for g in p.masks})
        ['mlp', 'qk', 'v']
    """
    _validate(macs_ratio, criterion, align)
    return Pruner(model, example_inputs, prepare=prepare, dense_sites=dense_sites,
                  keep_dense=keep_dense).plan(macs_ratio, criterion, align, seed, heads,
                                              match_qk_v)


def prune(model, example_inputs, macs_ratio: float = 0.7, criterion: str = "similarity",
          align: int = 8, seed: int = 0, prepare: bool = True,
          dense_sites: tuple[int, ...] = (), heads: str = "channels",
          match_qk_v: bool | None = None, keep_dense: tuple[str, ...] = ()
          ) -> torch.fx.GraphModule:
    """One-shot structured pruning of ``model`` to ``macs_ratio`` of its MACs.

    ``criterion`` is ``"similarity"`` (AMAP eq. 1-3 with weight magnitude), ``"l1"``,
    ``"random"`` or ``"toast"`` (ToaSt's median-distance score, same k in every head, Q/K and
    V with independent masks); ``align`` rounds every kept count per head (and MLP width) to
    a multiple; ``dense_sites`` lists attention sites left dense (ToaSt leaves block 0 dense:
    ``dense_sites=(0,)``); ``heads="whole"`` removes whole heads (head dim kept) instead of
    channels inside heads, for comparison. ``match_qk_v`` makes q/k and v of a site keep the
    same head dim; by default it does so where the graph calls SDPA, whose fast CPU/GPU kernels
    need equal head dims (with different ones it falls back to a slower path and a pruned model
    can be slower than the dense one); ``False`` lets Q/K and V keep different head dims.
    ``keep_dense`` holds parameter-name globs (``"blocks.0.*"``): every group coupled to a
    matching parameter stays dense.
    Returns a smaller ``torch.fx.GraphModule``; ``pruned.meta["fxprune.plan"]`` maps every
    sliced parameter of the ORIGINAL model to ``{dim: kept indices}``, and
    ``pruned.meta["fxprune.macs_ratio"]`` is the ratio reached. Frozen groups stay dense. When
    the unfrozen groups cannot reach the target, a warning says what was reached. To prune
    one model at several targets, :class:`Pruner` traces and analyses it once.

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
        ...                         torch.nn.Linear(64, 16))
        >>> p = fxprune.prune(m, torch.randn(4, 16), macs_ratio=0.5, criterion="l1")
        >>> p.meta["fxprune.plan"]["0.weight"][0].numel(), p.meta["fxprune.macs_ratio"]
        (32, 0.5)
    """
    _validate(macs_ratio, criterion, align)
    return Pruner(model, example_inputs, prepare=prepare, dense_sites=dense_sites,
                  keep_dense=keep_dense)._prune(macs_ratio, criterion, align, seed, heads,
                                                match_qk_v, stacklevel=3)


def groups_of_params(analysis, patterns) -> set[int]:
    """Indices of the groups whose channels reach a parameter matching one of the globs.

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> a = fxprune.analyze(fxprune.trace(m, torch.randn(2, 4)))
        >>> groups_of_params(a, ["2.*"]), groups_of_params(a, ["nothing*"])
        ({0}, set())
    """
    import fnmatch

    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    found: set[int] = set()
    comps = analysis.components
    for name, entries in analysis.param_comps.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        for c in entries:
            gs = analysis.group_of_channel[comps.channel_of(np.asarray(c.lab).ravel())]
            found.update(int(g) for g in np.unique(gs) if g >= 0)
    return found
