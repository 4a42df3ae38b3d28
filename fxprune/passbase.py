"""The pass contract: ``requires -> run -> ensures``, options in a frozen dataclass, a stable
kebab-case ``name``, and a :class:`PassResult` that says what changed.

Example:
    >>> import dataclasses, torch.fx
    >>> @dataclasses.dataclass(frozen=True)
    ... class NoOptions:
    ...     pass
    >>> class Noop(FxPass):
    ...     name = "noop"
    ...     Options = NoOptions
    ...     def run(self, gm):
    ...         return PassResult(gm, modified=False, changes=[])
    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> Noop()(gm).modified
    False
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.fx

from fxprune.errors import FxPruneError, PassOrderError
from fxprune.meta import ANALYSIS_KEY


@dataclasses.dataclass
class PassResult:
    """What a pass returns: the (possibly new) GraphModule, whether it changed, and a list of
    human-readable change records (one per rewrite)."""

    graph_module: torch.fx.GraphModule
    modified: bool
    changes: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"PassResult(modified={self.modified}, changes={len(self.changes)}"
                + (f", info={list(self.info)}" if self.info else "") + ")")


class FxPass:
    """Base class of fxprune passes.

    Subclasses set ``name`` (stable, kebab-case) and ``Options`` (a frozen dataclass) and
    implement :meth:`run`. :meth:`requires` checks preconditions and raises
    :class:`PassOrderError` naming the pass to run first; :meth:`ensures` checks the result
    (by default: the graph lints and, when the pass changed something, the module recompiles;
    :meth:`run` need not recompile itself).
    """

    name: ClassVar[str] = "fx-pass"
    Options: ClassVar[type] = type(None)

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = self.Options(**kwargs) if self.Options is not type(None) else None
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    # -- contract -----------------------------------------------------------------------
    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not isinstance(gm, torch.fx.GraphModule):
            raise PassOrderError(self.name, "expected a torch.fx.GraphModule, got "
                                 f"{type(gm).__name__}",
                                 hint="call fxprune.trace(model, example_inputs) first")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        gm = result.graph_module
        try:
            gm.graph.lint()
            if result.modified or result.changes:  # an unchanged module's code is current
                gm.recompile()
        except Exception as exc:  # a broken graph is a bug in the pass: say which one
            raise FxPruneError(self.name, f"pass left an invalid graph: {exc}",
                               hint="report this as an fxprune bug with the model") from exc

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.run(gm)
        self.ensures(result)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"


def require_meta(pass_name: str, gm: torch.fx.GraphModule, key: str, producer: str) -> Any:
    """Return ``gm.meta[key]`` or raise a :class:`PassOrderError` naming the producing pass.

    Example:
        >>> import torch.fx
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> require_meta("slice", gm, "fxprune.analysis", "fxprune.analyze")
        Traceback (most recent call last):
        ...
        fxprune.errors.PassOrderError: [slice] the graph has no 'fxprune.analysis' ...
    """
    value = gm.meta.get(key)
    if value is None:
        raise PassOrderError(pass_name, f"the graph has no {key!r} (run {producer} first)",
                             hint=f"run {producer} on this GraphModule before {pass_name}")
    return value


def copy_graph_module(gm: torch.fx.GraphModule, memo: dict | None = None
                      ) -> torch.fx.GraphModule:
    """Deep copy of a GraphModule including its node.meta and gm.meta (passes work on copies).
    ``memo`` is :func:`copy.deepcopy`'s: objects it maps are shared instead of copied."""
    import copy

    # the analysis holds nodes of this graph: deep-copying it would walk the whole node list
    # recursively. Passes look nodes up by name, so the copy shares the (read-only) analysis.
    analysis = gm.meta.pop(ANALYSIS_KEY, None)
    try:
        new = copy.deepcopy(gm, memo)
    finally:
        if analysis is not None:
            gm.meta[ANALYSIS_KEY] = analysis
    if analysis is not None:
        new.meta[ANALYSIS_KEY] = analysis
    return new


def tensor_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The concrete shape recorded by :func:`fxprune.trace` for a tensor-valued node."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None
