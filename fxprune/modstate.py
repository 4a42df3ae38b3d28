"""Snapshot and restore of a module's Python-level state around a trace.

Tracing runs a model's ``forward`` on proxies (torch.fx) or fake tensors (torch.export). A
forward that caches something on the module (attention biases gathered once per device, a
lazily built table, a counter) then keeps a proxy in the user's model, and every later trace
or run of that model sees it. :func:`preserved` records every submodule's attributes (and the
contents of dict, list and set attributes), its parameter, buffer and child tables, its
training flag and its buffers' values, and puts all of it back afterwards, whatever the
traced code did.

Example:
    >>> import torch
    >>> class Cached(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cache = {}
    ...     def forward(self, x):
    ...         self.cache["last"] = x
    ...         return x * 2
    >>> m = Cached()
    >>> with preserved(m):
    ...     _ = m(torch.ones(1))
    >>> m.cache
    {}
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

_TABLES = ("_parameters", "_buffers", "_modules")


def _copy_container(value: Any) -> Any:
    """A shallow copy of a mutable container's contents (None for anything else)."""
    if type(value) in (dict, list, set):
        return type(value)(value)
    return None


@dataclasses.dataclass
class _ModuleState:
    module: torch.nn.Module
    attrs: dict[str, Any]
    contents: dict[str, Any]
    tables: dict[str, dict]
    buffers: dict[str, torch.Tensor]


@dataclasses.dataclass
class Snapshot:
    """What :func:`snapshot` recorded; :func:`restore` puts it back."""

    states: list[_ModuleState]


def snapshot(model: torch.nn.Module) -> Snapshot:
    """Record ``model``'s state (see the module docstring) without copying its parameters.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> s = snapshot(m)
        >>> m.extra = 1
        >>> restore(s); hasattr(m, "extra")
        False
    """
    states = []
    for mod in model.modules():
        attrs = {k: v for k, v in vars(mod).items() if k not in _TABLES}
        contents = {k: c for k, v in attrs.items() if (c := _copy_container(v)) is not None}
        tables = {k: dict(getattr(mod, k)) for k in _TABLES if isinstance(
            getattr(mod, k, None), dict)}
        buffers = {k: b.detach().clone() for k, b in mod._buffers.items()
                   if isinstance(b, torch.Tensor) and b.device.type != "meta"}
        states.append(_ModuleState(mod, attrs, contents, tables, buffers))
    return Snapshot(states)


def restore(snap: Snapshot) -> None:
    """Put back what :func:`snapshot` recorded: attributes added since are removed, replaced
    ones and container contents restored, buffers whose values changed copied back."""
    for st in snap.states:
        mod = st.module
        current = vars(mod)
        for key in [k for k in current if k not in _TABLES and k not in st.attrs]:
            del current[key]
        for key, value in st.attrs.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value
            saved = st.contents.get(key)
            if saved is not None and not _same_contents(value, saved):
                _refill(value, saved)
        for key, table in st.tables.items():
            live = getattr(mod, key)
            if live is not table and (live.keys() != table.keys() or any(
                    live[k] is not v for k, v in table.items())):
                live.clear()
                live.update(table)
        with torch.no_grad():
            for key, saved in st.buffers.items():
                buf = mod._buffers.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == saved.shape and \
                        not torch.equal(buf, saved):
                    buf.copy_(saved)


_MISSING = object()


def _same_contents(container: Any, saved: Any) -> bool:
    """Item by item identity (``==`` on tensors or proxies would not give a bool)."""
    if len(container) != len(saved):
        return False
    if isinstance(container, dict):
        try:
            return all(k in container and container[k] is v for k, v in saved.items())
        except Exception:  # noqa: BLE001 - keys whose == is not a bool (proxies)
            return False
    if isinstance(container, list):
        return all(a is b for a, b in zip(container, saved))
    return all(any(a is b for b in saved) for a in container)


def _refill(container: Any, saved: Any) -> None:
    container.clear()
    if isinstance(container, dict):
        container.update(saved)
    elif isinstance(container, list):
        container.extend(saved)
    else:
        container.update(saved)


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Run the body and leave ``model`` exactly as it was before (see :func:`snapshot`)."""
    snap = snapshot(model)
    try:
        yield
    finally:
        restore(snap)
