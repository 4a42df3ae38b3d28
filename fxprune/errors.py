"""Typed errors. Every error names the pass (or entry point) and, where there is one, the node.

Example:
    >>> from fxprune.errors import FxPruneError
    >>> issubclass(TraceError, FxPruneError)
    True
"""

from __future__ import annotations

import torch.fx


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose.

    ``where`` is the pass name or public function, ``node`` the fx node involved (optional),
    ``hint`` what the user can do about it.
    """

    def __init__(self, where: str, message: str, *, node: torch.fx.Node | None = None,
                 hint: str | None = None):
        self.where = where
        self.node = node
        self.hint = hint
        text = f"[{where}] {message}"
        if node is not None:
            try:
                text += f"\n  at node: {node.format_node()}"
            except Exception:  # format_node can fail on half-built graphs; the name still helps
                text += f"\n  at node: {node.name}"
        if hint:
            text += f"\n  what to do: {hint}"
        super().__init__(text)


class InputError(FxPruneError, ValueError):
    """Bad arguments: not a module, wrong example inputs, out-of-range options."""


class TraceError(FxPruneError):
    """The model could not be turned into a GraphModule with shapes."""


class AnalysisError(FxPruneError):
    """The analysis met something it cannot represent at all (not a refusal: refusals are
    recorded as frozen groups)."""


class DecomposeError(FxPruneError):
    """A decompose pass met an input it does not support (raised with ``strict=True``; by
    default the node is left alone and the reason recorded in ``PassResult.info["refused"]``)."""


class PassOrderError(FxPruneError):
    """A pass was run before the pass it depends on."""


class PlanError(FxPruneError, ValueError):
    """A pruning plan (masks, kept counts, targets) is invalid for the analysed graph."""


class SliceError(FxPruneError):
    """Slicing could not produce an exact smaller graph."""


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for a reason quoted inside another message.

    Example:
        >>> first_line(ValueError("bad shape" + chr(10) + "more detail"))
        'ValueError: bad shape'
    """
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
