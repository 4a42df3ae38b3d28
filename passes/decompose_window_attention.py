"""``decompose-window-attention``: inline torchvision's opaque Swin helpers into plain ops.

``torch.fx`` keeps the functions torchvision registers with ``torch.fx.wrap`` as single opaque
``call_function`` nodes. This pass matches those nodes by the function object (never by a model
or module class name) and replaces each by the function's own code, traced with the node's
non-tensor arguments made concrete (window size, heads, shift, dropout, training flag) and its
tensor arguments kept as the existing graph nodes (see ``passes/_support/inline.py``). So:

* ``shifted_window_attention`` (Swin and Swin V2, cosine attention with ``logit_scale``) becomes
  pad / roll / window partition views, ``F.linear(x, <get_attr ...attn.qkv.weight>,
  <get_attr ...attn.qkv.bias>)``, ``reshape(B*nW, N, 3, heads, head_dim).permute(...)``,
  ``q @ k.transpose(-2, -1)`` (scaled), ``+ relative_position_bias``, the shift mask, softmax,
  ``@ v``, ``F.linear`` with the ``proj`` parameters, and the reverse partition / roll / crop.
* ``_get_relative_position_bias`` becomes ``table[index].view(N, N, -1).permute(2, 0, 1)
  .contiguous().unsqueeze(0)`` on the ``get_attr`` table and index.
* ``_patch_merging_pad`` and ``torchvision.ops.stochastic_depth`` (an identity when
  ``training=False`` or ``p=0``, so the node simply disappears) are inlined too
  (``Options.helpers``), and so are the functions timm registers as not traceable
  (:func:`library_leaf_functions`), which fxprune's trace keeps as leaves only where a plain
  trace fails (MViTv2's reshapes into pooled heads, for one).

Ops that are identities by their constant arguments (``F.pad`` by zeros, ``F.dropout`` with
``p=0`` or ``training=False``) are dropped. The Swin V2 qkv bias (a clone of ``qkv.bias`` whose
key third is zeroed in place) is rewritten to ``torch.cat([b[:C], zeros_like(b[C:2C]),
b[2C:]])`` so no in-place op is left for dead-code elimination to drop.

Batch size stays dynamic where the original graph allowed it; spatial sizes, window size and
shift are fixed to the traced ones (the function branches on them).

Not decomposed (the node is left as it is, with the reason in ``PassResult.info["refused"]``,
or :class:`DecomposeError` with ``Options(strict=True)``): calls whose tracing fails, e.g. a
tensor-valued ``window_size``/``num_heads``/``shift_size`` argument, or inputs without shape
metadata.

Example:
    >>> import torch, fxprune
    >>> from torchvision.models.swin_transformer import SwinTransformer
    >>> from fxprune.passes.decompose_window_attention import DecomposeWindowAttention
    >>> model = SwinTransformer([4, 4], 16, [2], [2], [4, 4]).eval()
    >>> gm = fxprune.trace(model, torch.randn(1, 3, 32, 32))
    >>> result = DecomposeWindowAttention()(gm)
    >>> sum("shifted_window_attention" in c.split(":")[1] for c in result.changes)
    2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.node import Node

from fxprune.errors import DecomposeError
from fxprune.meta import require_shapes
from fxprune.passbase import FxPass, PassResult

from ._support.fake_meta import copy_for_rewrite, refresh_meta
from ._support.inline import inline_call, replace_node
from ._support.linear_bias import normalize_linear_biases
from ._support.worlds import InlineError, WorldSet

__all__ = ["DecomposeWindowAttention", "DecomposeWindowAttentionOptions", "library_leaf_functions",
           "wrapped_functions"]


@dataclasses.dataclass(frozen=True)
class DecomposeWindowAttentionOptions:
    """``helpers``: also inline torchvision's ``_get_relative_position_bias``,
    ``_patch_merging_pad`` and ``stochastic_depth``. ``extra_functions``: further
    ``torch.fx.wrap``-ed library functions to inline (function objects). ``strict``: raise on a
    call that cannot be decomposed instead of recording it in ``info["refused"]``."""

    helpers: bool = True
    extra_functions: tuple[Callable[..., Any], ...] = ()
    strict: bool = False


def wrapped_functions(helpers: bool = True) -> dict[Callable[..., Any], str]:
    """The torchvision functions this pass inlines, mapped to a short label (empty without
    torchvision)."""
    try:
        from torchvision.models import swin_transformer as swin
        from torchvision.ops import stochastic_depth
    except Exception:  # noqa: BLE001 - torchvision absent or changed: nothing to match
        return {}
    table: dict[Callable[..., Any], str] = {}
    if hasattr(swin, "shifted_window_attention"):
        table[swin.shifted_window_attention] = "shifted_window_attention"
    if helpers:
        for name in ("_get_relative_position_bias", "_patch_merging_pad"):
            if hasattr(swin, name):
                table[getattr(swin, name)] = name
        if callable(stochastic_depth):
            table[stochastic_depth] = "stochastic_depth"
        table.update(library_leaf_functions())
    return table


def library_leaf_functions() -> dict[Callable[..., Any], str]:
    """Functions a model library asks torch.fx to keep as leaves (timm's
    ``register_notrace_function``: reshapes into and out of pooled heads, window reverses,
    relative-position terms). fxprune traces with them as leaves only when a plain trace
    fails; as leaves they are opaque to the analysis, so they are inlined like the
    torchvision helpers (a call that cannot be traced stays as it is, refused)."""
    try:
        from timm.layers import _fx as timm_fx  # type: ignore
    except Exception:  # noqa: BLE001 - timm absent or changed: nothing to match
        return {}
    return {fn: getattr(fn, "__name__", repr(fn))
            for fn in getattr(timm_fx, "_autowrap_functions", ()) if callable(fn)}


class DecomposeWindowAttention(FxPass):
    """Inline torchvision's wrapped Swin functions into plain ops (see the module docstring)."""

    name = "decompose-window-attention"
    Options = DecomposeWindowAttentionOptions

    def requires(self, gm: torch.fx.GraphModule) -> None:
        super().requires(gm)
        require_shapes(self.name, gm)

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        table = wrapped_functions(self.options.helpers)
        for fn in self.options.extra_functions:
            table.setdefault(fn, getattr(fn, "__name__", repr(fn)))
        if not any(n.op == "call_function" and _in(n.target, table) for n in gm.graph.nodes):
            return PassResult(gm, modified=False, changes=[], info={"refused": []})
        gm = copy_for_rewrite(gm)
        sites = [n for n in gm.graph.nodes if n.op == "call_function" and _in(n.target, table)]
        changes: list[str] = []
        refused: list[dict[str, str]] = []
        inlined: list[Node] = []
        worlds: WorldSet | None = None
        for node in sites:
            label = table[node.target]
            worlds = worlds or WorldSet(gm, self.name)
            name, target_desc = node.name, _describe(node)
            try:
                result = inline_call(gm, node, node.target, node.args, dict(node.kwargs),
                                     worlds=worlds, where=self.name)
            except InlineError as exc:
                reason = f"could not trace {label}: {exc}"
                if self.options.strict:
                    raise DecomposeError(self.name, reason, node=node,
                                         hint="make the call's non-tensor arguments constants, "
                                         "or run with strict=False to leave it opaque") from exc
                refused.append({"node": name, "target": label, "reason": reason})
                continue
            replace_node(node, result.outputs, worlds)
            inlined += result.nodes
            what = (f"{len(result.nodes)} plain nodes" if result.nodes
                    else "identity (removed)")
            changes.append(f"{name}: {label}{target_desc} -> {what} "
                           f"(dynamic sizes: {result.world_kind})")
        if changes:
            changes += normalize_linear_biases(gm, inlined)
            refresh_meta(gm, self.name)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=bool(changes), changes=changes,
                          info={"refused": refused})


def _in(target: Any, table: dict) -> bool:
    try:
        return target in table
    except TypeError:  # unhashable target
        return False


def _describe(node: Node) -> str:
    """The parameters a call reads, for the change record."""
    params = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    return f"({', '.join(params)})" if params else ""
