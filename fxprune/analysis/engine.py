"""``fxprune.analyze``: attention sites and channel groups of a traced graph (read-only).

The analysis propagates channel labels through the graph (:mod:`fxprune.analysis.propagate`), solves
the couplings, and groups coupled channels by where they are contracted: q.k products give
``qk`` groups, channels carried through attention-times-value give ``v`` groups, channels
produced by one Linear and consumed by another give ``mlp`` groups, and the residual stream
(channels produced by several layers and added together) is ``embed``. Anything whose removal
would change the kept values freezes its group, with the reason.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> a = fxprune.analyze(fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)))
    >>> [(g.kind, g.num_heads, g.size) for g in a.groups if g.site == 0]
    [('qk', 3, 16), ('v', 3, 16), ('heads', 3, 1)]
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from fxprune.analysis.fingerprint import check_current, graph_fingerprint
from fxprune.analysis.grouping import (
    add_members,
    adopt_member_head_layouts,
    adopt_split_layouts,
    build_groups,
)
from fxprune.analysis.head_order import resolve_subset_params, tie_interleaved_heads
from fxprune.analysis.inputs import graph_to_analyze, warn_opaque
from fxprune.analysis.propagate import Propagator
from fxprune.analysis.records import Analysis, AttentionSite, ChannelGroup
from fxprune.analysis.sites import build_sites
from fxprune.errors import InputError
from fxprune.meta import ANALYSIS_FINGERPRINT_KEY, ANALYSIS_KEY, require_shapes
from fxprune.passbase import require_meta

__all__ = ["ANALYSIS_KEY", "Analysis", "AttentionSite", "ChannelGroup", "analyze",
           "get_analysis"]

log = logging.getLogger(__name__)


def analyze(gm, example_inputs=None, *, prepare: bool = True) -> Analysis:
    """Find attention sites and channel groups of a traced graph.

    Writes ``node.meta["fxprune.comps"]`` on every node and ``gm.meta["fxprune.analysis"]``;
    does not change the graph. Given a model (``nn.Module``, ``ExportedProgram``, or any of
    them with ``example_inputs``) it traces and, with ``prepare``, runs the preparation passes
    first; the graph it analysed is ``analysis.graph_module``. On an unprepared graph,
    attention it cannot see into (``nn.MultiheadAttention``, torchvision's window attention)
    is named in a warning and in ``analysis.unprepared``.

    Example:
        >>> import torch, fxprune
        >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(),
        ...                                        torch.nn.Linear(8, 4)), torch.randn(2, 4))
        >>> [(g.kind, g.size, g.frozen is None) for g in fxprune.analyze(gm).groups]
        [('mlp', 8, True)]
    """
    if not isinstance(gm, (torch.nn.Module, getattr(torch.export, "ExportedProgram", ()))):
        raise InputError("fxprune.analyze", f"expected a GraphModule, got {type(gm).__name__}",
                         hint="call fxprune.trace(model, example_inputs) first")
    built = example_inputs is not None or not isinstance(gm, torch.fx.GraphModule)
    gm = graph_to_analyze(gm, example_inputs, prepare)
    require_shapes("fxprune.analyze", gm)
    prop = Propagator(gm).run()
    comps = prop.store.finish()
    if prop.store.subset_params:
        resolve_subset_params(prop.store, comps)
        comps = prop.store.finish()
    if tie_interleaved_heads(gm, prop.store, comps, prop.sinks):
        comps = prop.store.finish()
    groups, group_of_channel, graph = build_groups(prop, comps)
    sites = build_sites(gm, prop, comps, groups, group_of_channel)
    add_members(gm, groups, comps, group_of_channel)
    adopt_member_head_layouts(gm, groups, comps)
    adopt_split_layouts(groups, comps, group_of_channel, prop.store.splits)
    analysis = Analysis(sites, groups, comps, prop.param_comps, prop.param_shapes,
                        [(n.name, w) for n, w in prop.opaque], group_of_channel, graph,
                        prop.param_aliases, graph_fingerprint(gm))
    analysis.unprepared = warn_opaque(gm)
    if built:
        analysis.graph_module = gm
    gm.meta[ANALYSIS_KEY] = analysis
    if log.isEnabledFor(logging.DEBUG):
        _log_decisions(analysis)
    gm.meta[ANALYSIS_FINGERPRINT_KEY] = analysis.fingerprint
    return analysis


def _log_decisions(analysis: Analysis) -> None:
    """One debug record per attention site and per group: what was found and, for a frozen
    group, why it stays dense."""
    for s in analysis.attention:
        log.debug("attention site %d: %s, %d heads, q.k at %s, groups qk=%s v=%s heads=%s",
                  s.index, s.kind, s.num_heads, s.qk_node.name, s.qk_group, s.v_group,
                  s.heads_group)
    for g in analysis.groups:
        log.debug("group %d: %s, %d x %d, contracted at %s; %s", g.index, g.kind,
                  g.layout.shape[0], g.layout.shape[1], ", ".join(s.node.name for s in g.sinks)
                  or "-", f"frozen: {g.frozen}" if g.frozen else "prunable")


def get_analysis(gm: torch.fx.GraphModule, pass_name: str) -> Analysis:
    """The analysis attached to ``gm`` or a :class:`PassOrderError` naming ``fxprune.analyze``
    (also when the graph changed after the analysis was computed)."""
    analysis = require_meta(pass_name, gm, ANALYSIS_KEY, "fxprune.analyze")
    check_current(gm, pass_name)
    return analysis
