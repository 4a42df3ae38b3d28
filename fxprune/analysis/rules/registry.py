"""The rule registry: which function teaches the analysis an op.

A rule is ``rule_fn(propagator, node) -> value``: it reads its operands' channel values
(``propagator.value(arg)``), couples, contracts or freezes their labels, and returns the
channel value of the node. Rules register by op name (torch function, Tensor method or aten
overload, as :func:`fxprune.ops.op_name` names it) or by ``torch.nn`` module class. An op with
no rule freezes the channels that reach it and is reported as opaque: unknown means dense.

Example (teach fxprune an elementwise op of your own)::

    >>> import torch, fxprune
    >>> from fxprune.analysis.rules import register_rule, pointwise
    >>> def my_gelu(x):
    ...     return x * torch.sigmoid(1.702 * x)
    >>> _ = register_rule(my_gelu, pointwise)    # channels pass through unchanged
    >>> del FUNCTION_RULES[my_gelu]

A function of your own reaches the graph as one node when the trace keeps it as a leaf
(``torch.fx.wrap("my_gelu")`` at module level, as ``tests/analysis/test_rule_registry.py`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn as nn

from fxprune.analysis.rules.common import fold_constant, unknown
from fxprune.errors import InputError
from fxprune.ops import fetch_attr, op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator

log = logging.getLogger(__name__)

Rule = Callable[["Propagator", torch.fx.Node], Any]

#: op name (or, for a user's own function, the function object) -> rule
FUNCTION_RULES: dict[Any, Rule] = {}
#: (module class, rule), most recently registered first: a user's rule for a subclass wins
MODULE_RULES: list[tuple[type, Rule]] = []


def rule(*names: str, replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register the function as the rule of the ops ``names``.

    Example:
        >>> @rule("my_identity_op")
        ... def _identity(p, node):
        ...     return p.value(node.args[0])
        >>> FUNCTION_RULES["my_identity_op"] is _identity
        True
        >>> del FUNCTION_RULES["my_identity_op"]
    """
    def register(fn: Rule) -> Rule:
        for name in names:
            if name in FUNCTION_RULES and not replace and FUNCTION_RULES[name] is not fn:
                raise InputError("fxprune.register_rule", f"op {name!r} already has a rule "
                                 f"({FUNCTION_RULES[name].__qualname__})",
                                 hint="pass replace=True to override it")
            FUNCTION_RULES[name] = fn
        return fn
    return register


def module_rule(*classes: type, replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register the function as the rule of ``call_module`` nodes whose module is an
    instance of one of ``classes``."""
    def register(fn: Rule) -> Rule:
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise InputError("fxprune.register_rule", f"{cls!r} is not an nn.Module class")
            existing = [r for c, r in MODULE_RULES if c is cls]
            if existing and not replace and existing[0] is not fn:
                raise InputError("fxprune.register_rule", f"module class {cls.__name__} already "
                                 "has a rule", hint="pass replace=True to override it")
            MODULE_RULES[:] = [(c, r) for c, r in MODULE_RULES if c is not cls]
            MODULE_RULES.insert(0, (cls, fn))
        return fn
    return register


def register_rule(target: Any, fn: Rule, *, replace: bool = False) -> Rule:
    """Teach the analysis an op: ``target`` is an op name as :func:`fxprune.ops.op_name`
    gives it, a function of your own that the trace keeps as a leaf (``torch.fx.wrap``), or an
    ``nn.Module`` class; or a tuple of these.
    ``fn(propagator, node)`` returns the node's channel value; the building blocks exported by
    :mod:`fxprune.analysis.rules` (``pointwise``, ``unknown``, ``reshape``, ``linear``, ...)
    cover most ops. Registering a name that has a rule needs ``replace=True``."""
    targets = target if isinstance(target, tuple) else (target,)
    names = [t for t in targets if isinstance(t, str)
             or (callable(t) and not isinstance(t, type))]
    classes = [t for t in targets if isinstance(t, type)]
    if len(names) + len(classes) != len(targets) or not targets:
        raise InputError("fxprune.register_rule", f"target {target!r} is neither an op name "
                         "nor an nn.Module class")
    if names:
        rule(*names, replace=replace)(fn)
    if classes:
        module_rule(*classes, replace=replace)(fn)
    return fn


def module_rule_for(mod: nn.Module) -> Rule | None:
    for cls, fn in MODULE_RULES:
        if isinstance(mod, cls):
            return fn
    return None


def apply_rule(p: Propagator, node: torch.fx.Node) -> Any:
    """The channel value of ``node``: placeholders are unlabeled, parameters carry their own
    labels, the output freezes what reaches it, every other node goes to its rule."""
    if node.op == "placeholder":
        return p.unlabeled_like(node)
    if node.op == "get_attr":
        val = fetch_attr(p.gm, node.target)
        if isinstance(val, torch.Tensor):
            if not val.is_floating_point() and val.numel() < 4_000_000:
                p.const[node] = val
            return p.param_value(node.target)
        return None
    if node.op == "output":
        _freeze_outputs(p, node.args[0])
        return None
    if node.op == "call_module":
        mod = p.gm.get_submodule(node.target)
        fn = module_rule_for(mod)
        if fn is None:
            return unknown(p, node, f"module {type(mod).__name__}")
        return fn(p, node)
    user_rule = FUNCTION_RULES.get(node.target) if node.op == "call_function" else None
    if user_rule is not None:
        return user_rule(p, node)
    name = op_name(node, p.gm)
    fold_constant(p, node)
    if name is None:
        return unknown(p, node, f"function {getattr(node.target, '__name__', node.target)}")
    fn = FUNCTION_RULES.get(name)
    if fn is None:
        return unknown(p, node, f"op {name}")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: rule %s", node.format_node(), fn.__qualname__)
    return fn(p, node)


def _freeze_outputs(p: Propagator, arg) -> None:
    if isinstance(arg, torch.fx.Node):
        p.freeze(p.value(arg), "channels reach the model output")
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            _freeze_outputs(p, a)
    elif isinstance(arg, dict):
        for a in arg.values():
            _freeze_outputs(p, a)
