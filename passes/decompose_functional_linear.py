"""``decompose-functional-linear``: bring every functional Linear into one canonical form.

Canonical form (what the analysis reads)::

    F.linear(x, <get_attr W>, bias)        # positional arguments; bias is one of
        None
        <get_attr b>
        torch.cat([piece, ...])              # pieces: get_attr, a dim-0 slice of a get_attr
                                             # (getitem / aten.slice), zeros_like / full_like(0)
                                             # / zeros of any of those (kept, not materialized:
                                             # the pieces keep the parameters' names)

Rewrites (each is one entry of ``PassResult.changes``):

* ``torch.ops.aten.linear.default(x, W, b)`` and ``F.linear`` called with keyword arguments
  -> ``F.linear(x, W, b)``.
* ``aten.addmm(b, x2d, W.t())`` / ``aten.mm(x2d, W.t())`` (also ``torch.addmm``/``torch.mm``;
  ``W.t()`` as ``t``, ``transpose(0, 1)`` or ``permute(1, 0)`` of a 2-D ``get_attr``; ``beta``
  and ``alpha`` 1) -> ``F.linear(x2d, W, b)``; when ``x2d = view(x, (-1, K))`` only flattens the
  leading dims of ``x`` and the single user views the result back to ``(*lead, M)``, the views
  go too: ``F.linear(x, W, b)``.
* A bias made by zeroing slices of a clone of a parameter in place (torchvision Swin V2:
  ``b = qkv_bias.clone(); b[C:2C].zero_()``) -> ``torch.cat([b[:C], zeros_like(b[C:2C]),
  b[2C:]])``.

Every canonical Linear gets ``node.meta["fxprune.linear"] = {"weight": qualified name,
"bias": None | "opaque" | [(param name or None for zeros, start, stop, param_start), ...]}``:
``bias[start:stop] == param[param_start:param_start + stop - start]`` piece by piece.

Left alone and listed in ``PassResult.info["skipped"]`` as ``{"node", "reason"}``: a linear
whose weight is not a ``get_attr`` (computed or sliced weights), ``addmm``/``mm``/``bmm``/
``matmul`` nodes that read a parameter through a transpose but do not match the patterns above
(e.g. ``beta != 1``, batched ``bmm`` forms). A bias of any other form is kept as it is and
annotated ``"opaque"``. Idempotent: on a graph already in canonical form ``modified`` is False.

Example:
    >>> import torch, torch.nn.functional as F, fxprune
    >>> from fxprune.passes.decompose_functional_linear import DecomposeFunctionalLinear
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.randn(6, 4))
    ...     def forward(self, x):
    ...         return torch.ops.aten.linear.default(x, self.w)
    >>> gm = fxprune.trace(M(), torch.randn(2, 4))
    >>> result = DecomposeFunctionalLinear()(gm)
    >>> result.modified, DecomposeFunctionalLinear()(result.graph_module).modified
    (True, False)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import Node

from fxprune.meta import DECOMPOSED_FROM_KEY, LINEAR_KEY
from fxprune.passbase import FxPass, PassResult

from ._support.fake_meta import copy_for_rewrite, refresh_meta, require_shapes
from ._support.linear_bias import linear_parts, normalize_linear_biases

__all__ = ["DecomposeFunctionalLinear", "DecomposeFunctionalLinearOptions", "LINEAR_KEY"]

#: node.meta key with the parameter names a canonical Linear reads.

aten = torch.ops.aten
_ADDMM = {aten.addmm.default, torch.addmm}
_MM = {aten.mm.default, torch.mm}
_BMM = {aten.bmm.default, torch.bmm}
_OTHER_MATMUL = _BMM | {aten.matmul.default, torch.matmul, operator.matmul}
_EXPAND = {aten.expand.default}
_ADD = {aten.add.Tensor, operator.add, torch.add}
_VIEWS_FN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEWS_METHOD = {"view", "reshape"}
_CAT = {torch.cat, aten.cat.default, torch.concat, torch.concatenate}
_ZEROS_LIKE = {torch.zeros_like, aten.zeros_like.default}
_SLICE_FN = {aten.slice.Tensor}


@dataclasses.dataclass(frozen=True)
class DecomposeFunctionalLinearOptions:
    """``collapse_views``: fold the flatten/unflatten views around a rewritten ``addmm``/``mm``
    into the ``F.linear`` (it accepts any leading dims). ``annotate``: write
    ``node.meta["fxprune.linear"]`` on every canonical Linear."""

    collapse_views: bool = True
    annotate: bool = True


class DecomposeFunctionalLinear(FxPass):
    """Normalize functional Linears to ``F.linear(x, get_attr W, bias)`` (module docstring)."""

    name = "decompose-functional-linear"
    Options = DecomposeFunctionalLinearOptions

    def requires(self, gm: torch.fx.GraphModule) -> None:
        super().requires(gm)
        require_shapes(self.name, gm)

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        if any(_candidate(n) for n in gm.graph.nodes):
            gm = copy_for_rewrite(gm)  # rewrites work on a copy; annotations alone do not
        changes: list[str] = []
        skipped: list[dict[str, str]] = []
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased by an earlier rewrite
                continue
            if linear_parts(node) is not None:
                self._linear(gm, node, changes, skipped)
            elif node.op == "call_function" and node.target in (_ADDMM | _MM):
                self._addmm(gm, node, changes, skipped)
            elif node.op == "call_function" and node.target in _BMM and \
                    self._bmm(gm, node, changes):
                continue
            elif node.op == "call_function" and node.target in _OTHER_MATMUL:
                w = next((_untransposed(a) for a in node.args[:2] if isinstance(a, Node)
                          and _untransposed(a) is not None), None)
                if w is not None:
                    skipped.append({"node": node.name, "reason": f"{_fn_name(node.target)} "
                                    f"with the transposed parameter {w.target!r} is not a "
                                    "Linear pattern this pass rewrites"})
        changes += normalize_linear_biases(gm)
        if changes:
            refresh_meta(gm, self.name)
            gm.graph.lint()
            gm.recompile()
        if self.options.annotate:  # after refresh_meta: bias pieces are sized from meta["val"]
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target is F.linear:
                    _annotate(node)
        return PassResult(gm, modified=bool(changes), changes=changes,
                          info={"skipped": skipped})

    # -- F.linear / aten.linear -----------------------------------------------------------
    def _linear(self, gm, node: Node, changes, skipped) -> None:
        x, w, b = linear_parts(node)
        if not (isinstance(w, Node) and w.op == "get_attr"):
            what = w.format_node() if isinstance(w, Node) else repr(w)
            skipped.append({"node": node.name,
                            "reason": f"weight is not a get_attr parameter ({what})"})
            return
        if node.target is F.linear and not node.kwargs:
            return  # canonical already
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.linear, (x, w, b) if b is not None else (x, w))
        _move(node, new)
        changes.append(f"{node.name}: {_fn_name(node.target)}"
                       f"{'(kwargs)' if node.kwargs else ''} -> F.linear(x, {w.target}"
                       f"{', bias' if b is not None else ''})")
        gm.graph.erase_node(node)

    # -- addmm / mm ---------------------------------------------------------------------------
    def _addmm(self, gm, node: Node, changes, skipped) -> None:
        is_addmm = node.target in _ADDMM
        args = list(node.args)
        if is_addmm:
            if len(args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) \
                    or set(node.kwargs) - {"beta", "alpha"}:
                if any(isinstance(a, Node) and _untransposed(a) is not None for a in args):
                    skipped.append({"node": node.name,
                                    "reason": "addmm with beta/alpha != 1 or extra arguments"})
                return
            bias, mat1, mat2 = args
        else:
            if len(args) != 2 or node.kwargs:
                return
            bias, (mat1, mat2) = None, args
        w = _untransposed(mat2) if isinstance(mat2, Node) else None
        if w is None:
            if isinstance(mat1, Node) and _untransposed(mat1) is not None:
                skipped.append({"node": node.name, "reason": "the parameter is the left "
                                "operand (x @ W.t() expected)"})
            return
        out_features = int(_shape(w)[0]) if _shape(w) else None
        bshape = _shape(bias) if isinstance(bias, Node) else None
        if bias is not None and (bshape is None or list(bshape) != [out_features]):
            skipped.append({"node": node.name, "reason": f"addmm bias of shape {bshape} is not "
                            f"a ({out_features},) vector"})
            return
        x, replaced = mat1, node
        collapsed = False
        if self.options.collapse_views:
            src, back = _collapsible(mat1, node, out_features)
            if src is not None:
                x, replaced, collapsed = src, back, True
        with gm.graph.inserting_before(replaced):
            new = gm.graph.call_function(F.linear, (x, w, bias) if bias is not None else (x, w))
        _move(replaced, new)
        erase = [replaced] + ([node] if collapsed else [])
        for n in erase:
            gm.graph.erase_node(n)
        for n in (mat1, mat2):  # the flatten view and the transpose, when now unused
            if isinstance(n, Node) and not n.users and n.op != "get_attr" and \
                    n.op != "placeholder":
                gm.graph.erase_node(n)
        changes.append(f"{node.name}: {_fn_name(node.target)}(… , {w.target}.t()) -> "
                       f"F.linear(x, {w.target}{', bias' if bias is not None else ''})"
                       + (" (flatten/unflatten views folded)" if collapsed else ""))


    # -- bmm with a broadcast transposed weight (torch.export decompositions) ---------------
    def _bmm(self, gm, node: Node, changes) -> bool:
        """``view(bmm(view(expand(x)), view(expand(W.t(), (b, K, M)))), (*lead, M))``
        [``+ b``] -> ``F.linear(x, W[, b])``."""
        if len(node.args) != 2 or node.kwargs or len(node.users) != 1:
            return False
        a, bm = node.args
        w = _broadcast_weight(bm) if isinstance(bm, Node) else None
        x = _flattened_input(a) if isinstance(a, Node) else None
        if w is None or x is None:
            return False
        back = next(iter(node.users))
        unflat = _view_target(back)
        xs, bs = _shape(x), _shape(back)
        m = _shape(w)[0]
        if unflat is None or xs is None or bs is None or list(bs) != list(xs[:-1]) + [m]:
            return False
        replaced, bias = back, None
        if len(back.users) == 1:
            add = next(iter(back.users))
            other = add.args[1] if len(add.args) == 2 and add.args[0] is back else None
            if add.op == "call_function" and add.target in _ADD and not add.kwargs and \
                    isinstance(other, Node) and other.op == "get_attr" and \
                    _shape(other) == (m,):
                replaced, bias = add, other
        with gm.graph.inserting_before(replaced):
            new = gm.graph.call_function(F.linear, (x, w, bias) if bias is not None else (x, w))
        _move(replaced, new)
        dead = [replaced] + ([back] if replaced is not back else []) + [node]
        for n in dead:
            gm.graph.erase_node(n)
        _erase_unused_chain(gm, [a, bm])
        changes.append(f"{node.name}: bmm(x, broadcast {w.target}.t()) -> F.linear(x, "
                       f"{w.target}{', ' + bias.target if bias is not None else ''})")
        return True


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _candidate(node: Node) -> bool:
    """A node some rewrite of this pass may apply to."""
    if node.op == "call_method":
        return node.target == "zero_"
    if node.op != "call_function":
        return False
    if node.target is F.linear:
        return bool(node.kwargs)
    return node.target is aten.linear.default or node.target in (_ADDMM | _MM | _BMM)


def _fn_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except Exception:  # noqa: BLE001 - symbolic sizes
            return None
    return None


def _move(old: Node, new: Node) -> None:
    for k in ("nn_module_stack", "stack_trace", DECOMPOSED_FROM_KEY):
        if k in old.meta:
            new.meta[k] = old.meta[k]
    new.meta.setdefault(DECOMPOSED_FROM_KEY, old.name)
    old.replace_all_uses_with(new)


def _untransposed(node: Node) -> Node | None:
    """``W`` when ``node`` is ``W.t()`` (any spelling) of a 2-D ``get_attr`` ``W``."""
    src = None
    if node.op == "call_function":
        if node.target in (aten.t.default, torch.t) and len(node.args) == 1:
            src = node.args[0]
        elif node.target in (aten.permute.default, torch.permute) and len(node.args) == 2 \
                and list(node.args[1]) in ([1, 0], [-1, -2], [-1, 0], [1, -2]):
            src = node.args[0]
        elif node.target in (aten.transpose.int, torch.transpose) and len(node.args) == 3 \
                and {node.args[1] % 2, node.args[2] % 2} == {0, 1}:
            src = node.args[0]
        elif node.target is getattr and node.args[1] in ("T", "mT"):
            src = node.args[0]
    elif node.op == "call_method":
        if node.target == "t" and len(node.args) == 1:
            src = node.args[0]
        elif node.target == "permute" and [a for a in node.args[1:]] in ([1, 0], [[1, 0]]):
            src = node.args[0]
        elif node.target == "transpose" and len(node.args) == 3 \
                and {node.args[1] % 2, node.args[2] % 2} == {0, 1}:
            src = node.args[0]
    if isinstance(src, Node) and src.op == "get_attr" and _shape(src) is not None \
            and len(_shape(src)) == 2:
        return src
    return None


def _view_target(node: Node) -> tuple[Node, list[Any]] | None:
    if node.op == "call_function" and node.target in _VIEWS_FN and len(node.args) >= 2:
        shape = node.args[1] if len(node.args) == 2 else node.args[1:]
        return node.args[0], list(shape) if isinstance(shape, (list, tuple)) else [shape]
    if node.op == "call_method" and node.target in _VIEWS_METHOD and len(node.args) >= 2:
        shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        return node.args[0], list(shape)
    return None


def _collapsible(mat1: Any, mm: Node, out_features: int | None
                 ) -> tuple[Node | None, Node | None]:
    """``(x, back)`` when ``mat1 = view(x, (P, K))`` flattens x's leading dims and the only
    user of ``mm`` is ``back = view(mm, (*lead, M))`` restoring them."""
    if not isinstance(mat1, Node) or out_features is None:
        return None, None
    flat = _view_target(mat1)
    if flat is None or not isinstance(flat[0], Node) or len(mm.users) != 1:
        return None, None
    x = flat[0]
    back = next(iter(mm.users))
    unflat = _view_target(back)
    xs, ms, bs = _shape(x), _shape(mat1), _shape(back)
    if unflat is None or unflat[0] is not mm or xs is None or ms is None or bs is None:
        return None, None
    if len(xs) < 2 or len(ms) != 2 or ms[1] != xs[-1] or ms[0] != math.prod(xs[:-1]):
        return None, None
    if list(bs) != list(xs[:-1]) + [out_features]:
        return None, None
    return x, back


def _param_slice(node: Node) -> tuple[str, int, int] | None:
    """``(name, start, stop)`` when ``node`` is a get_attr or a dim-0 slice of one."""
    if node.op == "get_attr":
        s = _shape(node)
        return (node.target, 0, s[0]) if s and len(s) == 1 else None
    src, rng = None, None
    if node.op == "call_function" and node.target is operator.getitem:
        src, index = node.args
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if isinstance(index, slice) and index.step in (None, 1):
            rng = (index.start, index.stop)
    elif node.op == "call_function" and node.target in _SLICE_FN:
        a = list(node.args) + [None] * (4 - len(node.args))
        if a[1] in (0, None) and (len(node.args) < 5 or node.args[4] == 1):
            src, rng = a[0], (a[2], a[3])
    if not isinstance(src, Node) or src.op != "get_attr" or rng is None:
        return None
    s = _shape(src)
    if not s or len(s) != 1:
        return None
    if any(isinstance(v, Node) for v in rng):
        return None
    start, stop, _ = slice(*rng).indices(s[0])
    return src.target, start, stop


def _bias_pieces(bias: Any) -> Any:
    if bias is None:
        return None
    if not isinstance(bias, Node):
        return "opaque"
    single = _param_slice(bias)
    if single is not None:
        name, a, b = single
        return [(name, 0, b - a, a)]
    if bias.op == "call_function" and bias.target in _CAT:
        items = bias.args[0] if bias.args else bias.kwargs.get("tensors")
        dim = bias.args[1] if len(bias.args) > 1 else bias.kwargs.get("dim", 0)
        if dim not in (0, -1) or not isinstance(items, (list, tuple)):
            return "opaque"
        pieces, pos = [], 0
        for item in items:
            s = _shape(item)
            if not isinstance(item, Node) or not s or len(s) != 1:
                return "opaque"
            ps = _param_slice(item)
            if ps is not None:
                pieces.append((ps[0], pos, pos + s[0], ps[1]))
            elif _is_zeros(item):
                pieces.append((None, pos, pos + s[0], 0))
            else:
                return "opaque"
            pos += s[0]
        return pieces
    return "opaque"


def _is_zeros(node: Node) -> bool:
    if node.op == "call_function":
        if node.target in _ZEROS_LIKE:
            return True
        if node.target in (aten.full_like.default, torch.full_like):
            return len(node.args) > 1 and node.args[1] == 0
        if node.target in (torch.zeros, aten.zeros.default):
            return True
    if node.op == "call_method" and node.target == "new_zeros":
        return True
    return False


def _annotate(node: Node) -> None:
    _, w, b = linear_parts(node)
    if isinstance(w, Node) and w.op == "get_attr":
        node.meta[LINEAR_KEY] = {"weight": w.target, "bias": _bias_pieces(b)}


def _broadcast_weight(node: Node) -> Node | None:
    """W when node is ``[view](expand(W.t(), (b, K, M)), (b, K, M))``."""
    v = _view_target(node)
    if v is not None:
        if _shape(v[0]) != _shape(node):
            return None
        node = v[0]
    if not (node.op == "call_function" and node.target in _EXPAND and isinstance(node.args[0],
                                                                                    Node)):
        return None
    w = _untransposed(node.args[0])
    s, ws = _shape(node), _shape(w) if w is not None else None
    if w is None or s is None or len(s) != 3 or ws is None or tuple(s[1:]) != (ws[1], ws[0]):
        return None
    return w


def _flattened_input(node: Node) -> Node | None:
    """x when node is ``view([expand](x, x.shape), (b, n, K))`` with the same elements."""
    v = _view_target(node)
    if v is None or not isinstance(v[0], Node):
        return None
    x = v[0]
    if x.op == "call_function" and x.target in _EXPAND and isinstance(x.args[0], Node) and \
            _shape(x.args[0]) == _shape(x):
        x = x.args[0]
    xs, ns = _shape(x), _shape(node)
    if xs is None or ns is None or len(ns) != 3 or xs[-1] != ns[-1] or \
            math.prod(xs) != math.prod(ns):
        return None
    return x


def _erase_unused_chain(gm, roots: list[Any]) -> None:
    stack = [r for r in roots if isinstance(r, Node)]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("get_attr", "placeholder", "output") or n.graph is not gm.graph:
            continue
        if n.op == "call_function" and n.is_impure():
            continue
        ins = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        stack.extend(ins)
