"""Rules for ops that mix values across a dim: reductions, softmax and the norms
(LayerNorm, RMSNorm, GroupNorm, BatchNorm, F.normalize). Over channels they freeze them,
except zero-safe reductions over all of a group's channels, which are sinks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from fxprune.analysis import layout
from fxprune.analysis.labels import Comp
from fxprune.analysis.rules.common import arg, out_shape, pointwise, tie_across, unknown
from fxprune.analysis.rules.registry import rule
from fxprune.analysis.values import TV, Sink
from fxprune.ops import REDUCE, SOFTMAX, op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


# reductions with an order argument before ``dim``: (input, p/ord, dim, keepdim)
_NORMS = {"norm", "linalg_vector_norm", "linalg_norm"}


def _reduce_args(node, name):
    """``(dims, keepdim, order)`` of a reduction node, whatever the call form."""
    if name in _NORMS:
        order = arg(node, 1, "ord" if name != "norm" else "p", None)
        return arg(node, 2, "dim"), bool(arg(node, 3, "keepdim", False)), order
    if name in ("var", "std", "var_mean", "std_mean") and len(node.args) > 3:
        return node.args[1], bool(node.args[3]), None
    return arg(node, 1, "dim"), bool(arg(node, 2, "keepdim", False)), None


def _zero_safe(name: str, order) -> bool:
    """A reduction whose result ignores entries that are exactly zero: masking its input
    equals removing those entries (sum, p-norms with p > 0; a mean too, as the slicer keeps
    its original divisor: see ``fxprune.slicing``)."""
    if name in ("sum", "nansum", "mean"):
        return True
    if name in _NORMS:
        if order is None or order == "fro":
            return True
        return isinstance(order, (int, float)) and order > 0
    return False


def reduce(p: Propagator, node, name) -> Any:
    """Reductions. One over all of a comp's channel dims that ignores zeros (a sum, a norm, as
    in focused linear attention's norm over all channels; a mean, whose divisor the slicer
    keeps, as in RMSNorm's mean of squares) is a sink: gating its input equals removing the
    channels. Any other reduction over channels freezes them."""
    x = p.tv(node.args[0])
    val = node.meta.get("val")
    if x is None:
        return p.unlabeled_like(node)
    dims, keepdim, order = _reduce_args(node, name)
    if isinstance(dims, torch.fx.Node) or isinstance(order, torch.fx.Node):
        return pointwise(p, node)  # torch.max(a, b) and friends are elementwise
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % x.ndim for d in dims)
    comps = []
    for c in x.comps:
        if set(c.span) & set(dims):
            # a mean is a sink only where its shape is known: the slicer rescales it by the
            # counts, and a later shift by it is only seen with its size-1 dims
            safe = _zero_safe(name, order) and (name != "mean" or isinstance(val, torch.Tensor))
            if not x.soft and set(c.span) <= set(dims) and safe:
                p.sinks.append(Sink(node, 0, c, "reduce"))
                continue
            c = tie_across(p, c, set(dims), f"{name} reduces over channels at {node.name}",
                           x.comps)
            if c is None or x.soft:
                continue
        comps.append(c if keepdim else layout.squeeze_comp(
            Comp(c.lab, c.span, c.soft), dims))
    if isinstance(val, (tuple, list)):  # max/min with dim return (values, indices)
        shape = tuple(int(s) for s in val[0].shape)
        return [TV(comps, shape, x.soft), TV(list(comps), shape, x.soft)]
    return TV(comps, out_shape(node), x.soft)


@rule(*sorted(SOFTMAX))
def softmax(p: Propagator, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.plain(out_shape(node))
    dim = arg(node, 1, "dim")
    if dim is None:
        dim = x.ndim - 1
    return softmax_over(p, node, x, dim % x.ndim)


def softmax_over(p: Propagator, node, x: TV, dim: int) -> TV:
    """Softmax along ``dim``: channels there are frozen, unless they also span other dims
    (then each channel is a whole fibre along ``dim``: :func:`tie_across`)."""
    comps = []
    for c in x.comps:
        tied = tie_across(p, c, {dim}, f"softmax over channels at {node.name}", x.comps)
        comps.append(c if tied is None else tied)
    return TV(comps, x.shape, x.soft)


def normalize(p: Propagator, node, x_arg, norm_dims, weight, bias, what) -> Any:
    x = p.tv(x_arg)
    shape = out_shape(node) if isinstance(node.meta.get("val"), torch.Tensor) else (
        x.shape if x else ())
    if x is None:
        return p.plain(shape)
    nd = x.ndim
    norm_dims = {d % nd for d in norm_dims}
    for c in x.comps:
        if set(c.span) & norm_dims:
            p.store.freeze(c.lab, f"{what} normalizes over these channels at {node.name}")
    operands = [x] + [w for w in (weight, bias) if isinstance(w, TV)]
    out = p.pointwise(operands, x.shape)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):  # native_layer_norm returns (out, mean, rstd)
        return [out] + [p.plain(tuple(int(s) for s in v.shape)) for v in val[1:]]
    return out


# -- normalisation ------------------------------------------------------------------------
@rule("normalize")
def _lp_normalize_fn(p: Propagator, node) -> Any:
    """``F.normalize(x, p, dim)`` = ``x / max(|x|_p over dim, eps)``: the norm is a reduction
    over ``dim`` (a sink when it covers all of a comp's channel dims and ``p > 0``, a freeze
    otherwise, as for any reduction), the division is elementwise."""
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 2.0)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
    if not isinstance(dim, int) or not isinstance(order, (int, float)):
        return unknown(p, node, "normalize with a non-constant p or dim")
    dim %= x.ndim
    for c in x.comps:
        if dim not in c.span:
            continue
        if not x.soft and set(c.span) <= {dim} and order > 0:
            p.sinks.append(Sink(node, 0, c, "reduce"))
        else:
            p.store.freeze(c.lab, f"normalize (p={order:g}) over channels at {node.name}")
    return TV(list(x.comps), x.shape, x.soft)


@rule("layer_norm", "native_layer_norm")
def _layer_norm_fn(p: Propagator, node) -> Any:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    return normalize(p, node, node.args[0], range(-k, 0), p.tv(w), p.tv(b), "LayerNorm")


@rule("rms_norm")
def _rms_norm_fn(p: Propagator, node) -> Any:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    return normalize(p, node, node.args[0], range(-k, 0), p.tv(w), None, "RMSNorm")


@rule("group_norm")
def _group_norm_fn(p: Propagator, node) -> Any:
    return normalize(p, node, node.args[0], [1], None, None, "GroupNorm")


@rule("batch_norm", "_native_batch_norm_legit_no_training")
def _batch_norm_fn(p: Propagator, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    extra = x.ndim - 2
    operands = [x]
    # the per-channel tensors (weight, bias, running stats), positional or by keyword
    per_channel = list(node.args[1:5]) + [node.kwargs.get(k) for k in (
        "running_mean", "running_var", "weight", "bias")]
    for a in per_channel:
        t = p.tv(a) if isinstance(a, torch.fx.Node) else None
        if t is not None:
            operands.append(TV([Comp(c.lab.reshape((1,) + c.lab.shape + (1,) * extra),
                                     tuple(d + 1 for d in c.span), True) for c in t.comps],
                               (1,) + t.shape + (1,) * extra, True))
    out = p.pointwise(operands, x.shape)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [out] + [p.plain(tuple(int(s) for s in v.shape)) for v in val[1:]
                        if isinstance(v, torch.Tensor)]
    return out


@rule(*sorted(REDUCE))
def _reduce_rule(p: Propagator, node) -> Any:
    return reduce(p, node, op_name(node))
