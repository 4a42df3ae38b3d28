"""Linear calls in the canonical form, and their biases made sliceable.

:func:`normalize_linear_biases` rewrites a Linear bias built by zeroing a slice of a clone of
a parameter in place (torchvision's Swin V2 qkv bias) into ``torch.cat`` of parameter slices
and ``zeros_like`` pieces, which the analysis and slicing can follow.

Example:
    >>> import torch, fxprune
    >>> gm = fxprune.trace(torch.nn.Linear(4, 2), torch.randn(3, 4))   # traced as F.linear
    >>> [[a.name for a in linear_parts(n)] for n in gm.graph.nodes if linear_parts(n)]
    [['input_1', 'weight', 'bias']]
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import Node

from fxprune.meta import DECOMPOSED_FROM_KEY

#: ``call_function`` targets that are a Linear in the canonical form (``F.linear`` is
#: ``torch._C._nn.linear``).
LINEAR_TARGETS = (F.linear,)


def linear_parts(node: Node) -> tuple[Any, Any, Any] | None:
    """``(input, weight, bias)`` of an ``F.linear`` / ``aten.linear`` call, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS or node.target is torch.ops.aten.linear.default:
        names = ("input", "weight", "bias")
        vals = list(node.args) + [None] * (3 - len(node.args))
        for i, n in enumerate(names):
            if n in node.kwargs:
                vals[i] = node.kwargs[n]
        return vals[0], vals[1], vals[2]
    return None


def _slice_range(index: Any, length: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a step-1 slice on dim 0 (``x[a:b]`` or ``x[(a:b,)]``)."""
    if isinstance(index, tuple) and len(index) == 1:
        index = index[0]
    if not isinstance(index, slice) or index.step not in (None, 1):
        return None
    if any(isinstance(v, Node) for v in (index.start, index.stop)):
        return None
    start, stop, _ = index.indices(length)
    return (start, max(start, stop))


def _zeroed_clone(bias: Node) -> tuple[Node, list[tuple[int, int]], list[Node]] | None:
    """Matches ``b = src.clone(); b[a:c].zero_(); ...`` with ``src`` 1-D; returns
    (src, zeroed ranges, nodes to erase) when every other use of ``b`` is as a Linear bias."""
    if not (bias.op == "call_method" and bias.target == "clone" and len(bias.args) == 1
            and not bias.kwargs and isinstance(bias.args[0], Node)):
        return None
    src = bias.args[0]
    val = src.meta.get("val")
    if val is None or not isinstance(val, torch.Tensor) or val.dim() != 1:
        return None
    length = int(val.shape[0])
    ranges, dead = [], []
    for user in bias.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is bias:
            rng = _slice_range(user.args[1], length)
            zero = list(user.users)
            if rng is None or len(zero) != 1 or zero[0].op != "call_method" or \
                    zero[0].target != "zero_" or zero[0].users:
                return None
            ranges.append(rng)
            dead += [zero[0], user]
        elif linear_parts(user) is None or linear_parts(user)[2] is not bias:
            return None
    if not ranges:
        return None
    ranges.sort()
    for (_, b0), (a1, _) in zip(ranges, ranges[1:]):
        if a1 < b0:
            return None
    return src, ranges, dead


def normalize_linear_biases(gm: torch.fx.GraphModule, nodes: Iterable[Node] | None = None
                            ) -> list[str]:
    """Rewrite in-place-zeroed clone biases of Linear calls into ``torch.cat`` of slices and
    ``torch.zeros_like`` pieces; returns one change record per rewrite."""
    changes = []
    candidates = list(gm.graph.nodes) if nodes is None else list(nodes)
    seen: set[Node] = set()
    for lin in candidates:
        if lin.graph is not gm.graph or linear_parts(lin) is None:
            continue
        bias = linear_parts(lin)[2]
        if not isinstance(bias, Node) or bias in seen:
            continue
        match = _zeroed_clone(bias)
        if match is None:
            continue
        seen.add(bias)
        src, ranges, dead = match
        length = int(src.meta["val"].shape[0])
        first_linear = next(n for n in gm.graph.nodes if n in bias.users and n not in dead)
        pieces_desc = []
        with gm.graph.inserting_before(first_linear):
            pieces, pos = [], 0
            for a, b in ranges + [(length, length)]:
                if a > pos:
                    pieces.append(gm.graph.call_function(operator.getitem, (src, slice(pos, a))))
                    pieces_desc.append(f"{src.target}[{pos}:{a}]")
                if b > a:
                    part = gm.graph.call_function(operator.getitem, (src, slice(a, b)))
                    pieces.append(gm.graph.call_function(torch.zeros_like, (part,)))
                    pieces_desc.append(f"zeros({b - a})")
                pos = b
            cat = gm.graph.call_function(torch.cat, (pieces,))
        for p in pieces + [cat]:
            p.meta[DECOMPOSED_FROM_KEY] = bias.name
        bias.replace_all_uses_with(cat)
        for d in dead:
            gm.graph.erase_node(d)
        gm.graph.erase_node(bias)
        changes.append(f"bias of {first_linear.name}: in-place zeroed clone of {src.target} "
                       f"-> torch.cat([{', '.join(pieces_desc)}])")
    return changes

