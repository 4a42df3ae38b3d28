"""Shapes on every node: :func:`propagate_shapes` writes ``node.meta["val"]`` (meta, fake or,
where those cannot run an op, real tensors) and says at which node and why a graph does not
run on its inputs; :func:`example_zeros` rebuilds inputs for re-propagating after a pass.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
    >>> propagate_shapes(gm, [torch.randn(3, 4)])
    >>> [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op != "output"]
    [(3, 4), (2, 4), (2,), (3, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxprune.errors import InputError
from fxprune.meta import INPUT_DTYPES_KEY, INPUT_SHAPES_KEY, SHAPE_PROP_KEY

WHERE = "fxprune.trace"


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                     where: str = WHERE) -> None:
    """Write ``node.meta["val"]`` (fake tensors) on every node by running ``gm`` on fake
    copies of ``example_inputs``; falls back to a real run where fake propagation fails."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise InputError(where, f"the graph takes {len(placeholders)} inputs "
                         f"({', '.join(p.name for p in placeholders)}) but "
                         f"{len(example_inputs)} example inputs were given",
                         hint="pass one example tensor per model input")
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm.meta.pop(SHAPE_PROP_KEY, None)
    try:
        _MetaShapeProp(gm).propagate(example_inputs)
        gm.meta[SHAPE_PROP_KEY] = "meta"
        return
    except Exception:  # noqa: BLE001 - some ops need values; fake tensors handle more
        pass
    fake = None
    try:
        fake = _FakeShapeProp(gm, FakeTensorMode(allow_non_fake_inputs=True))
        fake.propagate(*example_inputs)
        gm.meta[SHAPE_PROP_KEY] = "fake"
        return
    except Exception as fake_exc:  # noqa: BLE001 - retried with real tensors below
        fake_error = fake_exc
    replayed = _replay_failure(fake, fake_error) if fake is not None else None
    if replayed is not None:
        raise _run_failure(example_inputs, where, fake.current, replayed) from replayed
    _RealShapeProp(gm).run_checked(example_inputs, where, fake_error)
    gm.meta[SHAPE_PROP_KEY] = "real"


def _run_failure(example_inputs, where: str, node, exc: Exception) -> InputError:
    """The error of a real run of the graph on ``example_inputs`` that failed at ``node``."""
    shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs
                       if isinstance(t, torch.Tensor))
    first = str(exc).splitlines()[0] if str(exc) else ""
    return InputError(where, f"running the model on example inputs of shape {shapes} "
                      f"failed: {type(exc).__name__}: {first}",
                      node=node, hint="check the example inputs' shape and dtype against "
                      "what the model expects (e.g. (1, 3, 224, 224) for an ImageNet ViT)")


def _replay_failure(fake: _FakeShapeProp, fake_error: Exception) -> Exception | None:
    """The exception a real run raises at the node where fake propagation failed, found by
    running that one node on real tensors of its inputs' fake shapes, or None.

    A real run of a large graph that fails late (a sliced graph whose shapes no longer fit)
    costs a whole forward pass just to learn the error. Where the failing node raises on real
    inputs filled with zeros and again with ones, with the same error both times, the failure
    does not depend on values: the real run would stop there with that error. Anything else
    (fake tensors' own limits, a node that runs, value-dependent errors) returns None and the
    caller runs the graph for real."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedFakeTensorException,
        UnsupportedOperatorException,
    )

    node = fake.current
    if node is None or node.op not in ("call_function", "call_method", "call_module") or \
            isinstance(fake_error, (DataDependentOutputException, DynamicOutputShapeException,
                                    UnsupportedFakeTensorException,
                                    UnsupportedOperatorException, NotImplementedError)):
        return None
    seen = []
    for fill in (0, 1):
        try:
            real = torch.fx.Interpreter(fake.module, garbage_collect_values=False)
            for arg in node.all_input_nodes:
                real.env[arg] = real.fetch_attr(arg.target) if arg.op == "get_attr" else \
                    torch.utils._pytree.tree_map(lambda v, f=fill: _filled_like(v, f),
                                                 fake.env[arg])
        except Exception:  # noqa: BLE001 - inputs that cannot be rebuilt: run for real
            return None
        try:
            with torch.no_grad():
                real.run_node(node)
        except Exception as exc:  # noqa: BLE001 - the failure being replayed
            if not str(exc):
                return None
            seen.append(exc)
        else:
            return None
    same = len({(type(e), str(e).splitlines()[0]) for e in seen}) == 1
    return seen[0] if same else None


def _filled_like(value, fill: int):
    if not isinstance(value, torch.Tensor):
        return value
    out = torch.empty_strided(tuple(value.shape), value.stride(), dtype=value.dtype,
                              device=value.device)
    return out.fill_(fill)


class _FakeShapeProp(FakeTensorProp):
    """FakeTensorProp records values that are tensors (or sizes) only; a node yielding a
    dtype, a device or None gets its value too, so every node used later has one."""

    current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        if "val" not in n.meta:
            n.meta["val"] = out
        return out


def _to_meta(v):
    return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v


def _memo_functions() -> frozenset:
    import torch.nn.functional as F

    return frozenset({F.layer_norm, torch.layer_norm, F.linear,
                      F.scaled_dot_product_attention})


#: ops whose meta kernels are slow (Python reference implementations) and whose output is a
#: fresh tensor determined by the inputs' metadata alone: their results are memoized
_MEMO_FUNCTIONS = _memo_functions()
_MEMO_MODULES = (torch.nn.Linear, torch.nn.LayerNorm)


def _signature(value):
    """Hashable description of an argument for the meta-result memo (None: not memoizable)."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor or value.device.type != "meta":
            return None
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.storage_offset(),
                value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        parts = tuple(_signature(v) for v in value)
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    return None


def _has_hooks(mod: torch.nn.Module) -> bool:
    """Forward hooks (the module's or global ones) may change what a call returns."""
    from torch.nn.modules import module as module_mod

    return bool(mod._forward_hooks or mod._forward_pre_hooks
                or getattr(module_mod, "_global_forward_hooks", None)
                or getattr(module_mod, "_global_forward_pre_hooks", None))


class _MetaShapeProp(torch.fx.Interpreter):
    """Fastest shape propagation: parameters, buffers and inputs swapped for meta tensors
    (no arithmetic at all). Ops that need values fail here and fall back to fake tensors.

    The repeated blocks of a ViT call the same slow meta kernels (layer norm, linear, SDPA)
    with the same input metadata again and again: those results are memoized by the inputs'
    shapes, strides and dtypes, and a repeat gets a fresh meta tensor of the same shape,
    strides and dtype (what the kernel would return)."""

    def __init__(self, module):
        super().__init__(module)
        self._memo: dict = {}

    def fetch_attr(self, target: str):
        return _to_meta(super().fetch_attr(target))

    def call_function(self, target, args, kwargs):
        if target not in _MEMO_FUNCTIONS:
            return super().call_function(target, args, kwargs)
        return self._memoized(("function", target), args, kwargs,
                              lambda: super(_MetaShapeProp, self).call_function(
                                  target, args, kwargs))

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if type(mod) not in _MEMO_MODULES or _has_hooks(mod):
            return super().call_module(target, args, kwargs)
        state = (type(mod), getattr(mod, "normalized_shape", None),
                 tuple((k, _signature(v)) for k, v in mod._parameters.items()))
        return self._memoized(("module", state), args, kwargs,
                              lambda: super(_MetaShapeProp, self).call_module(
                                  target, args, kwargs))

    def _memoized(self, what, args, kwargs, compute):
        key = (what, _signature(tuple(args)), _signature(tuple(sorted(kwargs.items()))))
        params_ok = what[0] != "module" or all(v is not None for _, v in what[1][2])
        if key[1] is None or key[2] is None or not params_ok:
            return compute()
        hit = self._memo.get(key)
        if hit is not None:
            shape, stride, dtype = hit
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        out = compute()
        if type(out) is torch.Tensor and out.device.type == "meta" and \
                out.storage_offset() == 0 and not out.requires_grad:
            self._memo[key] = (tuple(out.shape), out.stride(), out.dtype)
        return out

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["val"] = out
        return out

    def propagate(self, example_inputs) -> None:
        from torch.nn.utils.stateless import _reparametrize_module

        state = {k: _to_meta(v) for k, v in list(self.module.named_parameters(
            remove_duplicate=False)) + list(self.module.named_buffers(remove_duplicate=False))}
        with torch.no_grad(), _reparametrize_module(self.module, state):
            self.run(*[_to_meta(t) for t in example_inputs])


class _RealShapeProp(torch.fx.Interpreter):
    """Runs the graph on real tensors and records meta-device stand-ins as ``meta["val"]``."""

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map(
            lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta")
            if isinstance(v, torch.Tensor) else v, out)
        return out

    def run_checked(self, example_inputs, where, fake_error):
        self.current = None
        try:
            with torch.no_grad():
                self.run(*example_inputs)
        except Exception as exc:
            raise _run_failure(example_inputs, where, self.current, exc) from exc


def example_zeros(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Zero tensors shaped (and typed) like the example inputs ``gm`` was traced with, for
    re-propagating shapes after a pass changed the graph."""
    shapes = gm.meta.get(INPUT_SHAPES_KEY) or []
    dtypes = gm.meta.get(INPUT_DTYPES_KEY) or [torch.float32] * len(shapes)
    return [torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)]
