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
    ANALYSIS_FINGERPRINT_KEY,
    ANALYSIS_KEY,
    CRITERION_KEY,
    DENSE_MACS_KEY,
    FIXED_SIZES_KEY,
    INPUT_SHAPES_KEY,
    MACS_RATIO_KEY,
    PLAN_DATA_KEY,
    PLAN_KEY,
    REPORT_KEY,
    SUMMARY_KEY,
)
from fxprune.planning.allocation import Kept, allocate, keep_masks
from fxprune.planning.criteria import CRITERIA, channel_scores
from fxprune.planning.freeze import as_inputs, freeze_unsliceable, unsliceable
from fxprune.planning.plan import Plan
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
    return _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare,
                 dense_sites, heads, match_qk_v, keep_dense=keep_dense)


def _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare, dense_sites,
          heads, match_qk_v, share_params: bool = False, keep_dense=()) -> PrunePlan:
    """:func:`plan`; with ``share_params`` the returned graph's modules are its own but its
    parameters and buffers are still the model's (:func:`prune` slices, then copies only the
    ones slicing did not replace: see :func:`_own_tensors`)."""
    _validate(macs_ratio, criterion, align)
    gm = trace(model, example_inputs)
    # fx shares submodules with the model it traced: own them before slicing in place
    gm = _own_copy(gm, share_params=share_params)
    if prepare:
        from fxprune.pipeline import prepare as run_prepare

        gm, _ = run_prepare(gm)
    analysis = analyze(gm)
    dense = count_macs(gm)
    dense_groups = {gi for i in dense_sites if 0 <= i < len(analysis.attention)
                    for gi in (analysis.attention[i].qk_group, analysis.attention[i].v_group)}
    dense_groups |= groups_of_params(analysis, keep_dense)
    prunable = [g for g in analysis.groups if g.prunable and g.index not in dense_groups]
    # a group the slicer cannot slice exactly stays dense (frozen with the reason)
    freeze_unsliceable(gm, analysis, [g.index for g in prunable], as_inputs(example_inputs))
    prunable = [g for g in prunable if g.frozen is None]
    if not prunable:
        reasons = sorted({g.frozen for g in analysis.groups if g.frozen})
        raise PlanError(WHERE, "the analysis found no prunable channel group"
                        + (f" (frozen: {'; '.join(reasons[:3])})" if reasons else ""),
                        hint="print(fxprune.analyze(fxprune.trace(model, x))) shows why")
    scores = channel_scores(gm, analysis, criterion, seed=seed, groups=prunable)
    if heads not in ("channels", "whole"):
        raise InputError(WHERE, f"heads must be 'channels' or 'whole', got {heads!r}")
    whole = ()
    if heads == "whole":
        ids = {g.index for g in prunable}
        whole = tuple(s.index for s in analysis.attention
                      if s.qk_group in ids and s.v_group in ids
                      and analysis.groups[s.heads_group].frozen is None
                      and not analysis.groups[s.qk_group].shared_across_heads
                      and not analysis.groups[s.v_group].shared_across_heads)
    ids = {g.index for g in prunable}
    paired = tuple(s.index for s in analysis.attention
                   if s.index not in whole and s.qk_group in ids and s.v_group in ids
                   and (match_qk_v if match_qk_v is not None else s.uses_sdpa))
    kept = allocate(gm, analysis, scores, float(macs_ratio) * dense, dense, align, whole,
                    paired)
    masks = keep_masks(analysis, scores, kept)
    return PrunePlan(gm, analysis, scores, kept, masks, dense)


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
    the unfrozen groups cannot reach the target, a warning says what was reached.

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
        ...                         torch.nn.Linear(64, 16))
        >>> p = fxprune.prune(m, torch.randn(4, 16), macs_ratio=0.5, criterion="l1")
        >>> p.meta["fxprune.plan"]["0.weight"][0].numel(), p.meta["fxprune.macs_ratio"]
        (32, 0.5)
    """
    from fxprune.passes.slice import Slice

    # the plan's graph shares the model's parameters: copying them all up front would be
    # wasted on the pruned ones, which slicing replaces; the others are copied after it
    decided = _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare,
                    dense_sites, heads, match_qk_v, share_params=True, keep_dense=keep_dense)
    gm, analysis, masks, dense = (decided.graph_module, decided.analysis, decided.masks,
                                  decided.dense_macs)
    model_storages = _storages(gm)
    try:
        result = Slice(keep=masks, inplace=True)(gm) if masks else None
    except SliceError:
        # the planned masks fail where the trial ones passed: plan again, leave the groups
        # that fail with their planned masks dense (frozen, in the report)
        decided = _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare,
                        dense_sites, heads, match_qk_v, share_params=True)
        gm, analysis, masks = decided.graph_module, decided.analysis, decided.masks
        for gi, why in unsliceable(gm, analysis, masks, as_inputs(example_inputs)).items():
            analysis.groups[gi].frozen = f"{why} (with its planned mask)"
            del masks[gi]
        result = Slice(keep=masks, inplace=True)(gm) if masks else None
    pruned = result.graph_module if result is not None else _dense_copy(gm)
    _own_tensors(pruned, model_storages)
    _plan_of_model_tensors(pruned, model)
    reached = count_macs(pruned) / dense
    pruned.meta[MACS_RATIO_KEY] = round(reached, 4)
    pruned.meta[DENSE_MACS_KEY] = dense
    pruned.meta[CRITERION_KEY] = criterion
    pruned.meta[SUMMARY_KEY] = _summary(analysis, masks)
    if PLAN_DATA_KEY not in pruned.meta:  # nothing was sliced: an empty plan
        shapes = {n: list(t.shape) for n, t in pruned.state_dict().items()}
        pruned.meta[PLAN_DATA_KEY] = Plan.from_slice(gm, analysis, {}, {}, shapes)
    pruned.meta[PLAN_DATA_KEY].info.update(macs_ratio=round(reached, 4), dense_macs=int(dense),
                                           criterion=criterion, align=align)
    _note_fixed_sizes(gm, pruned)
    pruned.meta[REPORT_KEY] = report = prune_report(analysis, masks, macs_ratio, reached)
    if not report["target_met"]:
        warnings.warn(f"fxprune.prune: reached macs_ratio {reached:.3f}, above the target "
                      f"{macs_ratio} (the unfrozen groups cannot go lower at align={align}); "
                      f"frozen groups stay dense: {report_blockers(report)}", stacklevel=2)
    return pruned


def _note_fixed_sizes(prepared, pruned) -> None:
    """Say so (warning, meta, plan) when preparation inlined attention with the traced sizes:
    the pruned model then runs at the traced input size only, whatever the dense model took."""
    fixed = prepared.meta.get(FIXED_SIZES_KEY) or pruned.meta.get(FIXED_SIZES_KEY)
    if not fixed:
        return
    pruned.meta[FIXED_SIZES_KEY] = list(fixed)
    pruned.meta[PLAN_DATA_KEY].info["fixed_sizes"] = list(fixed)
    shapes = pruned.meta.get(INPUT_SHAPES_KEY) or []
    batch_free = all("batch free" in f for f in fixed)
    warnings.warn(f"fxprune.prune: the pruned model runs at the traced input size only "
                  f"({', '.join(str(tuple(s)[1:]) for s in shapes)} after the batch dim"
                  f"{'; any batch size' if batch_free else ', and the traced batch size'}): "
                  f"{len(fixed)} opaque call(s) were decomposed with the traced sizes as "
                  f"constants ({', '.join(fixed[:2])}{', ...' if len(fixed) > 2 else ''}); "
                  "prune at the resolution you deploy at", stacklevel=3)


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


def _plan_of_model_tensors(pruned, model) -> None:
    """The plan names the model's own parameters and buffers only: a tensor constant the
    tracer created (a plain tensor attribute, e.g. a rotary table, becomes
    ``_tensor_constant0``) is sliced in the pruned graph but has no name in the model."""
    plan = pruned.meta.get(PLAN_KEY)
    if not plan:
        return
    if isinstance(model, torch.nn.Module):
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    elif hasattr(model, "state_dict") and hasattr(model, "constants"):  # ExportedProgram
        names = set(model.state_dict) | set(model.constants)
    else:
        return
    pruned.meta[PLAN_KEY] = {k: v for k, v in plan.items() if k in names}


def _own_copy(gm, share_params: bool = False):
    """A copy of ``gm`` that owns its modules (fx shares them with the traced model). With
    ``share_params`` the parameters and buffers stay shared (see :func:`_own_tensors`)."""
    from fxprune.passbase import copy_graph_module

    return copy_graph_module(gm, share_tensors=share_params)


def _storages(gm) -> set[int]:
    """Data pointers of the storages behind ``gm``'s parameters and buffers."""
    tensors = [t for _, t in gm.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in gm.named_buffers(remove_duplicate=False)]
    return {t.untyped_storage().data_ptr() for t in tensors
            if t.device.type != "meta" and t.numel()}


def _own_tensors(gm, storages: set[int]) -> None:
    """Replace every parameter and buffer of ``gm`` whose storage is one of ``storages`` (the
    model's) by a copy, so that the pruned model never shares memory with the original; tied
    names stay one tensor."""
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.device.type == "meta" or not t.numel() or \
                        t.untyped_storage().data_ptr() not in storages:
                    continue
                if id(t) not in copies:
                    new = t.detach().clone()
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    copies[id(t)] = new
                table[name] = copies[id(t)]


def _dense_copy(gm):
    import copy

    out = copy.deepcopy(gm)
    out.meta.pop(ANALYSIS_KEY, None)
    out.meta.pop(ANALYSIS_FINGERPRINT_KEY, None)
    out.meta[PLAN_KEY] = {}
    return out


def _summary(analysis, masks) -> list[dict]:
    """Per attention site and MLP: widths before and after (for reports)."""
    rows = []
    for s in analysis.attention:
        row = {"site": s.index, "kind": s.kind, "heads": s.num_heads,
               "heads_after": s.num_heads, "qk_dim": s.qk_head_dim, "v_dim": s.v_head_dim,
               "qk_dim_after": s.qk_head_dim, "v_dim_after": s.v_head_dim}
        for gi, key in ((s.qk_group, "qk_dim_after"), (s.v_group, "v_dim_after")):
            if gi in masks:
                per_head = masks[gi].sum(axis=1)
                row[key] = int(per_head.max())
                row["heads_after"] = int((per_head > 0).sum())
        rows.append(row)
    for g in analysis.groups:
        if g.kind == "mlp":
            rows.append({"group": g.index, "kind": "mlp", "width": g.width,
                         "width_after": int(masks[g.index].sum()) if g.index in masks
                         else g.width, "frozen": g.frozen})
    return rows
