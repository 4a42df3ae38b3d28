"""Autocast regions of exported graphs made visible: ``torch.export`` records a
``with torch.autocast(...)`` block as one ``wrap_with_autocast`` call of a nested graph, which
the channel analysis cannot see into (everything reaching it would stay dense). The block is
inlined between ``_enter_autocast`` and ``_exit_autocast`` calls, the form torch.fx uses for
it, so the graph computes exactly what it did, under any outer autocast state.

Example:
    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         with torch.autocast("cpu", enabled=False):
    ...             return x @ x.transpose(-1, -2)
    >>> gm = torch.export.export(M(), (torch.randn(2, 3),)).module()
    >>> inline_autocast_regions(gm)
    1
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"][-3:]
    ['transpose.int', 'matmul.default', '_exit_autocast']
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast


def _autocast_op():
    return getattr(getattr(torch.ops, "higher_order", None), "wrap_with_autocast", None)


def inline_autocast_regions(gm: torch.fx.GraphModule) -> int:
    """Inline every ``wrap_with_autocast`` call of ``gm`` whose nested graph is plain (its
    own ops on its inputs, results read by index); returns how many were inlined. The
    caller recompiles."""
    hop = _autocast_op()
    done = 0
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        if _inline_one(gm, node):
            done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
    return done


def _inline_one(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    device, dtype, enabled, cache, sub_ref, *operands = node.args
    sub = getattr(gm, sub_ref.target, None) if isinstance(sub_ref, torch.fx.Node) else None
    if not isinstance(sub, torch.fx.GraphModule) or node.kwargs:
        return False
    inner = list(sub.graph.nodes)
    # attributes and modules of the nested graph live on it, not on gm: left wrapped
    if any(n.op in ("get_attr", "call_module") for n in inner):
        return False
    if any(u.op != "call_function" or u.target is not operator.getitem
           or not isinstance(u.args[1], int) for u in node.users):
        return False
    graph = gm.graph
    env: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in inner if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return False
    env.update(zip(placeholders, operands))
    results = None
    with graph.inserting_before(node):
        ctx = graph.call_function(_enter_autocast, (device, dtype, enabled, cache))
        for n in inner:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                results = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.call_function(_exit_autocast, (ctx,))
    if not isinstance(results, (tuple, list)):
        results = (results,)
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    return True
