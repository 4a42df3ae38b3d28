"""Tracing front-end: any ``nn.Module``, ``GraphModule`` or ``ExportedProgram`` becomes a
``GraphModule`` whose tensor nodes carry their shape in ``node.meta["val"]`` (a fake tensor).

Example:
    >>> import torch, fxprune
    >>> gm = fxprune.trace(torch.nn.Linear(4, 2), torch.randn(3, 4))
    >>> [tuple(n.meta["val"].shape) for n in gm.graph.nodes
    ...  if n.op in ("placeholder", "call_function", "call_module")]
    [(3, 4), (3, 2)]
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
import torch.fx

from fxprune.autocast_regions import inline_autocast_regions
from fxprune.errors import InputError, TraceError
from fxprune.meta import (
    INPUT_DTYPES_KEY,
    INPUT_SHAPES_KEY,
    TRACE_FALLBACK_KEY,
    TRACED_FROM_KEY,
)
from fxprune.modstate import preserved
from fxprune.shapes import propagate_shapes

WHERE = "fxprune.trace"


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(WHERE, f"example_inputs must be a Tensor or a tuple of Tensors, got "
                     f"{type(example_inputs).__name__}",
                     hint="pass e.g. torch.randn(1, 3, 224, 224) or (tensor_a, tensor_b)")


def _concrete_args(module: torch.nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """Forward parameters beyond the example inputs are fixed to their defaults so that
    optional arguments such as ``attn_mask=None`` do not become placeholders."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    concrete = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None
        concrete[p.name] = p.default
    return concrete or None


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps torch.nn's single-op built-ins as leaves (the analysis knows
    them) and traces into every other module, so user and timm modules become plain ops.

    torch.nn built-ins made of other modules (``TransformerEncoder``, its layers, ...) are
    traced into too: as leaves their channels would stay opaque. Only ``nn.MultiheadAttention``
    stays a leaf, for the ``decompose-mha`` pass. Where tracing into them meets control flow,
    :func:`trace` falls back to ``torch.export``, and where that fails too, to torch.fx with
    them as leaves (``leaf_containers``: traced, their channels opaque)."""

    def __init__(self, autowrap_functions: tuple = (), leaf_containers: bool = False):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_containers = leaf_containers

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, torch.nn.MultiheadAttention):
            return True
        if not self.leaf_containers and _torch_composite(m):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _torch_composite(m: torch.nn.Module) -> bool:
    """A torch.nn built-in made of other modules, other than ``nn.MultiheadAttention``."""
    return m.__module__.startswith("torch.nn") and next(m.children(), None) is not None \
        and not isinstance(m, torch.nn.MultiheadAttention)


def _symbolic_trace(module: torch.nn.Module, n_inputs: int, leaf_containers: bool = False
                    ) -> torch.fx.GraphModule:
    concrete = _concrete_args(module, n_inputs)
    attempts: list[tuple[str, tuple]] = [("plain", ())]
    try:  # timm registers helpers that cannot be traced through; use them only as a fallback
        from timm.layers import _fx as timm_fx  # type: ignore

        attempts.append(("timm-autowrap", tuple(timm_fx._autowrap_functions)))
    except Exception:  # timm absent or changed: the plain attempt is all we have
        pass
    errors = []
    for label, wrapped in attempts:
        tracer = _Tracer(autowrap_functions=wrapped, leaf_containers=leaf_containers)
        try:
            graph = tracer.trace(module, concrete_args=concrete)
        except Exception as exc:  # noqa: BLE001 - re-raised below as a typed error
            errors.append((label, exc))
            continue
        _drop_specialized_placeholders(graph, n_inputs)
        gm = torch.fx.GraphModule(tracer.root, graph, type(module).__name__)
        return gm
    label, exc = errors[-1]
    first = errors[0][1]
    construct = _describe_trace_failure(first)
    raise TraceError(WHERE, f"torch.fx could not trace {type(module).__name__}: {construct}",
                     hint="make the failing construct traceable (e.g. no Python control flow on "
                     "tensor values), or export the model with torch.export.export(model, args) "
                     "and pass the ExportedProgram to fxprune.trace") from first


def _drop_specialized_placeholders(graph: torch.fx.Graph, n_inputs: int) -> None:
    """Arguments fixed by ``concrete_args`` stay as placeholders feeding only the checks fx adds
    for them; remove those so the graph takes exactly the example inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[n_inputs:]:
        dead: list[torch.fx.Node] = []
        frontier = [ph]
        while frontier:
            node = frontier.pop()
            if node in dead:
                continue
            dead.append(node)
            frontier.extend(node.users)
        if any(u.op == "output" for u in dead):
            continue  # the argument reaches the output: leave the graph as traced
        for node in reversed(sorted(dead, key=lambda n: list(graph.nodes).index(n))):
            graph.erase_node(node)


def _describe_trace_failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in text or "symbolically traced variables" in text:
        return ("Python control flow depends on a tensor value (" + text + ")")
    return f"{type(exc).__name__}: {text}"


def trace(model: Any, example_inputs: Any) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule with shape metadata on every node.

    ``model`` may be an ``nn.Module`` (torch.fx symbolic tracing; optional forward arguments
    are fixed to their defaults), a ``GraphModule`` (copied), or a
    ``torch.export.ExportedProgram`` (unlifted with ``.module()``). A module torch.fx cannot
    trace is traced with ``torch.export`` instead, with a warning and the reason in
    ``gm.meta["fxprune.trace_fallback"]``. The input model is never modified: whatever its
    forward caches on it during tracing is undone (:mod:`fxprune.modstate`).

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        >>> gm = fxprune.trace(m, torch.randn(2, 8))
        >>> gm.meta["fxprune.traced_from"]
        'nn.Module'
    """
    inputs = _as_tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(WHERE, f"example input {i} is a {type(t).__name__}, not a Tensor",
                             hint="pass tensors with the shape the model expects")
        if t.numel() == 0:
            raise InputError(WHERE, f"the example inputs have a zero-size dim (input {i} has "
                             f"shape {tuple(t.shape)})",
                             hint="pass at least one example (e.g. batch size 1)")
    exported_cls = getattr(torch.export, "ExportedProgram", None)
    fallback = None
    if exported_cls is not None and isinstance(model, exported_cls):
        gm = _unlift(model)
        source = "ExportedProgram"
    elif isinstance(model, torch.fx.GraphModule):
        from fxprune.analysis.inputs import check_not_lifted

        check_not_lifted(model, WHERE)  # an ExportedProgram's graph_module: say what to pass
        gm = copy.deepcopy(model)
        source = "GraphModule"
    elif isinstance(model, torch.nn.Module):
        # tracing runs forward on proxies: whatever it caches on the model is undone
        with preserved(model):
            gm, fallback = _trace_module(model, inputs)
        source = "nn.Module" if fallback is None else "nn.Module (torch.export)"
    else:
        raise InputError(WHERE, f"expected an nn.Module, GraphModule or ExportedProgram, got "
                         f"{type(model).__name__}",
                         hint="pass the model object itself (e.g. timm.create_model(...))")
    if fallback is None:
        _finish(gm, inputs, recompile=source != "nn.Module")
    gm.meta[TRACED_FROM_KEY] = source
    if fallback is not None:
        gm.meta[TRACE_FALLBACK_KEY] = fallback
    gm.meta[INPUT_SHAPES_KEY] = [tuple(t.shape) for t in inputs]
    gm.meta[INPUT_DTYPES_KEY] = [t.dtype for t in inputs]
    return gm


def _finish(gm: torch.fx.GraphModule, inputs: tuple, recompile: bool) -> None:
    """Lint, recompile where needed and propagate shapes."""
    retyped = False
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            # string annotations (``from __future__ import annotations``) break pickling
            node.type = None
            retyped = True
    _lint(gm)
    if retyped or recompile:  # a freshly built GraphModule's code is current
        gm.recompile()
    propagate_shapes(gm, inputs)


def _lint(gm: torch.fx.GraphModule) -> None:
    """A malformed graph is the tracer's (or the model's) doing, never the inputs'."""
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001 - re-raised as a typed error
        node = next((n for n in gm.graph.nodes if any(a.graph is not gm.graph
                                                      for a in n.all_input_nodes)), None)
        raise TraceError(WHERE, f"the traced graph is malformed: {str(exc).splitlines()[0]}",
                         node=node, hint="a value computed during an earlier trace may be "
                         "cached on the model (e.g. a tensor kept in a dict attribute); run "
                         "the model once outside tracing, or clear the cache, and trace again"
                         ) from exc


def _trace_module(model: torch.nn.Module, inputs: tuple
                  ) -> tuple[torch.fx.GraphModule, str | None]:
    """torch.fx first; where it cannot trace the model (or its graph cannot run on the
    inputs), torch.export. Returns the GraphModule (shapes propagated) and, after a fallback,
    why fx failed."""
    was_training = model.training
    try:
        gm = _symbolic_trace(model, len(inputs))
        gm.train(was_training)
        _finish(gm, inputs, recompile=False)
        return gm, None
    except (TraceError, InputError) as exc:
        fx_error = exc
    try:
        ep = _export(model, inputs)
        gm = _unlift(ep)
        _finish(gm, inputs, recompile=True)
    except Exception as exc:  # noqa: BLE001 - both front-ends failed: say so, typed
        if isinstance(fx_error, InputError):
            raise fx_error from exc
        opaque = _containers_as_leaves(model, inputs, was_training)
        if opaque is not None:
            return opaque, None
        _run_eagerly(model, inputs)  # an InputError when the inputs do not fit the model
        raise TraceError(WHERE, f"{fx_error.args[0].split(chr(10))[0].removeprefix(f'[{WHERE}] ')}"
                         f"; torch.export failed too: {type(exc).__name__}: "
                         f"{_first_line(exc)}", hint="make the failing construct traceable "
                         "(e.g. no Python control flow on tensor values, or torch.cond), "
                         "or pass an ExportedProgram you exported yourself "
                         "(torch.export.export(model, args, strict=False))") from exc
    why = _first_line(fx_error).removeprefix(f"[{WHERE}] ")
    warnings.warn(f"[{WHERE}] torch.fx could not trace {type(model).__name__} ({why}); "
                  "traced it with torch.export instead", stacklevel=3)
    return gm, why


def export_dynamic_batch(module: torch.nn.Module, inputs: tuple):
    """``torch.export.export(module, inputs)`` with the first dim of every input dynamic:
    ``(program, None)``, or ``(None, error)`` where the graph fixes the batch size.

    torch.export specialises a dim whose example size is 1, so inputs are exported at a batch
    of at least 2 (the example expanded)."""
    batched = tuple(t.expand(max(2, t.shape[0]), *t.shape[1:]).contiguous()
                    if isinstance(t, torch.Tensor) and t.ndim else t for t in inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dims = tuple({0: batch} if isinstance(t, torch.Tensor) and t.ndim else None
                 for t in batched)
    try:
        return torch.export.export(module, batched, dynamic_shapes=dims), None
    except Exception as exc:  # noqa: BLE001 - the caller exports with static sizes instead
        return None, exc


def _export(model: torch.nn.Module, inputs: tuple):
    """``torch.export`` with the batch dim dynamic where it can be (so the pruned model takes
    any batch size, as an fx-traced one does), else with the example's sizes."""
    ep, _ = export_dynamic_batch(model, inputs)
    return ep if ep is not None else torch.export.export(model, inputs)


def _containers_as_leaves(model, inputs: tuple, was_training: bool):
    """torch.fx with torch.nn's composite modules as leaves (their channels stay opaque), or
    None where the model has none or fx fails that way too."""
    if not any(_torch_composite(m) for m in model.modules()):
        return None
    try:
        gm = _symbolic_trace(model, len(inputs), leaf_containers=True)
        gm.train(was_training)
        _finish(gm, inputs, recompile=False)
    except (TraceError, InputError):
        return None
    warnings.warn(f"[{WHERE}] {type(model).__name__}: neither torch.fx nor torch.export could "
                  "trace into its torch.nn composite modules; they stay opaque leaves (their "
                  "channels dense)", stacklevel=4)
    return gm


def _run_eagerly(model: torch.nn.Module, inputs: tuple) -> None:
    """Run ``model`` itself on the inputs: when that fails, the inputs are to blame."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - re-raised as a typed error
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputError(WHERE, f"the model fails on example inputs of shape {shapes}: "
                         f"{type(exc).__name__}: {_first_line(exc)}",
                         hint="check the example inputs' shape and dtype against what the "
                         "model expects (e.g. (1, 3, 224, 224) for an ImageNet ViT)") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unlift(ep) -> torch.fx.GraphModule:
    """The GraphModule of an ExportedProgram with parameters and buffers as attributes."""
    try:
        gm = ep.module()
    except Exception as exc:
        raise TraceError(WHERE, f"could not unlift the ExportedProgram: {exc}") from exc
    if not isinstance(gm, torch.fx.GraphModule):
        raise TraceError(WHERE, "ExportedProgram.module() did not return a GraphModule")
    _strip_export_guards(gm)
    inline_autocast_regions(gm)
    return gm


def _strip_export_guards(gm: torch.fx.GraphModule) -> None:
    """Unlifted exported modules check input shapes in a pre-hook; keep it, but drop the
    pytree in/out spec so the module is called positionally like a traced one."""
    return None
