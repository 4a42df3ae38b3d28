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
from fxprune.errors import InputError, PlanError
from fxprune.macs import count_macs
from fxprune.meta import (
    ANALYSIS_KEY,
    CRITERION_KEY,
    DENSE_MACS_KEY,
    MACS_RATIO_KEY,
    PLAN_KEY,
    SUMMARY_KEY,
)
from fxprune.planning.allocation import Kept, allocate, keep_masks
from fxprune.planning.criteria import CRITERIA, channel_scores
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
         match_qk_v: bool | None = None) -> PrunePlan:
    """Decide what to prune without slicing (see :func:`prune` for the arguments).

    Example:
        >>> import torch
        >>> from fxprune.models.reference import tiny_vit
        >>> p = plan(tiny_vit(), torch.randn(1, 3, 32, 32), macs_ratio=0.6, align=4)
        >>> sorted({p.analysis.groups[g].kind for g in p.masks})
        ['mlp', 'qk', 'v']
    """
    return _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare,
                 dense_sites, heads, match_qk_v)


def _plan(model, example_inputs, macs_ratio, criterion, align, seed, prepare, dense_sites,
          heads, match_qk_v, share_params: bool = False) -> PrunePlan:
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
    keep_dense = {gi for i in dense_sites if 0 <= i < len(analysis.attention)
                  for gi in (analysis.attention[i].qk_group, analysis.attention[i].v_group)}
    prunable = [g for g in analysis.groups if g.prunable and g.index not in keep_dense]
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
          match_qk_v: bool | None = None) -> torch.fx.GraphModule:
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
                    dense_sites, heads, match_qk_v, share_params=True)
    gm, analysis, masks, dense = (decided.graph_module, decided.analysis, decided.masks,
                                  decided.dense_macs)
    model_storages = _storages(gm)
    result = Slice(keep=masks, inplace=True)(gm) if masks else None
    pruned = result.graph_module if result is not None else _dense_copy(gm)
    _own_tensors(pruned, model_storages)
    _plan_of_model_tensors(pruned, model)
    reached = count_macs(pruned) / dense
    pruned.meta[MACS_RATIO_KEY] = round(reached, 4)
    pruned.meta[DENSE_MACS_KEY] = dense
    pruned.meta[CRITERION_KEY] = criterion
    pruned.meta[SUMMARY_KEY] = _summary(analysis, masks)
    if reached > float(macs_ratio) + 0.02:
        warnings.warn(f"fxprune.prune: reached macs_ratio {reached:.3f}, above the target "
                      f"{macs_ratio} (the unfrozen groups cannot go lower at align={align}); "
                      "frozen groups stay dense", stacklevel=2)
    return pruned


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

    if not share_params:
        return copy_graph_module(gm)
    memo = {id(t): t for _, t in gm.named_parameters(remove_duplicate=False)}
    memo.update((id(t), t) for _, t in gm.named_buffers(remove_duplicate=False))
    return copy_graph_module(gm, memo=memo)


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
