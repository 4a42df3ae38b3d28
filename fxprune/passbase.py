"""The pass contract: ``requires -> run -> ensures``, options in a frozen dataclass, a stable
kebab-case ``name``, and a :class:`PassResult` that says what changed. Passes are torch
passes (:class:`torch.fx.passes.infra.pass_base.PassBase`), so torch's ``PassManager`` runs
them too.

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
from torch.fx.passes.infra import pass_base as torch_pass_base

from fxprune.errors import FxPruneError, PassOrderError
from fxprune.meta import ANALYSIS_KEY


class PassResult(torch_pass_base.PassResult):
    """What a pass returns: the (possibly new) GraphModule, whether it changed, a list of
    human-readable change records (one per rewrite) and pass-specific ``info``.

    It is a :class:`torch.fx.passes.infra.pass_base.PassResult` (the named tuple
    ``(graph_module, modified)``) with ``changes`` and ``info`` added, so torch's
    :class:`~torch.fx.passes.infra.pass_manager.PassManager` runs fxprune passes as they are.

    Example:
        >>> import torch.fx
        >>> gm, modified = PassResult(torch.fx.symbolic_trace(torch.nn.ReLU()), False, ["x"])
        >>> modified
        False
    """

    def __new__(cls, graph_module: torch.fx.GraphModule, modified: bool,
                changes: list[str] | None = None, info: dict[str, Any] | None = None
                ) -> PassResult:
        self = super().__new__(cls, graph_module, modified)
        self.changes = list(changes) if changes is not None else []
        self.info = dict(info) if info is not None else {}
        return self

    def __repr__(self) -> str:
        return (f"PassResult(modified={self.modified}, changes={len(self.changes)}"
                + (f", info={list(self.info)}" if self.info else "") + ")")


class FxPass(torch_pass_base.PassBase):
    """Base class of fxprune passes: a :class:`torch.fx.passes.infra.pass_base.PassBase`.

    Subclasses set ``name`` (stable, kebab-case) and ``Options`` (a frozen dataclass) and
    implement :meth:`run` (torch's :meth:`call` runs it). :meth:`requires` checks
    preconditions and raises :class:`PassOrderError` naming the pass to run first;
    :meth:`ensures` checks the result (by default: the graph lints and, when the pass changed
    something, the module recompiles; :meth:`run` need not recompile itself).
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
    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise PassOrderError(self.name, "expected a torch.fx.GraphModule, got "
                                 f"{type(graph_module).__name__}",
                                 hint="call fxprune.trace(model, example_inputs) first")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        """torch's name for :meth:`run`."""
        return self.run(graph_module)

    def ensures(self, graph_module: torch.fx.GraphModule,
                result: PassResult | None = None) -> None:
        """Check the graph the pass returned (``result`` says whether it changed; without it,
        as torch's ``PassBase`` calls it, the graph is checked as changed)."""
        changed = result is None or result.modified or bool(result.changes)
        try:
            graph_module.graph.lint()
            if changed:  # an unchanged module's code is current
                graph_module.recompile()
        except Exception as exc:  # a broken graph is a bug in the pass: say which one
            raise FxPruneError(self.name, f"pass left an invalid graph: {exc}",
                               hint="report this as an fxprune bug with the model") from exc

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult:
        # PassBase.__call__ checks the graph it was given; a pass that copies returns another
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module, result)
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


def copy_graph_module(gm: torch.fx.GraphModule, memo: dict | None = None,
                      share_tensors: bool = False) -> torch.fx.GraphModule:
    """Deep copy of a GraphModule including its node.meta and gm.meta (passes work on copies).
    ``memo`` is :func:`copy.deepcopy`'s: objects it maps are shared instead of copied. With
    ``share_tensors`` the copy's parameters and buffers are ``gm``'s own tensors (for a pass
    that replaces tensors, as slicing does, rather than writing into them).

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
        >>> copy_graph_module(gm, share_tensors=True).weight is gm.weight
        True
    """
    import copy

    if share_tensors:
        memo = dict(memo or {})
        memo.update((id(t), t) for _, t in gm.named_parameters(remove_duplicate=False))
        memo.update((id(t), t) for _, t in gm.named_buffers(remove_duplicate=False))

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

