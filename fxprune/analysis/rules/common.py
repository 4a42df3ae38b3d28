"""Building blocks shared by the op rules: argument access, the elementwise rule, and the
fallback for ops the analysis does not understand (freeze what reaches them, report them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from fxprune.analysis.values import TV, shape_of, structure
from fxprune.ops import op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


def arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def dims_arg(args, nd):
    """Normalise permute-style varargs or a single sequence argument."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return [int(a) % nd if isinstance(a, int) else a for a in args]


def fold_constant(p: Propagator, node) -> None:
    """Integer index tensors computed from buffers (e.g. a relative-position index) are
    evaluated so that gathers through them can be followed exactly."""
    tensors = [a for a in node.all_input_nodes]
    if not tensors or not all(a in p.const for a in tensors):
        return
    try:
        args = torch.fx.node.map_arg(node.args, lambda a: p.const[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: p.const[a])
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - folding is an optimisation; failure means "unknown"
        return
    if isinstance(out, torch.Tensor) and not out.is_floating_point():
        p.const[node] = out


def unknown(p: Propagator, node, what: str) -> Any:
    for a in node.all_input_nodes:
        p.freeze(p.value(a), f"{what} is not understood by the analysis")
    if any(True for _ in labeled_inputs(node, p)):
        p.opaque.append((node, what))
    return p.unlabeled_like(node)


def labeled_inputs(node, p):
    for a in node.all_input_nodes:
        v = p.value(a)
        if isinstance(v, TV) and v.comps:
            yield v


def out_shape(node):
    return shape_of(node) or ()


def pointwise(p: Propagator, node) -> Any:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
            # e.g. native_dropout returns (out, mask)
            first = _pointwise_tensor(p, node, tuple(int(s) for s in val[0].shape))
            return [first] + [structure(v) for v in val[1:]]
        return structure(val)
    return _pointwise_tensor(p, node, tuple(int(s) for s in val.shape))


def _pointwise_tensor(p, node, shape):
    operands = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, torch.fx.Node):
            v = p.value(a)
            if isinstance(v, TV):
                operands.append(v)
    out = p.pointwise(operands, shape)
    keep_param = [v for v in operands if v.param is not None]
    name = op_name(node, p.gm)
    if len(operands) == 1 and keep_param and name in ("to", "contiguous", "clone", "detach",
                                                      "type", "float", "half", "bfloat16",
                                                      "_to_copy", "alias", "requires_grad_"):
        out.param = keep_param[0].param
    return out


def param_of_module(p, node, attr) -> TV | None:
    mod = p.gm.get_submodule(node.target)
    if getattr(mod, attr, None) is None:
        return None
    return p.param_value(f"{node.target}.{attr}")


def tie_across(p: Propagator, comp, dims, reason: str, others=()):
    """An op that mixes values along ``dims`` (softmax, a reduction, a norm) on a comp that
    also spans other dims: removing a channel exactly means removing its whole fibre along
    ``dims``, so the labels along them are tied (one channel per index of the other dims)
    and the comp continues over the other dims. A comp that lives on ``dims`` alone, a
    parameter's, or one whose other dims are spanned by ``others`` (the tensor's other comps:
    those dims are heads shared with other channels, as in channel attention's scores) is
    frozen with ``reason``; returns None then.

    Example: the per-path weights of a selective kernel, (B, paths, C) with a softmax over
    the paths, keep C prunable channels, each the pair of its per-path entries."""
    hit = [d for d in comp.span if d in dims]
    rest = tuple(d for d in comp.span if d not in dims)
    if not hit:
        return comp
    shared = {d for o in others if o is not comp and not o.soft for d in o.span}
    if comp.soft or not rest or set(rest) <= shared:
        p.store.freeze(comp.lab, reason)
        return None
    lab = comp.lab
    for d in hit:
        lab = p.store.collapse(lab, d)
    return comp.moved(lab, rest)
