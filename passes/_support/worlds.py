"""The two worlds a call is inlined in (see :mod:`fxprune.passes._support.inline`).

World 0 is the graph as traced (``node.meta["val"]``); world 1 is the same graph run on fake
inputs with other sizes: every dim but the last (``all-but-last``) or only the batch dim
(``batch``). A size equal in both worlds is a constant of the inlined code; one that differs
stays a graph value. ``static`` fixes every size to the traced one.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> gm = fxprune.trace(m, torch.randn(3, 4))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> [tuple(v.shape) for v in WorldSet(gm).values(node, "all-but-last")]
    [(3, 2), (4, 2)]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.node import Node

from fxprune.ops import fetch_attr

from .fake_meta import fake_tensor_type, fresh_fake, placeholder_values


class InlineError(Exception):
    """One attempt at tracing a call failed (the caller tries another world set or refuses
    the node with this message)."""


def _concrete_shape(value: torch.Tensor, where: str) -> list[int]:
    try:
        return [int(s) for s in value.shape]
    except Exception as exc:  # symbolic sizes without a hint
        raise InlineError(f"graph input has symbolic sizes {tuple(value.shape)}") from exc



class _FakeEval(torch.fx.Interpreter):
    """Runs a GraphModule on fake tensors and keeps every node's value."""

    def __init__(self, gm: torch.fx.GraphModule, mode):
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        with self.mode:
            out = super().run_node(n)
        self.values[n] = out
        return out

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not isinstance(value, fake_tensor_type()):
            value = self.mode.from_tensor(value)
        return value


#: World sets tried in order: sizes that may vary between world 0 and world 1.
WORLD_KINDS = ("all-but-last", "batch", "static")


class WorldSet:
    """Fake values of graph nodes in world 0 (the traced sizes, from ``node.meta["val"]``) and,
    per world kind, in world 1 (the graph run on fake inputs with other sizes). The world-1 runs
    happen when the set is made, before any rewrite, so later lookups see the original graph
    (a node that replaced another is looked up as the node it replaced, see :meth:`alias`)."""

    def __init__(self, gm: torch.fx.GraphModule, where: str = "decompose"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.gm = gm
        self.where = where
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._alias: dict[Node, Node] = {}
        self._world0: dict[Node, Any] = {}
        self._runs = {kind: self._run(kind) for kind in WORLD_KINDS if kind != "static"}

    def _run(self, kind: str) -> dict[Node, Any] | None:
        inputs = []
        try:
            for v in placeholder_values(self.gm, self.where):
                if not isinstance(v, torch.Tensor):
                    inputs.append(v)
                    continue
                shape = _concrete_shape(v, self.where)
                if kind == "all-but-last":
                    shape = [s + 1 for s in shape[:-1]] + shape[-1:]
                elif kind == "batch" and shape:
                    shape = [shape[0] + 1] + shape[1:]
                inputs.append(fresh_fake(self.mode, v, shape))
            ev = _FakeEval(self.gm, self.mode)
            ev.run(*inputs)
            return ev.values
        except Exception:  # noqa: BLE001 - this world set is not usable for this graph
            return None

    def available(self, kind: str) -> bool:
        return kind == "static" or self._runs.get(kind) is not None

    def alias(self, new: Node, old: Node) -> None:
        """``new`` now computes what ``old`` computed (``old`` was replaced)."""
        self._alias[new] = self._alias.get(old, old)

    def _base(self, node: Node) -> Any:
        if node in self._world0:
            return self._world0[node]
        if node.op == "get_attr":
            value = fetch_attr(self.gm, node.target)
            if isinstance(value, torch.Tensor):
                value = self.mode.from_tensor(value)
        else:
            if "val" not in node.meta:
                raise InlineError(f"{node.name} has no shape metadata (meta['val'])")

            def fresh(v):
                if not isinstance(v, torch.Tensor):
                    return v
                _concrete_shape(v, self.where)
                device = v.device if v.device.type != "meta" else torch.device("cpu")
                with self.mode:
                    return torch.empty_strided(tuple(int(s) for s in v.shape),
                                               tuple(int(s) for s in v.stride()),
                                               dtype=v.dtype, device=device)

            value = pytree.tree_map(fresh, node.meta["val"])
        self._world0[node] = value
        return value

    def values(self, node: Node, kind: str) -> tuple[Any, ...]:
        node = self._alias.get(node, node)
        base = self._base(node)
        if kind == "static":
            return (base,)
        if node.op == "get_attr":
            return (base, base)
        other = self._runs.get(kind)
        if other is None or node not in other:
            raise InlineError(f"world set {kind!r} unavailable for {node.name}")
        return (base, other[node])
