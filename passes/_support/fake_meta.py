"""Fake-tensor metadata of a graph: check that a graph has it, refresh it after a rewrite
(``node.meta["val"]`` of new nodes, from the fake values the inputs already carry: a pass has
no example inputs), and copy a graph sharing it.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> gm = fxprune.trace(m, torch.randn(3, 4))
    >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> del node.meta["val"]
    >>> refresh_meta(gm, "example")
    >>> tuple(node.meta["val"].shape)
    (3, 2)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxprune.errors import DecomposeError, PassOrderError, first_line


def fake_tensor_type():
    """torch's FakeTensor class (imported when first needed)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def require_shapes(where: str, gm: torch.fx.GraphModule) -> None:
    """Raise :class:`PassOrderError` unless every graph input carries ``meta["val"]``."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise PassOrderError(where, "the graph inputs have no shape metadata "
                                 "(node.meta['val'])", node=node,
                                 hint=f"run fxprune.trace(model, example_inputs) before {where}")


def placeholder_values(gm: torch.fx.GraphModule, where: str) -> list[Any]:
    """The ``meta["val"]`` of every graph input, in order (a typed error names an input
    without one)."""
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if "val" not in node.meta:
            raise DecomposeError(where, "the graph input has no shape metadata (meta['val'])",
                                 node=node, hint="trace the model with fxprune.trace(model, "
                                 "example_inputs) before running this pass")
        values.append(node.meta["val"])
    return values


def _existing_fake_mode(values: Iterable[Any]):
    fake_cls = fake_tensor_type()
    for v in values:
        if isinstance(v, fake_cls):
            return v.fake_mode
    return None


def fresh_fake(mode, value: Any, shape: list[int] | None = None) -> Any:
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

    values = placeholder_values(gm, where)
    mode = _existing_fake_mode(values)
    if mode is not None:
        try:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)
            return
        except Exception:  # noqa: BLE001 - e.g. a mode that refuses real parameters
            pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fresh = [fresh_fake(mode, v) for v in values]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fresh)
    except Exception as exc:
        raise DecomposeError(where, f"shape propagation failed after the rewrite: "
                             f"{first_line(exc)}",
                             hint="report this as an fxprune bug with the model") from exc


def copy_for_rewrite(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` (as :func:`fxprune.passbase.copy_graph_module`) whose node metas
    share the (immutable) fake tensors of the original instead of deep-copying each one."""
    memo: dict[int, Any] = {}
    for node in gm.graph.nodes:
        for v in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(v, torch.Tensor):
                memo[id(v)] = v
    return copy.deepcopy(gm, memo)
