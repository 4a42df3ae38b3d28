"""Shared machinery of the decompose passes (``decompose-mha``, ``decompose-window-attention``,
``decompose-functional-linear``).

Three things live here:

* :func:`refresh_meta` re-propagates ``node.meta["val"]`` (fake tensors) after a rewrite, from
  the fake values the placeholders already carry (a pass has no example inputs).
* :func:`inline_call` replaces one ``call_function``/``call_module`` node by the plain ops of a
  Python function (a library function such as torchvision's ``shifted_window_attention``, or a
  reference implementation written in this package), traced with torch.fx and inlined in place.
  Tensor arguments that are graph nodes stay graph nodes (a ``get_attr`` weight stays the same
  ``get_attr`` node, so parameters keep their original qualified names); every other argument is
  a concrete Python value.
* :func:`normalize_linear_biases` rewrites a Linear bias built by zeroing a slice of a clone of
  a parameter in place (torchvision's Swin V2 qkv bias) into ``torch.cat`` of parameter slices
  and ``zeros_like`` pieces.

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

import builtins
import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import Node, map_aggregate, map_arg
from torch.fx.proxy import Attribute, Proxy

from fxprune.errors import FxPruneError, PassOrderError
from fxprune.meta import DECOMPOSED_FROM_KEY, FIXED_SIZES_KEY

__all__ = [
    "DecomposeError", "WorldSet", "InlineResult", "inline_call", "replace_node", "refresh_meta",
    "normalize_linear_biases", "require_shapes", "copy_for_rewrite", "LINEAR_TARGETS",
]

#: ``call_function`` targets that are a Linear in the canonical form (``F.linear`` is
#: ``torch._C._nn.linear``).
LINEAR_TARGETS = (F.linear,)

#: Where a node produced by a decompose pass records the node it replaced.


class DecomposeError(FxPruneError):
    """A decompose pass met an input it does not support (raised with ``strict=True``; by
    default the node is left alone and the reason recorded in ``PassResult.info["refused"]``)."""


class InlineError(Exception):
    """Internal: one attempt at tracing a call failed (the caller tries another world set or
    refuses the node with this message)."""


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# fake tensors
# --------------------------------------------------------------------------------------------

def _fake_tensor_type():
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def require_shapes(where: str, gm: torch.fx.GraphModule) -> None:
    """Raise :class:`PassOrderError` unless every graph input carries ``meta["val"]``."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise PassOrderError(where, "the graph inputs have no shape metadata "
                                 "(node.meta['val'])", node=node,
                                 hint=f"run fxprune.trace(model, example_inputs) before {where}")


def _placeholder_values(gm: torch.fx.GraphModule, where: str) -> list[Any]:
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if "val" not in node.meta:
            raise DecomposeError(where, "the graph input has no shape metadata (meta['val'])",
                                 node=node, hint="trace the model with fxprune.trace(model, "
                                 "example_inputs) before running this pass")
        values.append(node.meta["val"])
    return values


def _existing_fake_mode(values: Iterable[Any]):
    fake_cls = _fake_tensor_type()
    for v in values:
        if isinstance(v, fake_cls):
            return v.fake_mode
    return None


def _concrete_shape(value: torch.Tensor, where: str) -> list[int]:
    try:
        return [int(s) for s in value.shape]
    except Exception as exc:  # symbolic sizes without a hint
        raise InlineError(f"graph input has symbolic sizes {tuple(value.shape)}") from exc


def _fresh_fake(mode, value: Any, shape: list[int] | None = None) -> Any:
    """A fake tensor of ``mode`` with the dtype/device of ``value`` (and ``shape``)."""
    if not isinstance(value, torch.Tensor):
        return value
    shape = list(value.shape) if shape is None else shape
    device = value.device if value.device.type != "meta" else torch.device("cpu")
    with mode:
        return torch.empty(shape, dtype=value.dtype, device=device)


def refresh_meta(gm: torch.fx.GraphModule, where: str) -> None:
    """Re-run fake-tensor propagation so every node (new ones included) has ``meta["val"]``.

    The inputs are the placeholders' existing ``meta["val"]``; their fake mode is reused when
    they are fake tensors (the propagation then shares their shape environment), otherwise (or
    when reusing fails) a fresh ``FakeTensorMode(allow_non_fake_inputs=True)`` is used.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    values = _placeholder_values(gm, where)
    mode = _existing_fake_mode(values)
    if mode is not None:
        try:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)
            return
        except Exception:  # noqa: BLE001 - e.g. a mode that refuses real parameters
            pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fresh = [_fresh_fake(mode, v) for v in values]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fresh)
    except Exception as exc:
        raise DecomposeError(where, f"shape propagation failed after the rewrite: "
                             f"{first_line(exc)}",
                             hint="report this as an fxprune bug with the model") from exc


def copy_for_rewrite(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` (as :func:`fxprune.passbase.copy_graph_module`) whose node metas
    share the (immutable) fake tensors of the original instead of deep-copying each one."""
    import copy

    memo: dict[int, Any] = {}
    for node in gm.graph.nodes:
        for v in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(v, torch.Tensor):
                memo[id(v)] = v
    return copy.deepcopy(gm, memo)


# --------------------------------------------------------------------------------------------
# two worlds
# --------------------------------------------------------------------------------------------

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
        if isinstance(value, torch.Tensor) and not isinstance(value, _fake_tensor_type()):
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
            for v in _placeholder_values(self.gm, self.where):
                if not isinstance(v, torch.Tensor):
                    inputs.append(v)
                    continue
                shape = _concrete_shape(v, self.where)
                if kind == "all-but-last":
                    shape = [s + 1 for s in shape[:-1]] + shape[-1:]
                elif kind == "batch" and shape:
                    shape = [shape[0] + 1] + shape[1:]
                inputs.append(_fresh_fake(self.mode, v, shape))
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
            value = _fetch(self.gm, node.target)
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

            value = torch.utils._pytree.tree_map(fresh, node.meta["val"])
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


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# the tracer
# --------------------------------------------------------------------------------------------

_SIDE_EFFECT_FUNCTIONS = {operator.setitem}
_NO_FOLD_FUNCTIONS = {builtins.getattr}


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v):
        nonlocal found
        if isinstance(v, torch.Tensor):
            found = True
        return v

    map_aggregate(value, visit) if isinstance(value, (tuple, list, dict, slice)) else visit(value)
    return found


def _all_equal(values: tuple[Any, ...]) -> bool:
    if any(_has_tensor(v) for v in values):
        return False
    first = values[0]
    try:
        return all(type(v) is type(first) and bool(v == first) for v in values[1:])
    except Exception:  # noqa: BLE001 - values that do not compare are not constants
        return False


def _is_inplace_method(kind: str, target: Any) -> bool:
    return (kind == "call_method" and isinstance(target, str) and target.endswith("_")
            and not target.startswith("_"))


class _WProxy(Proxy):
    """A Proxy that answers shape questions from the two worlds' fake values."""

    def __getattr__(self, k: str) -> Any:
        if k.startswith("_"):
            return super().__getattr__(k)
        tracer: _InlineTracer = self.tracer  # type: ignore[assignment]
        vals = tracer.world_of(self)
        if k == "shape":
            return tracer.shape_of(self, vals)
        try:
            attrs = tuple(getattr(v, k) for v in vals)
        except Exception:  # noqa: BLE001 - let fx record it and fail where it is used
            return Attribute(self, k)
        if not callable(attrs[0]) and _all_equal(attrs):
            return attrs[0]
        return Attribute(self, k)

    def __len__(self) -> int:
        vals = self.tracer.world_of(self)  # type: ignore[attr-defined]
        lens = {len(v) for v in vals}
        if len(lens) != 1:
            raise InlineError("len() of a value whose length depends on the input size")
        return lens.pop()

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _InlineTracer(torch.fx.Tracer):
    """Traces a Python callable into a fresh graph, evaluating every op on fake values of one
    or two worlds (see the module docstring)."""

    def __init__(self, mode, n_worlds: int, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.fake_mode = mode
        self.n_worlds = n_worlds
        self.modules = modules
        self.worlds: dict[Node, tuple[Any, ...]] = {}

    # -- values ---------------------------------------------------------------------------
    def world_of(self, a: Any) -> tuple[Any, ...]:
        if isinstance(a, Attribute):
            return tuple(getattr(v, a.attr) for v in self.world_of(a.root))
        if isinstance(a, Proxy):
            return self.worlds[a.node]
        return (a,) * self.n_worlds

    def _in_world(self, value: Any, w: int) -> Any:
        def f(x):
            return self.world_of(x)[w] if isinstance(x, Proxy) else x

        if isinstance(value, Proxy):
            return f(value)
        return map_aggregate(value, f)

    def _eval(self, w: int, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        a = self._in_world(args, w)
        k = self._in_world(kwargs, w)
        with self.fake_mode:
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.modules[target](*a, **k)
        raise InlineError(f"cannot evaluate a {kind} node")

    def shape_of(self, proxy: Proxy, vals: tuple[Any, ...]) -> tuple[Any, ...]:
        shapes = [tuple(v.shape) for v in vals]
        if len({len(s) for s in shapes}) != 1:
            raise InlineError("the rank of a value depends on the input size")
        attr = None
        out: list[Any] = []
        for i, d in enumerate(shapes[0]):
            if all(s[i] == d for s in shapes):
                out.append(int(d))
            else:
                if attr is None:
                    attr = Attribute(proxy, "shape")
                out.append(attr[i])
        return tuple(out)

    # -- simplifications (exact) -----------------------------------------------------------
    def _identity_of(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The input proxy when the op is an identity by its constant arguments."""
        if kind != "call_function":
            return None
        if target is F.dropout:
            x = args[0] if args else kwargs.get("input")
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if isinstance(x, Proxy) and not isinstance(p, Proxy) and not isinstance(
                    training, Proxy) and (p == 0 or training is False):
                return x
        if target is F.pad:
            x = args[0] if args else kwargs.get("input")
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            if isinstance(x, Proxy) and isinstance(pad, (tuple, list)) and all(
                    isinstance(p, int) and p == 0 for p in pad):
                return x
        return None

    # -- fx hooks -------------------------------------------------------------------------
    def proxy(self, node: Node) -> Proxy:
        return _WProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        if kind in ("placeholder", "output", "get_attr"):
            return super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                        proxy_factory_fn)
        same = self._identity_of(kind, target, args, kwargs)
        if same is not None:
            return same
        try:
            vals = tuple(self._eval(w, kind, target, args, kwargs) for w in range(self.n_worlds))
        except InlineError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the reason of a refusal
            raise InlineError(f"{kind} {getattr(target, '__name__', target)} failed on fake "
                              f"tensors: {first_line(exc)}") from exc
        side_effect = (target in _SIDE_EFFECT_FUNCTIONS if kind == "call_function" else
                       _is_inplace_method(kind, target) or kind == "call_module")
        if (not side_effect and not (kind == "call_function" and target in _NO_FOLD_FUNCTIONS)
                and _all_equal(vals)):
            return vals[0]  # a constant in every world: Python sees a plain value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        self.worlds[proxy.node] = vals
        return proxy

    def to_bool(self, obj: Proxy) -> bool:
        try:
            vals = tuple(bool(v) for v in self.world_of(obj))
        except Exception as exc:  # noqa: BLE001 - data-dependent branch on a fake tensor
            raise InlineError("Python control flow depends on tensor data") from exc
        if len(set(vals)) != 1:
            raise InlineError("Python control flow depends on the input size")
        return vals[0]

    def iter(self, obj: Proxy):
        vals = self.world_of(obj)
        lens = {len(v) for v in vals}
        if len(lens) != 1:
            raise InlineError("iteration over a value whose length depends on the input size")
        return iter([obj[i] for i in range(lens.pop())])

    def keys(self, obj: Proxy):
        raise InlineError("** on a traced value is not supported")

    def module_call(self, target: str, *args: Any) -> Proxy:
        """Record ``call_module[target](*args)`` (the module must be in ``modules``)."""
        return self.create_proxy("call_module", target, args, {})


# --------------------------------------------------------------------------------------------
# inlining
# --------------------------------------------------------------------------------------------

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
            if node.op == "call_module" or _is_inplace_method(node.op, node.target):
                continue
            if node.op == "call_function" and (node.target in _SIDE_EFFECT_FUNCTIONS
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
    tracer = _InlineTracer(worlds.mode, n_worlds, modules)
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
    if kind != "all-but-last" and new_nodes:  # the inlined code holds the traced sizes
        fixed = "spatial sizes fixed, batch free" if kind == "batch" else "every size fixed"
        gm.meta.setdefault(FIXED_SIZES_KEY, []).append(f"{node.name} ({fixed})")
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


# --------------------------------------------------------------------------------------------
# Linear biases
# --------------------------------------------------------------------------------------------

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

