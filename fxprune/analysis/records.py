"""The analysis' public records: :class:`AttentionSite`, :class:`ChannelGroup` and
:class:`Analysis` (what :func:`fxprune.analyze` returns)."""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx

from fxprune.analysis.labels import Components
from fxprune.analysis.propagate import Sink


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
