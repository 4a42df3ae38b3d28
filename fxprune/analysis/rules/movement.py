"""Rules for ops that only rearrange positions: reshape/view/flatten and permute/transpose."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fxprune.analysis import layout
from fxprune.analysis.rules.common import arg, dims_arg, out_shape
from fxprune.analysis.rules.registry import rule
from fxprune.analysis.values import TV
from fxprune.ops import PERMUTE, RESHAPE, op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


@rule(*sorted(RESHAPE))
def reshape(p: Propagator, node) -> Any:
    """View-like reshape. A channel dim merged with a plain dim (heads folded into the batch,
    ``(B, h) -> B*h``) keeps its labels as copies along the merged dim: every position still
    knows its channel, so what the merged dim meets later is judged by the ops there (a
    depthwise conv shared by the folded heads ties channel ``j`` of every head)."""
    x = p.tv(node.args[0])
    shape_out = out_shape(node)
    if x is None:
        return p.plain(shape_out)
    comps = []
    for c in x.comps:
        try:
            nc, _mixed = layout.reshape_comp(c, x.shape, shape_out)
        except ValueError:
            p.store.freeze(c.lab, f"reshape {x.shape} -> {shape_out} cannot be aligned at "
                           f"{node.name}")
            continue
        comps.append(layout.drop_constant_dims(nc))
    return TV(comps, shape_out, x.soft, None)


def permute(p: Propagator, node, name) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.plain(out_shape(node))
    nd = x.ndim
    if name == "permute":
        perm = dims_arg(node.args[1:] or node.kwargs.get("dims"), nd)
    elif name == "t" or name == "numpy_T":
        perm = list(range(nd))[::-1]
    elif name == "mT":
        perm = list(range(nd - 2)) + [nd - 1, nd - 2]
    elif name == "movedim":
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d % nd] = s % nd
        rest = iter(d for d in range(nd) if d not in [s % nd for s in src])
        perm = [q if q is not None else next(rest) for q in perm]
    else:
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        perm = list(range(nd))
        d0, d1 = d0 % nd, d1 % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
    shape = tuple(x.shape[q] for q in perm)
    if x.param is not None:  # stay lazy: a transposed weight is usually contracted next
        param = (x.param[0], tuple(x.param[1][q] for q in perm))
        return TV(None, shape, x.soft, param,
                  lazy=lambda: [layout.permute_comp(c, perm) for c in x.comps])
    return TV([layout.permute_comp(c, perm) for c in x.comps], shape, x.soft)


@rule(*sorted(PERMUTE))
def _permute_rule(p: Propagator, node) -> Any:
    return permute(p, node, op_name(node))
