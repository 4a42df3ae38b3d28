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

import collections
import dataclasses
import logging
import math
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx

from fxprune.analysis.fingerprint import check_current, graph_fingerprint
from fxprune.analysis.head_order import resolve_subset_params, tie_interleaved_heads
from fxprune.analysis.inputs import graph_to_analyze, warn_opaque
from fxprune.analysis.labels import Components
from fxprune.analysis.propagate import Propagator, RawSite, Sink
from fxprune.errors import InputError
from fxprune.meta import (
    ANALYSIS_FINGERPRINT_KEY,
    ANALYSIS_KEY,
    COMPS_KEY,
    INPUT_SHAPES_KEY,
    require_shapes,
)
from fxprune.ops import op_name
from fxprune.passbase import require_meta

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionSite:
    """One attention computation found in the graph."""

    index: int
    kind: str                      # "softmax" | "window" | "linear"
    num_heads: int
    qk_head_dim: int
    v_head_dim: int
    scale: float | None
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node | None
    proj: torch.fx.Node | None
    qk_node: torch.fx.Node
    av_node: torch.fx.Node | None
    qk_group: int | None = None
    v_group: int | None = None
    heads_group: int | None = None

    @property
    def uses_sdpa(self) -> bool:
        return self.qk_node is self.av_node and "scaled_dot_product" in str(self.qk_node.target)


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are pruned together. ``layout[h, i]`` is the channel id of channel ``i``
    of head ``h`` (one row when the group has no heads)."""

    index: int
    kind: str                       # "qk" | "v" | "heads" | "mlp" | "embed"
    num_heads: int | None
    size: int
    members: list[tuple[torch.fx.Node, int]]
    frozen: str | None
    layout: np.ndarray
    sinks: list[Sink]
    site: int | None = None
    shared_across_heads: bool = False

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.kind != "heads"

    @property
    def width(self) -> int:
        return int(self.layout.size)


@dataclasses.dataclass
class Analysis:
    """Result of :func:`analyze`. ``print(analysis)`` shows a table."""

    attention: list[AttentionSite]
    groups: list[ChannelGroup]
    components: Components
    param_comps: dict[str, list]
    param_shapes: dict[str, tuple[int, ...]]
    opaque: list[tuple[str, str]]
    group_of_channel: np.ndarray
    coupling_graph: nx.Graph
    param_aliases: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""          # of the graph it describes (analysis/fingerprint.py)
    unprepared: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    graph_module: Any = None       # the graph analysed, where analyze traced it itself

    def __str__(self) -> str:
        from fxprune.app.report import analysis_table

        return analysis_table(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention": [{"index": s.index, "kind": s.kind, "num_heads": s.num_heads,
                           "qk_head_dim": s.qk_head_dim, "v_head_dim": s.v_head_dim,
                           "scale": s.scale, "q": s.q.name, "k": s.k.name,
                           "v": s.v.name if s.v is not None else None,
                           "proj": s.proj.name if s.proj is not None else None,
                           "qk_group": s.qk_group, "v_group": s.v_group}
                          for s in self.attention],
            "groups": [{"index": g.index, "kind": g.kind, "num_heads": g.num_heads,
                        "size": g.size, "site": g.site, "frozen": g.frozen,
                        "members": len(g.members)} for g in self.groups],
            "opaque": [{"node": n, "what": w} for n, w in self.opaque],
            "unprepared_attention": [{"node": n, "what": w} for n, w in self.unprepared],
        }


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
    groups, group_of_channel, graph = _build_groups(prop, comps)
    sites = _build_sites(gm, prop, comps, groups, group_of_channel)
    _add_members(gm, groups, comps, group_of_channel)
    _adopt_member_head_layouts(gm, groups, comps)
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


def _layout(comp_lab: np.ndarray, span, comps: Components) -> np.ndarray:
    lab = comp_lab.reshape([comp_lab.shape[d] for d in span]) if span else comp_lab.reshape(1)
    ch = comps.channel_of(lab)
    if ch.ndim == 1:
        return ch.reshape(1, -1)
    if ch.ndim == 2:
        heads = comps.head_of(lab)
        if len(np.unique(heads[:, 0])) == 1 and len(np.unique(heads[0, :])) > 1:
            ch, lab = ch.T, lab.T  # head index varies along the second dim
        # heads folded into the batch dim carry copies of the same labels once per batch
        # item: one row per head (heads that merely share channels have distinct labels)
        _, first = np.unique(lab, axis=0, return_index=True)
        if len(first) < lab.shape[0]:
            ch = ch[np.sort(first)]
        return ch
    return ch.reshape(1, -1)


def _build_groups(prop: Propagator, comps: Components):
    graph = nx.Graph()
    sink_channels = []
    for i, sink in enumerate(prop.sinks):
        graph.add_node(i, node=sink.node.name, kind=sink.kind)
        sink_channels.append(np.unique(comps.channel_of(sink.comp.lab)))
    if sink_channels:
        # two sinks are coupled when they contract a common channel
        ch = np.concatenate(sink_channels)
        owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(sink_channels)])
        order = np.argsort(ch, kind="stable")
        ch, owner = ch[order], owner[order]
        same = ch[1:] == ch[:-1]
        edges = np.unique(np.stack([owner[:-1][same], owner[1:][same]], 1), axis=0)
        graph.add_edges_from((int(a), int(b)) for a, b in edges if a != b)
    frozen = comps.frozen_reason
    v_marked = set(comps.marks.get("v", np.zeros(0, np.int64)).tolist())
    residual = set(comps.marks.get("residual", np.zeros(0, np.int64)).tolist())
    source_channels = [(node, set(np.unique(comps.channel_of(lab)).tolist()))
                       for node, lab in prop.sources]
    groups: list[ChannelGroup] = []
    group_of_channel = np.full(comps.n_labels and int(comps.channel.max()) + 1, -1, np.int64)
    for members in sorted(nx.connected_components(graph), key=min):
        members = sorted(members)
        sinks = [prop.sinks[i] for i in members]
        channels = np.unique(np.concatenate([sink_channels[i] for i in members]))
        anchor = next((s for s in sinks if s.kind == "qk"), None)
        if anchor is None:
            anchor = max(sinks, key=lambda s: len(s.comp.span))
        layout = _layout(anchor.comp.lab, anchor.comp.span, comps)
        chset = set(channels.tolist())
        if any(s.kind == "qk" for s in sinks):
            kind = "qk"
        elif chset & v_marked:
            kind = "v"
        else:
            producers = [n for n, chs in source_channels if chs & chset]
            added = bool(chset & residual)
            kind = "embed" if added or not producers else "mlp"
        reason = next((frozen[c] for c in channels.tolist() if c in frozen), None)
        if reason is None and set(np.unique(layout).tolist()) != chset:
            reason = "channels are coupled with channels of another layout (not slicable as one)"
        if reason is None and kind == "embed":
            reason = "residual stream (embedding width): left dense by default"
        num_heads = layout.shape[0] if layout.shape[0] > 1 else None
        shared = bool(num_heads and len(np.unique(layout)) < layout.size)
        g = ChannelGroup(len(groups), kind, num_heads, int(layout.shape[1]), [], reason, layout,
                         sinks, shared_across_heads=shared)
        group_of_channel[channels] = g.index
        groups.append(g)
    return groups, group_of_channel, graph


def _build_sites(gm, prop: Propagator, comps: Components, groups, group_of_channel):
    input_batch = None
    shapes = gm.meta.get(INPUT_SHAPES_KEY)
    if shapes:
        input_batch = shapes[0][0] if shapes[0] else None
    sites = []
    n_ch = int(comps.channel.max()) + 1 if comps.n_labels else 0
    param_channels = np.zeros(n_ch, dtype=bool)
    for cs in prop.param_comps.values():
        for c in cs:
            param_channels[comps.channel[c.lab.ravel()]] = True
    raws = _distinct_sites(prop.sites, comps, group_of_channel)
    sites_of_head = collections.Counter(
        ch for raw in raws
        for ch in np.unique(comps.channel_of(raw.head_labels.ravel())).tolist())
    for raw in raws:
        q_layout = _layout(raw.q_comp.lab, raw.q_comp.span, comps)
        qk_group = _group_at(q_layout, group_of_channel)
        v_group = None
        v_layout = None
        if raw.v_comp is not None:
            v_layout = _layout(raw.v_comp.lab, raw.v_comp.span, comps)
            v_group = _group_at(v_layout, group_of_channel)
            if v_group is not None:
                _adopt_head_layout(groups[v_group], v_layout)
        if qk_group is not None:
            _adopt_head_layout(groups[qk_group], q_layout)
        num_heads = q_layout.shape[0]
        proj = None
        if v_group is not None:
            proj = next((s.node for s in groups[v_group].sinks if s.kind in ("linear", "conv")),
                        None)
        kind = _site_kind(gm, raw, comps, param_channels, input_batch)
        site = AttentionSite(len(sites), kind, int(num_heads), int(q_layout.shape[1]),
                             int(v_layout.shape[1]) if v_layout is not None else 0,
                             _scale(raw), raw.q, raw.k, raw.v, proj, raw.qk_node, raw.av_node,
                             qk_group, v_group)
        heads_layout = np.arange(num_heads).reshape(num_heads, 1)
        heads_frozen = _heads_used_across(raw, comps, group_of_channel, sites_of_head)
        hg = ChannelGroup(len(groups), "heads", int(num_heads), 1, [], heads_frozen,
                          heads_layout, [], site=site.index)
        for gi in (qk_group, v_group):
            if gi is not None:
                groups[gi].site = site.index
        groups.append(hg)
        site.heads_group = hg.index
        sites.append(site)
    _order_groups(groups)
    idx = {id(g): i for i, g in enumerate(groups)}
    for g in groups:
        g.index = idx[id(g)]
    return sites


def _site_kind(gm, raw: RawSite, comps: Components, param_channels: np.ndarray,
               input_batch: int | None) -> str:
    """``linear`` (q times k^T v), ``window`` (windows folded into the batch dim, or scores
    with a learned per-head bias) or ``softmax``."""
    if raw.fused and raw.qk_node is raw.av_node and not _is_sdpa(raw.qk_node):
        return "linear"
    if input_batch is not None:
        qs = raw.q.meta["val"].shape if isinstance(raw.q, torch.fx.Node) else None
        if qs is not None and len(qs) > 0 and int(qs[0]) != input_batch:
            return "window"  # windows folded into the batch dim
    if raw.head_labels.size:
        if param_channels[comps.channel_of(raw.head_labels.ravel())].any():
            return "window"  # scores get a learned per-head (relative position) bias
    elif _learned_score_bias(gm, raw):
        return "window"  # one head: no head labels to see the bias by, follow the graph
    return "softmax"


def _heads_used_across(raw: RawSite, comps: Components, group_of_channel,
                       sites_of_head: collections.Counter) -> str | None:
    """Why whole heads of ``raw`` may not be removed, or None. The labels of the scores'
    heads reach nothing but their own head's products in plain attention; when they are
    frozen (averaged over heads), contracted (heads mixed: talking heads) or shared with
    another site's heads (two score maps combined, differential attention), removing a head
    changes what the kept heads compute."""
    if not raw.head_labels.size:
        return None
    channels = np.unique(comps.channel_of(raw.head_labels.ravel()))
    for ch in channels.tolist():
        if ch in comps.frozen_reason:
            return f"the heads are used across heads: {comps.frozen_reason[ch]}"
    if (group_of_channel[channels] >= 0).any():
        return "the heads of the scores are mixed by a contraction over heads"
    if any(sites_of_head[ch] > 1 for ch in channels.tolist()):
        return "the heads are combined with the heads of another q.k product"
    return None


def _learned_score_bias(gm, raw: RawSite) -> bool:
    """The q.k scores of ``raw`` get a term computed from a learned parameter (a relative
    position bias table) before the softmax: as SDPA's ``attn_mask`` or added to the scores."""
    node = raw.qk_node
    if _is_sdpa(node):
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        return isinstance(mask, torch.fx.Node) and _from_parameter(gm, mask)
    cur = node
    for _ in range(6):
        users = list(cur.users)
        if len(users) != 1 or users[0] is raw.av_node:
            return False
        cur = users[0]
        if op_name(cur, gm) in ("add", "add_", "iadd"):
            others = [a for a in cur.all_input_nodes if a is not node and a not in
                      _upstream(cur, node)]
            if any(_from_parameter(gm, a) for a in others):
                return True
        if op_name(cur, gm) in ("softmax", "_softmax"):
            return False
    return False


def _upstream(node, stop, steps: int = 6) -> set:
    """Nodes between ``stop`` and ``node`` on the single-user chain (the scores themselves)."""
    seen, cur = set(), stop
    for _ in range(steps):
        users = list(cur.users)
        if len(users) != 1 or users[0] is node:
            break
        cur = users[0]
        seen.add(cur)
    return seen | {stop}


def _from_parameter(gm, node, steps: int = 8) -> bool:
    """``node`` is computed from an ``nn.Parameter`` (not only buffers and constants)."""
    params = dict(gm.named_parameters())
    frontier, seen = [node], set()
    for _ in range(steps):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr" and n.target in params:
                return True
            if n.op == "call_module":
                continue  # a module's output is an activation
            if n.op == "placeholder":
                return False
            nxt += n.all_input_nodes
        frontier = nxt
    return False


def _distinct_sites(raw_sites, comps: Components, group_of_channel) -> list:
    """Drop q.k products that only normalise. Linear attention contracts q with k twice (with
    ``k^T v`` and with the normaliser's mean of k); the product that carries v is the site,
    the other is one more place where the group's channels are consumed. Sites that each
    carry v (tied weights across blocks) all stay."""
    group_of = [_group_at(_layout(r.q_comp.lab, r.q_comp.span, comps), group_of_channel)
                for r in raw_sites]
    with_v = {g for g, r in zip(group_of, raw_sites) if g is not None and r.v_comp is not None}
    return [r for g, r in zip(group_of, raw_sites) if r.v_comp is not None or g not in with_v]


def _order_groups(groups: list[ChannelGroup]) -> None:
    old = {id(g): g.index for g in groups}
    order = {"qk": 0, "v": 1, "heads": 2, "mlp": 3, "embed": 4}

    def key(g):
        return (g.site if g.site is not None else 10**6, order[g.kind], old[id(g)])

    del key  # graph order is already meaningful; keep it stable
    return None


def _adopt_member_head_layouts(gm, groups, comps: Components) -> None:
    """A group with no head layout whose channels are somewhere split into (heads, per-head)
    takes that layout (v read per head by scores whose heads were mixed, as in talking-heads
    attention, is no site's v), so that every head keeps the same count and the reshapes
    into heads stay dense."""
    by_node = collections.defaultdict(list)
    for g in groups:
        if g.layout.shape[0] == 1 and g.frozen is None and g.kind in ("v", "mlp"):
            for node, _ in g.members:
                by_node[node].append(g)
    for node, gs in by_node.items():
        for lab, span in (e for e in node.meta.get(COMPS_KEY) or []
                          if isinstance(e, tuple) and len(e) == 2 and len(e[1]) == 2):
            layout = _layout(lab, span, comps)
            for g in gs:
                if g.layout.shape[0] == 1:
                    _adopt_head_layout(g, layout)


def _adopt_head_layout(group: ChannelGroup, layout: np.ndarray) -> None:
    """Give a group the (heads, per-head) layout seen at its attention site."""
    if layout.shape[0] <= 1 or group.layout.shape[0] > 1:
        return
    if any(len(np.unique(row)) < len(row) for row in layout):
        return  # one channel repeated along a dim (its entries tied): not heads
    if set(np.unique(layout).tolist()) != set(np.unique(group.layout).tolist()):
        return
    group.layout = layout
    group.num_heads = int(layout.shape[0])
    group.size = int(layout.shape[1])
    group.shared_across_heads = len(np.unique(layout)) < layout.size


def _group_at(layout: np.ndarray, group_of_channel: np.ndarray) -> int | None:
    gs = np.unique(group_of_channel[layout])
    gs = gs[gs >= 0]
    return int(gs[0]) if len(gs) == 1 else None


def _is_sdpa(node) -> bool:
    return "scaled_dot_product_attention" in str(node.target)


def _scale(raw: RawSite) -> float | None:
    node = raw.qk_node
    if _is_sdpa(node):
        scale = node.kwargs.get("scale")
        if scale is None and len(node.args) > 6:
            scale = node.args[6]
        if scale is None:
            return 1.0 / math.sqrt(int(raw.q.meta["val"].shape[-1]))
        return float(scale)
    scale = 1.0
    cur = raw.q
    for _ in range(4):  # q * scale (or / sqrt(d)) just before the product
        s = _scalar_factor(cur)
        if s is None:
            break
        scale *= s
        cur = cur.args[0]
    cur = node
    for _ in range(4):  # (q @ k^T) * scale after it
        users = list(cur.users)
        if len(users) != 1:
            break
        s = _scalar_factor(users[0])
        if s is None:
            break
        scale *= s
        cur = users[0]
    return scale


def _scalar_factor(node) -> float | None:
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = op_name(node, None)
    if len(node.args) != 2 or not isinstance(node.args[1], (int, float)):
        return None
    if name in ("mul", "mul_"):
        return float(node.args[1])
    if name in ("div", "truediv", "div_"):
        return 1.0 / float(node.args[1])
    return None


def _add_members(gm, groups, comps: Components, group_of_channel) -> None:
    heads_by_site = {g.site: g for g in groups if g.kind == "heads"}
    del heads_by_site
    for node in gm.graph.nodes:
        meta = node.meta.get(COMPS_KEY)
        if not isinstance(meta, list):
            continue
        for entry in meta:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                continue
            lab, span = entry
            if not span:
                continue
            gs = np.unique(group_of_channel[comps.channel_of(lab.ravel())])
            for gi in gs[gs >= 0].tolist():
                for d in span:
                    if (node, d) not in groups[gi].members:
                        groups[gi].members.append((node, d))
