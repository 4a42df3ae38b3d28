"""Attention sites from the propagation's raw q.k products: one
:class:`~fxprune.analysis.records.AttentionSite` per distinct product, with its kind
(softmax / window / linear), head counts and dims, scale, and the groups of its q/k, v and
heads."""

from __future__ import annotations

import collections
import math

import numpy as np
import torch
import torch.fx

from fxprune.analysis.grouping import adopt_head_layout, group_at, head_layout, order_groups
from fxprune.analysis.labels import Components
from fxprune.analysis.propagate import Propagator, RawSite
from fxprune.analysis.records import AttentionSite, ChannelGroup
from fxprune.meta import INPUT_SHAPES_KEY
from fxprune.ops import op_name


def build_sites(gm, prop: Propagator, comps: Components, groups, group_of_channel):
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
        q_layout = head_layout(raw.q_comp.lab, raw.q_comp.span, comps)
        qk_group = group_at(q_layout, group_of_channel)
        v_group = None
        v_layout = None
        if raw.v_comp is not None:
            v_layout = head_layout(raw.v_comp.lab, raw.v_comp.span, comps)
            v_group = group_at(v_layout, group_of_channel)
            if v_group is not None:
                adopt_head_layout(groups[v_group], v_layout)
        if qk_group is not None:
            adopt_head_layout(groups[qk_group], q_layout)
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
    order_groups(groups)
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
    group_of = [group_at(head_layout(r.q_comp.lab, r.q_comp.span, comps), group_of_channel)
                for r in raw_sites]
    with_v = {g for g, r in zip(group_of, raw_sites) if g is not None and r.v_comp is not None}
    return [r for g, r in zip(group_of, raw_sites) if r.v_comp is not None or g not in with_v]


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
