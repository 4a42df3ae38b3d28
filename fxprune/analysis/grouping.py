"""Channel groups from the propagation's sinks: sinks contracting a common channel are
coupled; each connected set is one :class:`~fxprune.analysis.records.ChannelGroup` whose kind
(qk / v / mlp / embed) says where its channels are contracted, with its head layout, its
frozen reason and its members (the parameters and dims that hold its channels)."""

from __future__ import annotations

import collections

import networkx as nx
import numpy as np

from fxprune.analysis.labels import Components
from fxprune.analysis.propagate import Propagator
from fxprune.analysis.records import ChannelGroup
from fxprune.meta import COMPS_KEY


def head_layout(comp_lab: np.ndarray, span, comps: Components) -> np.ndarray:
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


def build_groups(prop: Propagator, comps: Components):
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
        layout = head_layout(anchor.comp.lab, anchor.comp.span, comps)
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


def order_groups(groups: list[ChannelGroup]) -> None:
    old = {id(g): g.index for g in groups}
    order = {"qk": 0, "v": 1, "heads": 2, "mlp": 3, "embed": 4}

    def key(g):
        return (g.site if g.site is not None else 10**6, order[g.kind], old[id(g)])

    del key  # graph order is already meaningful; keep it stable
    return None


def adopt_member_head_layouts(gm, groups, comps: Components) -> None:
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
            layout = head_layout(lab, span, comps)
            for g in gs:
                if g.layout.shape[0] == 1:
                    adopt_head_layout(g, layout)


def adopt_head_layout(group: ChannelGroup, layout: np.ndarray) -> None:
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


def adopt_split_layouts(groups: list[ChannelGroup], comps: Components,
                        group_of_channel: np.ndarray, splits) -> None:
    """Channels an op reads in equal parts (``LabelStore.split``: a grouped convolution) keep
    the same count in every part. A group without heads that holds such parts takes them as
    its layout (one row per part); a group with heads keeps them when every part is made of
    whole heads (equal counts per head then give equal counts per part). Any other group that
    holds part of them is frozen with the reason: its plan could leave the parts unequal."""
    for lab, what in splits:
        ch = comps.channel_of(lab)
        gid = group_of_channel[ch]
        for gi in np.unique(gid[gid >= 0]).tolist():
            group = groups[gi]
            if group.frozen is not None:
                continue
            rows = [r for r in range(ch.shape[0]) if (gid[r] == gi).any()]
            _, first = np.unique(ch[rows], axis=0, return_index=True)
            parts = ch[rows][np.sort(first)]
            why = _split_conflict(group, parts, all((gid[r] == gi).all() for r in rows))
            if why is not None:
                group.frozen = f"{what}: {why}"
            elif group.layout.shape[0] == 1 and len(parts) > 1:
                group.layout, group.num_heads, group.size = parts, len(parts), parts.shape[1]
                group.shared_across_heads = False


def _split_conflict(group: ChannelGroup, parts: np.ndarray, whole_rows: bool) -> str | None:
    """Why ``group`` cannot keep equal counts in ``parts`` (None when it can)."""
    if not whole_rows:
        return "one part holds channels of several channel groups"
    if any(len(np.unique(row)) < len(row) for row in parts):
        return "a part holds one channel twice"
    if len(parts) == 1:
        return None
    if group.layout.shape[0] == 1:
        if set(parts.ravel().tolist()) != set(group.layout.ravel().tolist()):
            return "the channel group also holds channels outside the parts"
        return None
    heads = [set(row.tolist()) for row in group.layout]
    for part in parts:
        members = set(part.tolist())
        if set().union(*[h for h in heads if h & members]) != members:
            return f"its parts cut across the group's {len(heads)} heads"
    return None


def group_at(layout: np.ndarray, group_of_channel: np.ndarray) -> int | None:
    gs = np.unique(group_of_channel[layout])
    gs = gs[gs >= 0]
    return int(gs[0]) if len(gs) == 1 else None


def add_members(gm, groups, comps: Components, group_of_channel) -> None:
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
