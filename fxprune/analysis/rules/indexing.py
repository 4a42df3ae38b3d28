"""Op rules that move channels without computing with them: indexing, splitting, joining,
(un)squeezing, expanding and repeating, and ops that shift positions along a dim (roll, pad,
flip).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from fxprune.analysis import layout
from fxprune.analysis.labels import Comp
from fxprune.analysis.rules.common import arg, dims_arg, pointwise, unknown
from fxprune.analysis.rules.movement import permute
from fxprune.analysis.rules.registry import rule
from fxprune.analysis.values import TV, align_ndim, shape_of
from fxprune.ops import op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


@rule("getitem", "index")
def _getitem(p: Propagator, node) -> Any:
    src, idx = node.args[0], node.args[1]
    v = p.value(src)
    if isinstance(v, list):
        return v[idx] if isinstance(idx, int) else v[idx]
    if not isinstance(v, TV):
        return p.unlabeled_like(node)
    if isinstance(idx, list) and op_name(node, None) == "index":
        # aten.index(x, [i0, i1, ...]): one index per leading dim, None taking the whole dim
        idx = tuple(slice(None) if i is None else i for i in idx)
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (v.ndim - n_real))
        else:
            expanded.append(i)
    comps = list(v.comps)
    dim = 0
    shape = list(v.shape)
    for i in expanded:
        if i is None:
            comps = [layout.unsqueeze_comp(c, dim) for c in comps]
            shape.insert(dim, 1)
            dim += 1
            continue
        if isinstance(i, torch.fx.Node):
            val = p.const.get(i)
            if val is None:
                for c in comps:
                    if dim in c.span:
                        p.store.freeze(c.lab, f"channels gathered by a run-time index at "
                                       f"{node.name}")
                ishape = shape_of(i) or ()
                comps = [layout.take_comp(c, dim, np.zeros(ishape, np.int64)) if dim not in
                         c.span else layout.take_comp(Comp(np.take(c.lab, [0], axis=dim), tuple(
                             d for d in c.span if d != dim), c.soft), dim,
                             np.zeros(ishape, np.int64)) for c in comps]
                shape[dim:dim + 1] = list(ishape)
                dim += len(ishape)
                continue
            i = val.numpy() if val.dtype != torch.bool else np.nonzero(val.numpy())[0]
        if isinstance(i, (list, tuple)):
            i = np.asarray(i)
        if isinstance(i, slice):
            # bounds computed from shapes (e.g. D // 2) are concrete ints in the metadata
            i = slice(*(_int_value(x) for x in (i.start, i.stop, i.step)))
            comps = [layout.take_comp(c, dim, i) for c in comps]
            shape[dim] = len(range(*i.indices(shape[dim])))
            dim += 1
        elif isinstance(i, (int, np.integer)):
            comps = [layout.take_comp(c, dim, int(i)) for c in comps]
            shape.pop(dim)
        else:
            arr = np.asarray(i)
            comps = [layout.take_comp(c, dim, arr) for c in comps]
            shape[dim:dim + 1] = list(arr.shape)
            dim += arr.ndim
    return TV([c for c in comps], shape_of(node) or tuple(shape), v.soft)


def _int_value(x):
    if isinstance(x, torch.fx.Node):
        val = x.meta.get("val")
        return int(val) if isinstance(val, int) else None
    return x


def _split_like(p: Propagator, node, name) -> Any:
    x = p.tv(node.args[0])
    val = node.meta.get("val")
    if x is None or not isinstance(val, (list, tuple)):
        return p.unlabeled_like(node)
    if name == "unbind":
        dim = arg(node, 1, "dim", 0) % x.ndim
        return [TV([layout.take_comp(c, dim, i) for c in x.comps],
                   tuple(int(s) for s in val[i].shape), x.soft) for i in range(len(val))]
    dim_default = 0
    dim = arg(node, 2, "dim", dim_default) % x.ndim
    sizes = [int(t.shape[dim]) for t in val]
    out, start = [], 0
    for t, size in zip(val, sizes):
        comps = [layout.take_comp(c, dim, slice(start, start + size)) for c in x.comps]
        out.append(TV(comps, tuple(int(s) for s in t.shape), x.soft))
        start += size
    return out


def _narrow_like(p: Propagator, node, name) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    if name == "select":
        dim, index = node.args[1] % x.ndim, node.args[2]
        return TV([layout.take_comp(c, dim, int(index) % x.shape[dim]) for c in x.comps],
                  shape_of(node), x.soft)
    if name == "narrow":
        dim, start, length = node.args[1] % x.ndim, node.args[2], node.args[3]
        sl = slice(start, start + length)
    else:  # aten.slice(x, dim, start, end, step)
        args = list(node.args) + [None] * 5
        dim = (args[1] or 0) % x.ndim
        sl = slice(args[2], args[3], args[4] or 1)
    if any(isinstance(s, torch.fx.Node) for s in (sl.start, sl.stop)):
        for c in x.comps:
            if dim in c.span:
                p.store.freeze(c.lab, f"channels sliced with run-time bounds at {node.name}")
        return TV([c for c in x.comps if dim not in c.span], shape_of(node), x.soft)
    return TV([layout.take_comp(c, dim, sl) for c in x.comps], shape_of(node), x.soft)


@rule("cat", "concat", "concatenate")
def _cat(p: Propagator, node, stack=False) -> Any:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = arg(node, 1, "dim", 0)
    out_shape = shape_of(node)
    if isinstance(tensors, torch.fx.Node):  # one node holding the list, e.g. x.chunk(2)
        held, metas = p.value(tensors), tensors.meta.get("val")
        if not (isinstance(held, (list, tuple)) and isinstance(metas, (list, tuple))
                and len(held) == len(metas)):
            return unknown(p, node, "cat/stack of a value fxprune cannot see as a list")
        vals = [v if isinstance(v, TV) else TV([], tuple(m.shape)) for v, m in zip(held, metas)]
    else:
        vals = [p.tv(t) or TV([], shape_of(t) or ()) for t in tensors]
    if stack:
        vals = [TV([layout.unsqueeze_comp(c, dim % (v.ndim + 1)) for c in v.comps],
                   v.shape[:dim % (v.ndim + 1)] + (1,) + v.shape[dim % (v.ndim + 1):], v.soft)
                for v in vals]
    nd = len(out_shape)
    dim %= nd
    soft = all(v.soft for v in vals)
    along = [[c for c in v.comps if dim in c.span] for v in vals]
    if any(along):
        # channels concatenated along their own dim (e.g. q, k, v biases): labels concatenate
        if all(len(a) == 1 for a in along) and len({a[0].span for a in along}) == 1:
            lab = np.concatenate([np.broadcast_to(a[0].lab, _bshape(a[0], v)) for a, v in
                                  zip(along, vals)], axis=dim)
            rest = [c for v in vals for c in v.comps if dim not in c.span]
            base = TV([Comp(lab, along[0][0].span, soft)] + rest, out_shape, soft)
            return TV(p.merge_comps(base.comps), out_shape, soft)
        for a in along:
            for c in a:
                p.store.freeze(c.lab, f"channels concatenated with unlabeled values at "
                               f"{node.name}")
        return p.plain(out_shape)
    shape_wo = list(out_shape)
    shape_wo[dim] = 1
    parts = [TV(v.comps, tuple(s if d != dim else 1 for d, s in enumerate(v.shape)), v.soft)
             for v in vals]
    merged = p.pointwise(parts, tuple(shape_wo))
    return TV(merged.comps, out_shape, soft)


def _bshape(c: Comp, v: TV):
    return tuple(v.shape[d] if d in c.span else 1 for d in range(v.ndim))


@rule("unsqueeze")
def _unsqueeze(p, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    dim = arg(node, 1, "dim") % (x.ndim + 1)
    return TV([layout.unsqueeze_comp(c, dim) for c in x.comps], shape_of(node), x.soft, None)


@rule("squeeze")
def _squeeze(p, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    dims = arg(node, 1, "dim")
    if dims is None:
        dims = [d for d, s in enumerate(x.shape) if s == 1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % x.ndim for d in dims if x.shape[d % x.ndim] == 1]
    return TV([layout.squeeze_comp(c, dims) for c in x.comps], shape_of(node), x.soft, None)


@rule("expand", "expand_as", "broadcast_to")
def _expand(p, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    out = align_ndim(x, len(shape_of(node)))
    return TV(out.comps, shape_of(node), x.soft)


@rule("repeat")
def _repeat(p, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    reps = dims_arg(node.args[1:], 10**9)
    out = align_ndim(x, len(reps))
    comps = []
    for c in out.comps:
        tile = [r if d in c.span else 1 for d, r in enumerate(reps)]
        comps.append(Comp(np.tile(c.lab, tile), c.span, c.soft))
    return TV(comps, shape_of(node), x.soft)


def along_dims(p, node, dims, what) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    dims = {d % x.ndim for d in dims}
    for c in x.comps:
        if set(c.span) & dims:
            p.store.freeze(c.lab, f"{what} along channels at {node.name}")
    return TV([c for c in x.comps if not set(c.span) & dims], shape_of(node), x.soft)


@rule("roll")
def _roll(p, node) -> Any:
    dims = arg(node, 2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return along_dims(p, node, dims or range(len(shape_of(node))), "roll")


@rule("pad")
def _pad(p, node) -> Any:
    pad = arg(node, 1, "pad")
    nd = len(shape_of(node))
    dims = [nd - 1 - i // 2 for i in range(len(pad)) if not (isinstance(pad[i], int)
                                                          and pad[i] == 0)]
    return along_dims(p, node, dims, "padding")


@rule("flip")
def _flip(p, node) -> Any:
    dims = arg(node, 1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    return along_dims(p, node, dims, "flip")


@rule("repeat_interleave")
def _repeat_interleave(p, node) -> Any:
    """``x.repeat_interleave(r, dim)``: every position along ``dim`` repeated ``r`` times in
    place, as ``expand`` + ``reshape`` would (grouped-query attention's k/v heads)."""
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    reps = arg(node, 1, "repeats")
    dim = arg(node, 2, "dim")
    if not isinstance(reps, int) or not isinstance(dim, int):
        return unknown(p, node, "repeat_interleave with tensor repeats or without dim")
    dim %= x.ndim
    comps = [Comp(np.repeat(c.lab, reps, axis=dim), c.span, c.soft) if dim in c.span else c
             for c in x.comps]
    return TV(comps, shape_of(node), x.soft)


@rule("getattr")
def _getattr(p, node) -> Any:
    attr = node.args[1]
    if attr in ("T", "H"):  # every dim reversed
        return permute(p, node, "t")
    if attr in ("mT", "mH"):  # the last two dims swapped (a batched matrix transpose)
        return permute(p, node, "mT")
    return None if not isinstance(node.meta.get("val"), torch.Tensor) else pointwise(
        p, node)


@rule("unbind", "split", "split_with_sizes", "chunk", "tensor_split")
def _split_rule(p: Propagator, node) -> Any:
    kind = {"unbind": "unbind", "chunk": "chunk"}.get(op_name(node), "split")
    return _split_like(p, node, kind)


@rule("select", "narrow", "slice")
def _narrow_rule(p: Propagator, node) -> Any:
    return _narrow_like(p, node, op_name(node))


@rule("stack")
def _stack(p: Propagator, node) -> Any:
    return _cat(p, node, stack=True)


def _pool_rule(spatial: int):
    def pool(p, node) -> Any:
        x = p.tv(node.args[0]) if node.args else None
        if x is None:
            return p.unlabeled_like(node)
        # the functional pools act on the trailing ``spatial`` dims (batch dim optional)
        return along_dims(p, node, range(x.ndim - spatial, x.ndim), "pooling")
    return pool


for _k in (1, 2, 3):
    rule(f"avg_pool{_k}d", f"max_pool{_k}d", f"adaptive_avg_pool{_k}d",
         f"_adaptive_avg_pool{_k}d", f"adaptive_max_pool{_k}d",
         f"lp_pool{_k}d")(_pool_rule(_k))


@rule("unfold")
def _unfold(p, node) -> Any:
    """``x.unfold(dim, size, step)``: windows along ``dim`` (a new last dim of ``size``);
    channels on other dims pass through. ``F.unfold`` (im2col) mixes channels with kernel
    positions in one dim: not understood."""
    if node.op == "call_function" and node.target is torch.nn.functional.unfold:
        return unknown(p, node, "function unfold (im2col)")
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    dim = arg(node, 1, "dimension") % x.ndim
    comps = []
    for c in x.comps:
        if dim in c.span:
            p.store.freeze(c.lab, f"unfold along channels at {node.name}")
            continue
        comps.append(Comp(c.lab.reshape(c.lab.shape + (1,)), c.span, c.soft))
    return TV(comps, shape_of(node), x.soft)
