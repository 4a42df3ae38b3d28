"""Heads laid out inside the per-head channel index (channel ``d * H + h`` in head ``h``).

Slicing keeps the surviving entries of a tensor in row-major order. With heads as the outer
index, ``(H, D)``, that is right even when heads keep different channels: row ``h`` keeps its
own ``D'`` channels. With heads as the inner index, ``(D, H)``, a line along the head dim
holds one channel of every head, and heads keeping different ``d`` put channels of different
heads into the same head after slicing: a silently wrong model. Such a layout is sliceable
only when every head keeps the same ``d``.

:func:`tie_interleaved_heads` finds every tensor whose channel labels span a head dim inside a
per-head channel dim and couples channel ``d`` across the heads there. The group then has the
same channel ids in every head (``shared_across_heads``), which the planner, the search and
``sync-head-ranks`` already honour: it keeps the same indices in every head.

Example:
    >>> import torch, fxprune
    >>> from torch import nn
    >>> class Interleaved(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         B, N, _ = x.shape
    ...         q, k, v = self.qkv(x).reshape(B, N, 3, 4, 2).permute(2, 0, 4, 1, 3)
    ...         o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ...         return self.proj(o.permute(0, 2, 3, 1).reshape(B, N, 8)).sum(1)
    >>> a = fxprune.analyze(fxprune.trace(Interleaved(), torch.randn(1, 5, 8)))
    >>> qk = a.groups[a.attention[0].qk_group]
    >>> qk.layout.shape, qk.shared_across_heads
    ((2, 4), True)
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch.fx

from fxprune.analysis.labels import Components, LabelStore
from fxprune.meta import COMPS_KEY


def tie_interleaved_heads(gm: torch.fx.GraphModule, store: LabelStore, comps: Components,
                          sinks) -> int:
    """Couple channel ``d`` of every head wherever a head dim sits inside a per-head channel
    dim of some tensor; returns how many tensors needed it (0: ``comps`` is still valid).

    A per-head channel dim is one along which the head stays and the channel changes within
    one group (channels contracted together at the same places, ``sinks``). That tells
    ``(D, H)`` from the parts dim of a fused projection, ``(3, H, D)``: along the parts the
    channel is the same (q and k are coupled) or changes group (v)."""
    group = _group_of_channel(sinks, comps)
    tied = 0
    for node in gm.graph.nodes:
        for lab, span in _flat(node.meta.get(COMPS_KEY)):
            if len(span) < 2:
                continue
            sub = lab.reshape([lab.shape[d] for d in span])
            heads, channels = comps.head_only[sub], comps.channel[sub]
            head_varies = [_varies(heads, k) for k in range(sub.ndim)]
            within_head = [not head_varies[k] and _varies_in_group(channels, group, k)
                           for k in range(sub.ndim)]
            for k in range(1, sub.ndim):
                if head_varies[k] and any(within_head[:k]):
                    store.union(sub, np.take(sub, [0], axis=k))
                    tied += 1
    return tied


def _group_of_channel(sinks, comps: Components) -> np.ndarray:
    """Channel id -> id of the channels contracted together with it (-1: contracted nowhere):
    the groups the analysis will build, without their details."""
    n_ch = int(comps.channel.max()) + 1 if comps.n_labels else 0
    per_sink = [np.unique(comps.channel[s.comp.lab.ravel()]) for s in sinks]
    if not per_sink:
        return np.full(n_ch, -1, np.int64)
    ch = np.concatenate(per_sink)
    owner = np.concatenate([np.full(len(c), n_ch + i) for i, c in enumerate(per_sink)])
    graph = scipy.sparse.coo_matrix((np.ones(ch.size, np.int8), (ch, owner)),
                                    shape=(n_ch + len(per_sink),) * 2)
    _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    group = label[:n_ch].astype(np.int64)
    group[~np.isin(np.arange(n_ch), ch)] = -1
    return group


def _varies_in_group(channels: np.ndarray, group: np.ndarray, axis: int) -> bool:
    if channels.shape[axis] < 2:
        return False
    first = np.take(channels, [0], axis=axis)
    g, g_first = group[channels], group[first]
    return bool(((channels != first) & (g == g_first) & (g >= 0)).any())


def resolve_subset_params(store: LabelStore, comps: Components) -> int:
    """Relate the parameters recorded in ``store.subset_params`` now that heads are known.

    A parameter broadcast over part of an activation's channel dims is one value per head
    when its dims are exactly the dims the head varies along (a per-head temperature
    ``(1, H, 1, 1)`` times ``q``): it joins those heads, and each head's channels stay
    independent. Otherwise it is shared along the dims it lacks (a rotary table ``(N, D)``
    used by every head) and couples the channels it touches. Returns how many were per head.
    """
    per_head = 0
    for act, param, act_span, param_span in store.subset_params:
        heads = comps.head_only[act]
        varies = {d: _varies(heads, d) for d in act_span}
        if all(varies[d] for d in param_span) and not any(
                varies[d] for d in act_span if d not in param_span):
            store.head_union(act, param)
            per_head += 1
        else:
            store.union(act, param)
    store.subset_params = []
    return per_head


def _varies(a: np.ndarray, axis: int) -> bool:
    return a.shape[axis] > 1 and bool((a != np.take(a, [0], axis=axis)).any())


def _flat(meta):
    if not isinstance(meta, list):
        return
    for entry in meta:
        if isinstance(entry, tuple) and len(entry) == 2:
            yield entry
        elif isinstance(entry, list):
            yield from _flat(entry)
