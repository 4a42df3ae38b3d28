"""``split-fused-heads``: give each part of a fused projection its own reshape.

timm, torchvision and most ViTs compute q, k and v with one Linear and separate them with
``reshape(B, N, 3, H, D) -> permute -> unbind``. That reshape forces q, k and v to keep the
same head dim; AMAP and ToaSt prune Q/K and V with separate masks. This pass rewrites the
pattern into one slice of the Linear output per part, each reshaped and permuted on its own,
which computes the same values and lets every part keep its own width.

Graph before and after::

    qkv -> reshape(B,N,3,H,D) -> permute(2,0,3,1,4) -> unbind(0) -> q, k, v
    qkv -> qkv[..., 0:C]  -> reshape(B,N,H,D) -> permute(0,2,1,3) -> q   (same for k, v)

Left unchanged: a part dim that is not the leading factor of the last input dim (e.g. a
head-major ``(B, N, H, 3, D)`` layout) or users other than permute/transpose/contiguous before
the parts are taken (no match); a ``-1`` on the part dim is reported in ``info["refused"]``.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32))
    >>> SplitFusedHeads()(gm).info["rewritten"]
    2
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from fxprune.analysis.layout import reshape_groups
from fxprune.meta import (
    ANALYSIS_FINGERPRINT_KEY,
    ANALYSIS_KEY,
    INPUT_SHAPES_KEY,
    SHAPE_PROP_KEY,
    traced_shape,
)
from fxprune.ops import op_name
from fxprune.passbase import FxPass, PassResult, copy_graph_module
from fxprune.shapes import example_zeros, propagate_shapes

VIEW_OPS = {"view", "reshape", "_unsafe_view", "unflatten"}
PERMUTE_OPS = {"permute", "transpose", "contiguous"}


@dataclasses.dataclass(frozen=True)
class SplitFusedHeadsOptions:
    max_parts: int = 4
    inplace: bool = False


def _perm_of(node, nd):
    name = op_name(node, None)
    if name == "contiguous":
        return list(range(nd))
    if name == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [int(d) % nd for d in dims]
    d0, d1 = int(node.args[1]) % nd, int(node.args[2]) % nd
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _chain_step(node, gm, p: int, nd: int):
    """For an op between the fused view and the part takers, with the part dim at ``p`` of an
    ``nd``-dim input: ``(build, p after, nd after)``, ``build(graph, x)`` adding the same op
    for one part (the part dim removed); None where the op is not a view of this kind."""
    name = op_name(node, gm)
    if name == "contiguous":  # kept: a view further on may need the part's memory dense
        return (lambda graph, x: graph.call_method("contiguous", (x,))), p, nd
    if name in PERMUTE_OPS:
        perm = _perm_of(node, nd)
        new_perm = [d - (d > p) for d in perm if d != p]
        return (lambda graph, x: graph.call_method("permute", (x, *new_perm))), \
            perm.index(p), nd
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int):  # squeeze() of every size-1 dim, or a list of dims
        return None
    if name == "unsqueeze":
        d = dim % (nd + 1)
        q = p + (d <= p)
        at = d - (d > q)
        return (lambda graph, x: graph.call_method("unsqueeze", (x, at))), q, nd + 1
    if name == "squeeze":
        d = dim % nd
        if d == p:
            return None
        at = d - (d > p)
        return (lambda graph, x: graph.call_method("squeeze", (x, at))), p - (d < p), nd - 1
    return None


class SplitFusedHeads(FxPass):
    name = "split-fused-heads"
    Options = SplitFusedHeadsOptions

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        out = gm if self.options.inplace else copy_graph_module(gm)
        changes, refused = [], []
        created: list = []    # new nodes, in creation order
        replaced: list = []   # (value of a removed part taker, the node now computing it)
        for node in list(out.graph.nodes):
            if node.op not in ("call_method", "call_function") or op_name(node, out) not in \
                    VIEW_OPS:
                continue
            reason = self._try(out, node, changes, created, replaced)
            if reason not in (None, "no match"):
                refused.append((node.name, reason))
        if changes:
            out.meta.pop(ANALYSIS_KEY, None)  # it describes the old graph
            out.meta.pop(ANALYSIS_FINGERPRINT_KEY, None)
            out.graph.eliminate_dead_code()  # ensures() recompiles
            shapes = out.meta.get(INPUT_SHAPES_KEY)
            if shapes and not local_meta_values(out, created, replaced):
                propagate_shapes(out, example_zeros(out), where=self.name)
        return PassResult(out, bool(changes), changes,
                          {"rewritten": len(changes), "refused": refused})

    def _try(self, gm, view, changes, created=None, replaced=None) -> str | None:
        src = view.args[0]
        in_shape, out_shape = traced_shape(src), traced_shape(view)
        if not in_shape or not out_shape or not isinstance(src, torch.fx.Node):
            return "no match"
        try:
            groups = reshape_groups(in_shape, out_shape)
        except ValueError:
            return "no match"
        last_in = len(in_shape) - 1
        grp = next((g for g in groups if g[0] == [last_in]), None)
        if grp is None or len(grp[1]) < 2:  # (parts, heads, dim) or (parts, width)
            return "no match"
        part_dim = grp[1][0]
        parts = out_shape[part_dim]
        if not 2 <= parts <= self.options.max_parts:
            return "no match"
        # follow permute/transpose/contiguous/unsqueeze/squeeze to where the parts are taken
        chain, cur, p, nd = [], view, part_dim, len(out_shape)
        while True:
            users = list(cur.users)
            if len(users) != 1 or users[0].args[:1] != (cur,):
                break
            step = _chain_step(users[0], gm, p, nd)
            if step is None:
                break
            chain.append(step[0])
            p, nd, cur = step[1], step[2], users[0]
        takers = self._takers(gm, cur, p, parts)
        if takers is None:
            return "no match"
        if op_name(view, gm) == "unflatten":
            rebuild = self._unflatten_without(view, len(in_shape), part_dim)
            if isinstance(rebuild, str):
                return rebuild
        else:
            args = list(view.args[1:])
            if len(args) == 1 and isinstance(args[0], (list, tuple)):
                args = list(args[0])
            if len(args) != len(out_shape) or (isinstance(args[part_dim], int) and
                                               args[part_dim] == -1):
                return "the part dim is given as -1 or the shape is not spelled per dim"
            new_args = [a for d, a in enumerate(args) if d != part_dim]

            def rebuild(graph, x):
                return graph.call_method("reshape", (x, *new_args))
        width = in_shape[-1] // parts
        for i in range(parts):
            with gm.graph.inserting_before(takers[i] if takers[i].op != "output" else cur):
                x = gm.graph.call_function(
                    operator.getitem, (src, (Ellipsis, slice(i * width, (i + 1) * width))))
                new = [x]
                x = rebuild(gm.graph, x)
                new.append(x)
                for build in chain:
                    x = build(gm.graph, x)
                    new.append(x)
            if created is not None:
                created.extend(new)
                replaced.append((takers[i].meta.get("val"), x))
            takers[i].replace_all_uses_with(x)
        for t in takers:
            gm.graph.erase_node(t)
        changes.append(f"{view.name}: {parts} parts of {src.name} reshaped separately")
        return None

    @staticmethod
    def _unflatten_without(view, ndim_in: int, part_dim: int):
        """For ``unflatten(src, dim, sizes)`` of src's last dim: a function building the same
        unflatten of one part (``sizes`` without the part entry), or why there is none."""
        dim = view.args[1] if len(view.args) > 1 else view.kwargs.get("dim")
        sizes = view.args[2] if len(view.args) > 2 else view.kwargs.get("sizes")
        if not isinstance(dim, int) or dim % ndim_in != ndim_in - 1 or \
                not isinstance(sizes, (list, tuple)):
            return "no match"
        at = part_dim - (ndim_in - 1)  # the part's position inside ``sizes``
        if not 0 <= at < len(sizes) or sizes[at] == -1:
            return "the part dim is given as -1 or the shape is not spelled per dim"
        rest = tuple(v for i, v in enumerate(sizes) if i != at)

        def rebuild(graph, x):
            return graph.call_method("unflatten", (x, -1, rest))
        return rebuild

    @staticmethod
    def _takers(gm, cur, p, parts):
        """One node per part whose value is that part (getitem of unbind, or cur[i])."""
        users = list(cur.users)
        if len(users) == 1 and op_name(users[0], gm) == "unbind":
            unbind = users[0]
            dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
            if dim % len(traced_shape(cur)) != p:
                return None
            got = {}
            for u in unbind.users:
                if op_name(u, gm) != "getitem" or not isinstance(u.args[1], int):
                    return None
                got.setdefault(u.args[1], []).append(u)
            if any(len(v) != 1 for v in got.values()):
                return None
            takers = [got[i][0] if i in got else None for i in range(parts)]
            if None in takers:
                return None
            return takers
        got = {}
        for u in users:
            name = op_name(u, gm)
            if name == "select" and len(u.args) == 3 and isinstance(u.args[2], int) and \
                    isinstance(u.args[1], int) and u.args[1] % len(traced_shape(cur)) == p:
                got.setdefault(u.args[2], []).append(u)
                continue
            if name != "getitem" or p != 0 or not isinstance(u.args[1], int):
                return None
            got.setdefault(u.args[1], []).append(u)
        if sorted(got) != list(range(parts)) or any(len(v) != 1 for v in got.values()):
            return None
        return [got[i][0] for i in range(parts)]


def _same_meta(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def local_meta_values(gm, created, replaced) -> bool:
    """``node.meta["val"]`` of the new nodes, computed from their inputs' values, instead of a
    shape propagation over the whole graph. Only where the whole graph's values come from
    the meta-tensor propagation (what the full one would run again), and only when each part's
    new value looks exactly like the one it replaces (shape, dtype, strides, offset): every
    other node then keeps the value the full propagation would give it. Returns False
    (propagate the whole graph) otherwise."""
    from torch.fx.node import map_arg
    from torch.utils._pytree import tree_leaves

    if gm.meta.get(SHAPE_PROP_KEY) != "meta" or any(
            isinstance(v, torch.Tensor) and v.device.type != "meta"
            for n in gm.graph.nodes for v in tree_leaves(n.meta.get("val"))):
        return False

    def val(a):
        if "val" not in a.meta:
            raise KeyError(a.name)
        return a.meta["val"]

    try:
        with torch.no_grad():
            for node in created:
                args = map_arg(node.args, val)
                kwargs = map_arg(node.kwargs, val)
                if node.op == "call_function":
                    node.meta["val"] = node.target(*args, **kwargs)
                else:
                    node.meta["val"] = getattr(args[0], node.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - whatever fails here, the full propagation handles
        return False
    return all(_same_meta(old, new.meta["val"]) for old, new in replaced)
