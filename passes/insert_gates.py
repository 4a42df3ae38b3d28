"""``insert-gates``: a learnable gate on every prunable channel group.

Where: at each place the group's channels are contracted away (the input of the consuming
Linear or conv, q in a q.k product or SDPA, the input of a sum or norm over the channels, as
in focused linear attention). Masking there equals removing the channels,
because the analysis froze every group whose channels are mixed, normalised or reach the
output on the way. Gates at 1 leave the model bit-identical; binary gates give the masked
model that :mod:`fxprune.passes.slice` reproduces exactly.

Graph before and after (one MLP)::

    fc1 -> act -> fc2            fc1 -> act -> gate_g3 -> fc2

Example:
    >>> import torch, fxprune
    >>> from fxprune.passes.insert_gates import InsertGates
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> gm = fxprune.trace(m, torch.randn(2, 4)); _ = fxprune.analyze(gm)
    >>> result = InsertGates()(gm)
    >>> result.info["gates"]
    {0: ['fxprune_gate_g0_0']}
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx

from fxprune.amap.gates import ChannelGate, GateValues
from fxprune.analysis.engine import get_analysis
from fxprune.errors import PassOrderError
from fxprune.meta import COMPS_KEY, GATE_PREFIX, GATES_KEY, SHAPE_KEY
from fxprune.passbase import FxPass, PassResult, copy_graph_module


@dataclasses.dataclass(frozen=True)
class InsertGatesOptions:
    groups: tuple[int, ...] | None = None   # None: every prunable group
    inplace: bool = False


class InsertGates(FxPass):
    name = "insert-gates"
    Options = InsertGatesOptions

    def requires(self, gm):
        super().requires(gm)
        get_analysis(gm, self.name)
        if gm.meta.get(GATES_KEY):
            raise PassOrderError(self.name, "the graph already has gates",
                                 hint="run insert-gates once per graph")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        out = gm if self.options.inplace else copy_graph_module(gm)
        analysis = get_analysis(out, self.name)
        wanted = self.options.groups
        gates: dict[int, list[str]] = {}
        changes = []
        for g in analysis.groups:
            if not g.prunable or (wanted is not None and g.index not in wanted):
                continue
            values = GateValues(g.index, g.layout.shape[0], g.layout.shape[1])
            position = {int(c): i for i, c in enumerate(g.layout.ravel())}
            names = gate_sinks(out, analysis, g, position, f"{GATE_PREFIX}g{g.index}",
                               lambda index, g=g, values=values: ChannelGate(
                                   g.index, *g.layout.shape, index, values))
            gates[g.index] = [name for name, _ in names]
            changes += [f"gate on group {g.index} ({g.kind}) before {n}" for _, n in names]
        out.meta[GATES_KEY] = gates
        out.recompile()
        return PassResult(out, bool(gates), changes, {"gates": gates})


def gate_sinks(out: torch.fx.GraphModule, analysis, group, position: dict[int, int],
               prefix: str, make_module) -> list[str]:
    """Insert ``make_module(index)`` before every sink of ``group`` (only on q for q.k
    products), where ``index`` maps each channel position of the gated operand to
    ``position[channel id]``; returns ``[(inserted module name, gated node name)]``."""
    node_by_name = {n.name: n for n in out.graph.nodes}
    # a q.k product is gated on q only; channel reductions that ignore zeros (a norm over q's
    # channels) see the gated values too, so that masking equals removal everywhere
    qk = [s for s in group.sinks if s.kind == "qk"]
    sinks = qk + [s for s in group.sinks if s.kind == "reduce"] if qk else list(group.sinks)
    names = []
    for j, sink in enumerate(sinks):
        node = node_by_name[sink.node.name]
        ch = analysis.components.channel_of(sink.comp.lab)
        index = np.vectorize(position.__getitem__, otypes=[np.int64])(ch)
        operand = node.args[sink.arg] if isinstance(sink.arg, int) else node.kwargs[sink.arg]
        nd = len(operand.meta[SHAPE_KEY])
        index = index.reshape((1,) * (nd - index.ndim) + index.shape)
        name = f"{prefix}_{j}"
        out.add_submodule(name, make_module(torch.from_numpy(index)))
        with out.graph.inserting_before(node):
            gate_node = out.graph.call_module(name, (operand,))
        gate_node.meta.update({k: v for k, v in operand.meta.items()
                               if k in ("val", SHAPE_KEY, COMPS_KEY)})
        if isinstance(sink.arg, int):
            args = list(node.args)
            args[sink.arg] = gate_node
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, sink.arg: gate_node}
        names.append((name, node.name))
    return names


def gate_modules(gm: torch.fx.GraphModule) -> dict[int, ChannelGate]:
    """First gate module of every gated group (all gates of a group share their values)."""
    gates = gm.meta.get(GATES_KEY) or {}
    return {g: gm.get_submodule(names[0]) for g, names in gates.items()}
