"""``reweight``: AMAP's reweight module on the query of every attention site (paper 3.2).

The tokens entering the query projection are averaged over the token dims, encoded by a
Linear and a Tanh, and multiply the query channel-wise (SENet-style), so information of
removed channels can flow into the kept ones during refinement. To keep the model exact at
insertion, the module computes ``q * (1 + tanh(W mean(x) + b))`` with ``W`` and ``b`` zero:
the factor is exactly 1 until training moves it (the paper's ``q * tanh(...)`` cannot start
as the identity).

Graph before and after (SDPA site)::

    x -> qkv -> ... -> q -> sdpa(q, k, v)
    x -> qkv -> ... -> q -> reweight_0(x, q) -> sdpa(., k, v)

Refused (reported in ``info["refused"]``): sites whose query does not come from a Linear
reachable through shape-only ops.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    >>> gm = fxprune.trace(model, x); _ = fxprune.analyze(gm)
    >>> r = Reweight()(gm)
    >>> r.info["inserted"], bool(torch.equal(r.graph_module(x), gm(x)))
    (2, True)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.analysis.engine import get_analysis
from fxprune.meta import SHAPE_KEY
from fxprune.ops import op_name
from fxprune.passbase import FxPass, PassResult, copy_graph_module

SHAPE_OPS = {"view", "reshape", "permute", "transpose", "contiguous", "getitem", "unbind",
             "split", "chunk", "mul", "div", "flatten", "unflatten"}


class ReweightModule(nn.Module):
    """``q * (1 + tanh(Linear(mean over tokens of x)))[positions]`` (zero-initialised)."""

    def __init__(self, in_features: int, out_features: int, index: torch.Tensor,
                 token_dims: tuple[int, ...]):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.token_dims = token_dims
        self.register_buffer("index", index.long(), persistent=False)

    def fxprune_macs(self, shapes) -> int:
        return shapes[0][0] * self.fc.in_features * self.fc.out_features

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=self.token_dims) if self.token_dims else x
        scale = 1.0 + torch.tanh(self.fc(pooled))
        return q * scale[:, self.index].to(q.dtype)


@dataclasses.dataclass(frozen=True)
class ReweightOptions:
    inplace: bool = False


def _linear_input(node: torch.fx.Node, gm) -> torch.fx.Node | None:
    cur = node
    for _ in range(12):
        if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), nn.Linear):
            return cur.args[0]
        if cur.op == "call_function" and op_name(cur, gm) == "linear":
            return cur.args[0]
        if cur.op not in ("call_function", "call_method") or op_name(cur, gm) not in SHAPE_OPS:
            return None
        cur = cur.args[0]
        if not isinstance(cur, torch.fx.Node):
            return None
    return None


class Reweight(FxPass):
    name = "reweight"
    Options = ReweightOptions

    def requires(self, gm):
        super().requires(gm)
        get_analysis(gm, self.name)

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        out = gm if self.options.inplace else copy_graph_module(gm)
        analysis = get_analysis(out, self.name)
        by_name = {n.name: n for n in out.graph.nodes}
        inserted, refused, changes = 0, [], []
        for site in analysis.attention:
            qk_node = by_name[site.qk_node.name]
            q = qk_node.args[0] if isinstance(qk_node.args[0], torch.fx.Node) else None
            sink = next((s for g in analysis.groups if g.index == site.qk_group
                         for s in g.sinks if s.kind == "qk"), None)
            src = _linear_input(q, out) if q is not None else None
            if q is None or sink is None or src is None or sink.arg != 0:
                refused.append((site.index, "the query does not come from a Linear through "
                                "shape-only ops"))
                continue
            layout = analysis.groups[site.qk_group].layout
            pos = {int(c): i for i, c in enumerate(layout.ravel())}
            ch = analysis.components.channel_of(sink.comp.lab)
            index = np.vectorize(pos.__getitem__, otypes=[np.int64])(ch)
            q_shape = q.meta[SHAPE_KEY]
            index = index.reshape((1,) * (len(q_shape) - index.ndim) + index.shape)[0]
            x_shape = src.meta[SHAPE_KEY]
            token_dims = tuple(range(1, len(x_shape) - 1))
            name = f"fxprune_reweight_{site.index}"
            out.add_submodule(name, ReweightModule(x_shape[-1], layout.size,
                                                   torch.from_numpy(index), token_dims))
            with out.graph.inserting_before(qk_node):
                new_q = out.graph.call_module(name, (src, q))
            new_q.meta.update({k: v for k, v in q.meta.items() if k in ("val", SHAPE_KEY)})
            qk_node.args = (new_q,) + tuple(qk_node.args[1:])
            inserted += 1
            changes.append(f"reweight on the query of site {site.index} ({qk_node.name})")
        out.recompile()
        return PassResult(out, inserted > 0, changes,
                          {"inserted": inserted, "refused": refused})
