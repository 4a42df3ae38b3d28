"""Graph fingerprints: an analysis is only valid for the graph it was computed on.

:func:`fxprune.analyze` records :func:`graph_fingerprint` of the graph it read in
``gm.meta["fxprune.analysis_fingerprint"]``; every pass that reads the analysis checks it
(:func:`check_current`) so that a pass run in between (a user's rewrite) makes them refuse
instead of slicing a graph the analysis no longer describes. Passes that edit the graph in a
way the analysis accounts for (insert-gates, insert-indicators) re-stamp it with
:func:`keep_analysis_current`.

The fingerprint covers the graph's structure (ops, targets, constant arguments, how nodes are
wired) and the shapes of the parameters and modules it uses, not parameter values: training
the weights keeps an analysis valid, a rewrite does not.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> gm = fxprune.trace(m, torch.randn(2, 4)); _ = fxprune.analyze(gm)
    >>> check_current(gm, "slice")       # unchanged: fine
    >>> act = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    >>> with gm.graph.inserting_after(act):
    ...     neg = gm.graph.call_function(torch.neg, (act,))
    >>> _ = act.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
    >>> check_current(gm, "slice")
    Traceback (most recent call last):
    ...
    fxprune.errors.PassOrderError: [slice] the graph changed after analyze: ...
"""

from __future__ import annotations

import hashlib

import torch
import torch.fx

from fxprune.errors import PassOrderError
from fxprune.meta import ANALYSIS_FINGERPRINT_KEY, ANALYSIS_KEY


def _name_of(obj) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{module}.{name}" if name else repr(obj)


def _text(value, index: dict) -> str:
    """A stable text for an fx argument (nodes by position, callables by qualified name)."""
    if isinstance(value, torch.fx.Node):
        return f"%{index.get(value, '?')}"
    if isinstance(value, (tuple, list)):
        inner = ",".join(_text(v, index) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v, index)}" for k, v in sorted(
            value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}{value.dtype}"
    if callable(value) and not isinstance(value, type):
        return _name_of(value)
    return repr(value)


def _target_text(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        shapes = [(n, tuple(t.shape)) for n, t in mod.named_parameters()]
        shapes += [(n, tuple(t.shape)) for n, t in mod.named_buffers()]
        return f"{node.target}:{type(mod).__qualname__}:{shapes}"
    if node.op == "get_attr":
        obj = gm
        try:
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return f"{node.target}:missing"
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__qualname__
        return f"{node.target}:{shape}"
    if node.op in ("call_function",):
        return _name_of(node.target)
    return str(node.target)


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """A hash of ``gm``'s graph structure and parameter shapes (not their values).

    Example:
        >>> import torch, fxprune
        >>> gm = fxprune.trace(torch.nn.Linear(4, 2), torch.randn(3, 4))
        >>> graph_fingerprint(gm) == graph_fingerprint(fxprune.trace(torch.nn.Linear(4, 2),
        ...                                                          torch.randn(3, 4)))
        True
    """
    digest = hashlib.sha256()
    index: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        line = (f"{node.op}|{_target_text(gm, node)}|{_text(node.args, index)}|"
                f"{_text(node.kwargs, index)}\n")
        digest.update(line.encode())
    return digest.hexdigest()[:24]


def keep_analysis_current(gm: torch.fx.GraphModule) -> None:
    """Declare that the analysis on ``gm`` still describes its graph after an edit.

    For passes whose edits the analysis accounts for (gates or indicators in front of a
    group's sinks); any other edit must be followed by ``fxprune.analyze`` instead."""
    if gm.meta.get(ANALYSIS_KEY) is not None:
        gm.meta[ANALYSIS_FINGERPRINT_KEY] = graph_fingerprint(gm)


def check_current(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Raise :class:`PassOrderError` naming ``pass_name`` when ``gm``'s graph is not the one
    its analysis was computed on (or was last declared current for)."""
    analysis = gm.meta.get(ANALYSIS_KEY)
    stamp = gm.meta.get(ANALYSIS_FINGERPRINT_KEY, getattr(analysis, "fingerprint", None))
    now = graph_fingerprint(gm)
    if stamp != now:
        raise PassOrderError(
            pass_name, "the graph changed after analyze: run fxprune.analyze again",
            hint=f"a pass run between fxprune.analyze and {pass_name} rewrote the graph, so "
            "the analysis no longer describes it; call fxprune.analyze(gm) after your own "
            "passes and before insert-gates / slice (a pass that keeps the analysis valid "
            "calls fxprune.analysis.fingerprint.keep_analysis_current(gm))")
