"""Inlining a call: :func:`inline_call` replaces one ``call_function``/``call_module`` node
by the plain ops of a Python function (a library function such as torchvision's
``shifted_window_attention``, or a reference implementation written in this package), traced
with torch.fx and inlined in place; :func:`replace_node` then reroutes the node's users.
Tensor arguments that are graph nodes stay graph nodes (a ``get_attr`` weight stays the same
``get_attr`` node, so parameters keep their original qualified names); every other argument
is a concrete Python value. After the rewrite,
:func:`~fxprune.passes._support.fake_meta.refresh_meta` gives the new nodes their metadata.

How tracing keeps the batch size dynamic ("two worlds"): plain ``symbolic_trace`` of a function
such as ``shifted_window_attention`` fails because it branches on shapes. The tracer here runs
every traced op on fake tensors in two worlds at once: world 0 is the traced graph as recorded,
world 1 is the same graph whose inputs have other sizes in some dims (first every dim but the
last, then only the batch dim). A shape, size or Python value that is equal in both worlds is
returned as a concrete value (so shape-dependent Python control flow just runs); one that
differs stays a graph value (``getattr(x, "shape")[0]``), so the inlined code works for any
batch size, like the original call did. When no two-world attempt succeeds the call is inlined
with every shape fixed to the traced one ("static"), and the change record says so.

Example (inline a function that has Python control flow on a shape):
    >>> import torch, fxprune
    >>> from fxprune.passes._support.fake_meta import refresh_meta
    >>> def gelu_if_wide(t):
    ...     return torch.nn.functional.gelu(t) if t.shape[-1] > 2 else t
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x)
    >>> gm = fxprune.trace(M(), torch.randn(2, 3))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> worlds = WorldSet(gm)
    >>> out = inline_call(gm, node, gelu_if_wide, node.args, {}, worlds=worlds, where="example")
    >>> replace_node(node, out.outputs, worlds)
    >>> refresh_meta(gm, "example"); _ = gm.recompile()
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"], out.world_kind
    (['gelu'], 'all-but-last')
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.node import Node, map_aggregate, map_arg
from torch.fx.proxy import Proxy

from fxprune.errors import first_line
from fxprune.meta import DECOMPOSED_FROM_KEY

from .tracer import SIDE_EFFECT_FUNCTIONS, InlineTracer, is_inplace_method
from .worlds import WORLD_KINDS, InlineError, WorldSet


@dataclasses.dataclass
class InlineResult:
    """``outputs``: the function's return value with graph values as nodes of the outer graph;
    ``nodes``: the inserted nodes in order; ``world_kind``: which sizes stayed dynamic."""

    outputs: Any
    nodes: list[Node]
    world_kind: str


def _dead_code(graph: torch.fx.Graph, values: dict[Node, tuple[Any, ...]]) -> None:
    """Remove unused nodes that compute shapes or other side-effect-free values."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_module" or is_inplace_method(node.op, node.target):
                continue
            if node.op == "call_function" and (node.target in SIDE_EFFECT_FUNCTIONS
                                               or node.is_impure()):
                continue
            graph.erase_node(node)
            changed = True


def inline_call(gm: torch.fx.GraphModule, node: Node, fn: Callable[..., Any], args: tuple,
                kwargs: dict, *, worlds: WorldSet, where: str,
                modules: dict[str, torch.nn.Module] | None = None,
                call_with_tracer: bool = False) -> InlineResult:
    """Trace ``fn(*args, **kwargs)`` and insert its ops before ``node`` in ``gm.graph``.

    Graph nodes inside ``args``/``kwargs`` become the traced function's inputs (and stay the
    same nodes in the result); everything else is passed as a concrete value. ``modules`` maps
    ``call_module`` targets the function may record (through ``tracer.module_call``) to the
    modules (already registered on ``gm``). With ``call_with_tracer`` the tracer is passed as
    keyword ``tracer``. ``node`` itself is not touched: see :func:`replace_node`.

    Raises :class:`InlineError` with the reason when no world set works.
    """
    reasons = []
    for kind in WORLD_KINDS:
        if not worlds.available(kind):
            continue
        try:
            graph, out, values = _trace(fn, args, kwargs, worlds, kind, modules or {},
                                        call_with_tracer)
        except InlineError as exc:
            reasons.append(f"{kind}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - any tracing failure refuses the node
            reasons.append(f"{kind}: {first_line(exc)}")
            continue
        return _insert(gm, node, graph, out, kind)
    raise InlineError("; ".join(reasons) if reasons else "no usable shape information")


def _trace(fn, args, kwargs, worlds: WorldSet, kind: str, modules, call_with_tracer):
    n_worlds = 1 if kind == "static" else 2
    tracer = InlineTracer(worlds.mode, n_worlds, modules)
    inputs: dict[Node, Proxy] = {}

    def to_proxy(n: Node) -> Proxy:
        if n not in inputs:
            proxy = tracer.create_proxy("placeholder", n.name, (), {})
            proxy.node.meta["outer"] = n
            tracer.worlds[proxy.node] = worlds.values(n, kind)
            inputs[n] = proxy
        return inputs[n]

    p_args = map_arg(args, to_proxy)
    p_kwargs = map_arg(kwargs, to_proxy)
    if call_with_tracer:
        p_kwargs = dict(p_kwargs, tracer=tracer)
    result = fn(*p_args, **p_kwargs)

    def to_node(v):
        if isinstance(v, Proxy):
            return v.node
        if isinstance(v, torch.Tensor):
            raise InlineError("the function returned a tensor that is not computed from its "
                              "inputs")
        return v

    out = map_aggregate(result, to_node) if not isinstance(result, Proxy) else result.node
    tracer.graph.output(out)
    _dead_code(tracer.graph, tracer.worlds)
    return tracer.graph, out, tracer.worlds


def _insert(gm: torch.fx.GraphModule, node: Node, graph: torch.fx.Graph, out: Any,
            kind: str) -> InlineResult:
    env: dict[Node, Node] = {}
    new_nodes: list[Node] = []
    keep_meta = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}
    with gm.graph.inserting_before(node):
        for n in graph.nodes:
            if n.op == "placeholder":
                env[n] = n.meta["outer"]
                continue
            if n.op == "output":
                continue
            new = gm.graph.create_node(n.op, n.target, map_arg(n.args, env.__getitem__),
                                       map_arg(n.kwargs, env.__getitem__),
                                       name=f"{node.name}_{n.name}")
            new.meta.update(keep_meta)
            new.meta[DECOMPOSED_FROM_KEY] = node.name
            env[n] = new
            new_nodes.append(new)
    outputs = map_arg(graph.output_node().args[0], env.__getitem__)
    return InlineResult(outputs, new_nodes, kind)


def replace_node(node: Node, outputs: Any, worlds: WorldSet | None = None) -> None:
    """Make every user of ``node`` use ``outputs`` instead, then erase ``node``.

    ``outputs`` is a node or a tuple/list of nodes and constants (``node`` returned a tuple):
    ``operator.getitem(node, i)`` users are folded to ``outputs[i]``; any other user gets the
    tuple itself as an argument.
    """
    graph = node.graph
    if isinstance(outputs, Node):
        if worlds is not None:
            worlds.alias(outputs, node)
        node.replace_all_uses_with(outputs)
        graph.erase_node(node)
        return
    for user in list(node.users):
        if (user.op == "call_function" and user.target is operator.getitem
                and user.args[0] is node and isinstance(user.args[1], int)):
            item = outputs[user.args[1]]
            if isinstance(item, Node):
                if worlds is not None:
                    worlds.alias(item, user)
                user.replace_all_uses_with(item)
            else:
                for u2 in list(user.users):
                    u2.args = map_arg(u2.args, lambda a, user=user, item=item:
                                      item if a is user else a)
                    u2.kwargs = map_arg(u2.kwargs, lambda a, user=user, item=item:
                                        item if a is user else a)
            graph.erase_node(user)
        else:
            user.args = map_arg(user.args, lambda a: outputs if a is node else a)
            user.kwargs = map_arg(user.kwargs, lambda a: outputs if a is node else a)
    graph.erase_node(node)
