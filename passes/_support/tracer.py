"""The inline tracer: traces a Python callable into a fresh graph, evaluating every op on
the fake values of one or two worlds (:mod:`fxprune.passes._support.worlds`). A value equal
in every world is returned to Python as a constant (so shape-dependent control flow runs);
one that differs stays a graph value (``getattr(x, "shape")[0]``).

Example:
    >>> is_inplace_method("call_method", "zero_"), is_inplace_method("call_method", "add")
    (True, False)
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import Node, map_aggregate
from torch.fx.proxy import Attribute, Proxy

from fxprune.errors import first_line

from .worlds import InlineError

#: functions recorded for their effect, never folded or removed
SIDE_EFFECT_FUNCTIONS = {operator.setitem}
#: functions always recorded (a constant result is still not folded)
NO_FOLD_FUNCTIONS = {builtins.getattr}


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


def is_inplace_method(kind: str, target: Any) -> bool:
    """A ``call_method`` of an in-place method (``x.zero_()``): it has an effect."""
    return (kind == "call_method" and isinstance(target, str) and target.endswith("_")
            and not target.startswith("_"))


class _WProxy(Proxy):
    """A Proxy that answers shape questions from the two worlds' fake values."""

    def __getattr__(self, k: str) -> Any:
        if k.startswith("_"):
            return super().__getattr__(k)
        tracer: InlineTracer = self.tracer  # type: ignore[assignment]
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


class InlineTracer(torch.fx.Tracer):
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
        side_effect = (target in SIDE_EFFECT_FUNCTIONS if kind == "call_function" else
                       is_inplace_method(kind, target) or kind == "call_module")
        if (not side_effect and not (kind == "call_function" and target in NO_FOLD_FUNCTIONS)
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
