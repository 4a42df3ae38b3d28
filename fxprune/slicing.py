"""Slicing machinery: from kept channels per group to a physically smaller graph.

Given the analysis and, for every pruned group, a boolean ``keep[h, i]`` over its layout, the
keep decision of every label follows (channels by their group, head-only labels such as a
relative-position-bias column by whether their head keeps anything). Every parameter is then
sliced by its label masks, and every constant that spells a channel size in the graph (view and
reshape sizes, split sizes, slice bounds, SDPA's implicit scale) is rewritten.

Example:
    >>> import numpy as np
    >>> sizes_from_mask(np.array([[True, False, True], [False, True, True]]))
    [2, 2]
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.errors import PlanError, SliceError
from fxprune.meta import COMPS_KEY, SHAPE_KEY
from fxprune.ops import attr_owner


def label_keep(analysis, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Boolean keep flag per label."""
    comps = analysis.components
    n_ch = int(comps.channel.max()) + 1 if comps.n_labels else 0
    kept_channel = np.ones(n_ch, dtype=bool)
    in_group = np.zeros(n_ch, dtype=bool)
    for gi, mask in keep.items():
        g = analysis.groups[gi]
        mask = np.asarray(mask, dtype=bool).reshape(g.layout.shape)
        if g.frozen is not None and not mask.all():
            raise PlanError("slice", f"group {gi} ({g.kind}) is frozen: {g.frozen}",
                            hint="leave frozen groups dense")
        kept_channel[g.layout] = False
        kept_channel[g.layout[mask]] = True
        in_group[g.layout] = True
    for g in analysis.groups:
        if g.kind != "heads":
            in_group[g.layout] = True
    lab_keep = kept_channel[comps.channel]
    # labels outside every group (e.g. per-head bias entries) follow their head
    lab_in_group = in_group[comps.channel]
    head = comps.head
    n_head = int(head.max()) + 1 if head.size else 0
    head_has_group = np.zeros(n_head, dtype=bool)
    head_has_group[head[lab_in_group]] = True
    head_kept = np.zeros(n_head, dtype=bool)
    head_kept[head[lab_in_group & lab_keep]] = True
    outside = ~lab_in_group
    lab_keep[outside] = ~head_has_group[head[outside]] | head_kept[head[outside]]
    return lab_keep


def sizes_from_mask(mask: np.ndarray) -> list[int]:
    """Sizes of the tensor that keeps the ``True`` entries of ``mask``.

    Going from the innermost dim outwards, every non-empty line along a dim must keep the same
    count (so heads may keep different indices but not different counts); that dim then
    collapses to "line kept at all" and the next dim is checked the same way.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        return []
    per_dim = [len(k) for k in kept_per_dim(mask)]
    if math.prod(per_dim) == int(mask.sum()):  # a product of per-dim index sets (the usual case)
        return per_dim
    for d in [mask.ndim - 1] + list(range(mask.ndim - 2, -1, -1)):
        lines = np.moveaxis(mask, d, -1).reshape(-1, mask.shape[d])
        counts = lines.sum(axis=1)
        nonzero = counts[counts > 0]
        if nonzero.size and (nonzero == nonzero[0]).all():
            rest = sizes_from_mask(mask.any(axis=d))
            return rest[:d] + [int(nonzero[0])] + rest[d:]
        if not nonzero.size:
            return [0] * mask.ndim
    raise SliceError("slice", f"kept entries of a {mask.shape} tensor do not form a dense "
                     "tensor (parts or heads keep different counts)",
                     hint="keep the same count in every head (sync-head-ranks); fused "
                     "projections whose parts keep different widths need the "
                     "split-fused-heads pass first")


def kept_per_dim(mask: np.ndarray) -> list[np.ndarray]:
    """Per dim, the indices where ``mask`` keeps anything; ``mask`` keeps exactly their
    product when it holds the product of their lengths."""
    return [np.nonzero(mask.any(axis=tuple(o for o in range(mask.ndim) if o != d)))[0]
            for d in range(mask.ndim)]


def slice_tensor(t: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Keep the ``True`` entries of ``mask`` (broadcast to ``t``), preserving row-major order."""
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), t.shape)
    if mask.all():
        return t
    kept = kept_per_dim(mask)
    if math.prod(len(k) for k in kept) == int(mask.sum()):  # a product: cheap gathers
        out = t.detach()
        for d, idx in enumerate(kept):
            if len(idx) < t.shape[d]:
                out = out.index_select(d, torch.as_tensor(idx, device=t.device))
        return out.contiguous()
    sizes = sizes_from_mask(mask)  # raises where the kept entries form no dense tensor
    flat = torch.from_numpy(np.array(mask)).to(t.device)
    return t.detach()[flat].reshape(sizes).clone()


def comp_mask(lab_keep: np.ndarray, comps_meta, ndim: int) -> np.ndarray | None:
    """Keep mask of a value from its comps (AND of the comps), or None when nothing changes."""
    mask = None
    for lab, _span in comps_meta:
        m = lab_keep[lab]
        if m.all():
            continue
        m = m.reshape((1,) * (ndim - m.ndim) + m.shape) if m.ndim < ndim else m
        mask = m if mask is None else (mask & m)
    return mask


def new_shape(node: torch.fx.Node, lab_keep: np.ndarray, meta=None, shape=None):
    """Shape of ``node``'s tensor after slicing (None when unchanged)."""
    meta = node.meta.get(COMPS_KEY) if meta is None else meta
    shape = node.meta.get(SHAPE_KEY) if shape is None else shape
    if not isinstance(meta, list) or not meta or shape is None:
        return None
    if not all(isinstance(e, tuple) for e in meta):
        return None
    mask = comp_mask(lab_keep, meta, len(shape))
    if mask is None:
        return None
    sizes = sizes_from_mask(mask)
    out = list(shape)
    for d, s in enumerate(mask.shape):
        if s > 1:
            out[d] = sizes[d]
    return tuple(out)


def param_mask(analysis, name: str, lab_keep: np.ndarray) -> np.ndarray:
    """Keep mask of parameter/buffer ``name``: the AND of its comps' kept labels."""
    shape = analysis.param_shapes[name]
    mask = np.ones(shape, dtype=bool)
    for c in analysis.param_comps[name]:
        mask &= np.broadcast_to(lab_keep[c.lab].reshape(c.lab.shape), shape)
    return mask


def param_masks(analysis, lab_keep: np.ndarray) -> dict[str, np.ndarray]:
    """Keep mask per parameter/buffer name for every one that loses entries."""
    out = {}
    for name, comps in analysis.param_comps.items():
        if all(lab_keep[c.lab].all() for c in comps):  # nothing of it is dropped: no mask
            continue
        mask = param_mask(analysis, name, lab_keep)
        if not mask.all():
            out[name] = mask
    return out


def plan_from_masks(masks: dict[str, np.ndarray]) -> dict[str, dict[int, torch.Tensor]]:
    """The public plan (``gm.meta["fxprune.plan"]``): parameter name -> {dim: kept indices}."""
    plan = {}
    for name, mask in masks.items():
        plan[name] = {d: torch.as_tensor(kept, dtype=torch.long)
                      for d, kept in enumerate(kept_per_dim(mask)) if len(kept) < mask.shape[d]}
    return plan


def _set_attr(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf = attr_owner(gm, name)
    old = getattr(owner, leaf)
    if isinstance(value, nn.Parameter):
        setattr(owner, leaf, value)
    elif isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    elif leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def _fix_module_attrs(gm: nn.Module) -> None:
    for mod in gm.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            # a depthwise conv may have several outputs per input channel (a multiplier); a
            # grouped one keeps its groups (each keeps the same count), even at one channel
            multiplier = max(1, mod.out_channels // mod.groups)
            depthwise = 1 < mod.groups == mod.in_channels
            mod.out_channels = mod.weight.shape[0]
            if depthwise:
                mod.groups = mod.in_channels = mod.out_channels // multiplier
            else:
                mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and mod.weight is not None:
            mod.num_features = mod.weight.shape[0]


RESHAPE_OPS = {"view", "reshape", "_unsafe_view", "expand", "broadcast_to", "unflatten"}


def rewrite_constants(gm: torch.fx.GraphModule, analysis, lab_keep: np.ndarray,
                      changes: list[str]) -> None:
    """Rewrite every constant in the graph that spells a pruned channel size."""
    from fxprune.ops import op_name

    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        name = op_name(node, gm)
        if name in RESHAPE_OPS:
            _rewrite_shape_args(node, name, lab_keep, changes)
        elif name in ("split", "split_with_sizes", "chunk", "tensor_split"):
            _rewrite_split(gm, node, name, lab_keep, changes)
        elif name == "getitem":
            _rewrite_slices(node, lab_keep, changes)
        elif name in ("narrow", "slice"):
            _rewrite_narrow(node, name, lab_keep, changes)
        elif name in ("conv1d", "conv2d", "conv3d", "convolution"):
            _rewrite_conv_groups(node, name, lab_keep, changes)
        elif name == "mean":
            _rescale_mean(gm, node, lab_keep, changes)
    for node in list(gm.graph.nodes):
        # every SDPA, site or not (q or k may come from parameters only): its implicit scale
        # 1/sqrt(head dim) must stay the original one
        if node.op != "call_function" or "scaled_dot_product_attention" not in str(node.target):
            continue
        if "scale" in node.kwargs or len(node.args) > 6:
            continue
        q = node.args[0] if node.args else node.kwargs.get("query")
        q_old = q.meta.get(SHAPE_KEY) if isinstance(q, torch.fx.Node) else None
        q_new = new_shape(q, lab_keep) if q_old else None
        if q_new is not None and q_new[-1] != q_old[-1]:
            scale = 1.0 / math.sqrt(q_old[-1])
            node.kwargs = {**node.kwargs, "scale": scale}
            changes.append(f"{node.name}: pass the original scale {scale:.6g} explicitly (q/k "
                           "head dim changed)")


def _rescale_mean(gm, node, lab_keep, changes) -> None:
    """A mean over channels that lose entries keeps dividing by the ORIGINAL count: the masked
    model averages zeros in their place (RMSNorm's ``x.pow(2).mean(channels)``), so the sliced
    mean is scaled by ``kept / original``."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node) or len(node.users) == 0:
        return
    old, new = x.meta.get(SHAPE_KEY), new_shape(x, lab_keep)
    if old is None or new is None:
        return
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    dims = range(len(old)) if not dims else [d % len(old) for d in dims]
    before, after = math.prod(old[d] for d in dims), math.prod(new[d] for d in dims)
    if before == after:
        return
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(torch.mul, (node, after / before))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    scaled.meta.update({k: v for k, v in node.meta.items() if k != "stack_trace"})
    changes.append(f"{node.name}: mean over {after} of {before} entries, scaled by "
                   f"{after}/{before} (the masked model averages zeros in their place)")


def _rewrite_conv_groups(node, name, lab_keep, changes) -> None:
    """A functional depthwise convolution (exported graphs call ``aten.conv2d`` with
    ``groups`` as a constant) keeps one group per remaining channel."""
    index = 8 if name == "convolution" else 6
    groups = node.args[index] if len(node.args) > index else node.kwargs.get("groups")
    x = node.args[0] if node.args else None
    if not isinstance(groups, int) or groups <= 1 or not isinstance(x, torch.fx.Node):
        return
    old, new = x.meta.get(SHAPE_KEY), new_shape(x, lab_keep)
    if old is None or new is None or len(old) < 2 or groups != old[1] or new[1] == old[1]:
        return
    if len(node.args) > index:
        node.args = node.args[:index] + (new[1],) + node.args[index + 1:]
    else:
        node.kwargs = {**node.kwargs, "groups": new[1]}
    changes.append(f"{node.name}: depthwise groups {groups} -> {new[1]}")


def _rewrite_shape_args(node, name, lab_keep, changes) -> None:
    shape_new = new_shape(node, lab_keep)
    if shape_new is None:
        return
    old = node.meta[SHAPE_KEY]
    if name == "unflatten":
        dim = node.args[1]
        sizes = list(node.args[2])
        dim %= len(old) - len(sizes) + 1
        new_sizes = [shape_new[dim + i] if sizes[i] != -1 else -1 for i in range(len(sizes))]
        node.args = (node.args[0], node.args[1], tuple(new_sizes)) + tuple(node.args[3:])
        changes.append(f"{node.name}: unflatten sizes {sizes} -> {new_sizes}")
        return
    args = list(node.args[1:])
    packed = len(args) == 1 and isinstance(args[0], (list, tuple))
    if "size" in node.kwargs or "shape" in node.kwargs:
        key = "size" if "size" in node.kwargs else "shape"
        seq = list(node.kwargs[key])
    else:
        seq = list(args[0]) if packed else args
    if len(seq) != len(old):
        return
    changed = False
    for d, (o, n) in enumerate(zip(old, shape_new)):
        if o != n and not (isinstance(seq[d], int) and seq[d] == -1):
            # a size computed in the graph (``B * heads`` with heads folded into the batch)
            # becomes -1, so the batch size stays free; one -1 at most
            if isinstance(seq[d], torch.fx.Node):
                if any(isinstance(e, int) and e == -1 for e in seq):
                    raise SliceError("slice", f"the {name} size {d} is computed in the graph "
                                     f"({seq[d].name}) and changes from {o} to {n}, and another "
                                     "size is already -1", node=node,
                                     hint="keep whole heads (prune channels within heads) "
                                     "for this attention")
                seq[d] = -1
            else:
                seq[d] = int(n)
            changed = True
    if not changed:
        return
    if "size" in node.kwargs or "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, key: type(node.kwargs[key])(seq)}
    elif packed:
        node.args = (node.args[0], type(args[0])(seq))
    else:
        node.args = (node.args[0], *seq)
    changes.append(f"{node.name}: {name} sizes {list(old)} -> {list(shape_new)}")


def _input_keep_mask(node, lab_keep, dim):
    """The keep mask of ``node``'s input (one entry per element), or None where the input has
    no channel components or is not split along ``dim``."""
    src = node.args[0]
    meta = src.meta.get(COMPS_KEY)
    shape = src.meta.get(SHAPE_KEY)
    if not isinstance(meta, list) or shape is None or not all(isinstance(e, tuple) for e in meta):
        return None
    mask = comp_mask(lab_keep, meta, len(shape))
    if mask is None or mask.shape[dim] == 1:
        return None
    return mask


def _input_mask_along(node, lab_keep, dim):
    mask = _input_keep_mask(node, lab_keep, dim)
    if mask is None:
        return None
    other = tuple(o for o in range(mask.ndim) if o != dim)
    return mask.any(axis=other) if other else mask


def _input_lines_along(node, lab_keep, dim):
    """The keep mask of ``node``'s input as lines along ``dim``: (lines, size)."""
    mask = _input_keep_mask(node, lab_keep, dim)
    if mask is None:
        return None
    return np.moveaxis(mask, dim, -1).reshape(-1, mask.shape[dim])


def _rewrite_split(gm, node, name, lab_keep, changes) -> None:
    shape = node.args[0].meta.get(SHAPE_KEY)
    if shape is None:
        return
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= len(shape)
    lines = _input_lines_along(node, lab_keep, dim)
    if lines is None:
        return
    outs = node.meta.get("val")
    old_sizes = [int(t.shape[dim]) for t in outs]
    new_sizes, start = [], 0
    for s in old_sizes:
        # per line (e.g. per head: the split is inside each head), the count each part keeps;
        # heads keep different indices but the same counts
        counts = lines[:, start:start + s].sum(axis=1)
        counts = np.unique(counts[lines.any(axis=1)])
        if len(counts) > 1:
            raise SliceError("slice", f"the parts of this {name} keep different counts in "
                             f"different heads ({counts.tolist()})", node=node)
        new_sizes.append(int(counts[0]) if len(counts) else 0)
        start += s
    if any(s == 0 for s in new_sizes):
        raise SliceError("slice", "a split part would become empty", node=node)
    if name == "chunk" and len(set(new_sizes)) == 1:
        return
    node.target = torch.split
    node.op = "call_function"
    node.args = (node.args[0], new_sizes, dim)
    node.kwargs = {}
    changes.append(f"{node.name}: {name} sizes {old_sizes} -> {new_sizes}")


def _remap_bound(along, b, size):
    if b is None:
        return None
    b = b + size if b < 0 else b
    return int(along[:max(0, min(b, size))].sum())


def _rewrite_slices(node, lab_keep, changes) -> None:
    idx = node.args[1]
    if not isinstance(node.args[0], torch.fx.Node) or not isinstance(
            node.args[0].meta.get("val"), torch.Tensor):
        return
    idx_t = idx if isinstance(idx, tuple) else (idx,)
    shape = node.args[0].meta.get(SHAPE_KEY)
    if shape is None:
        return
    n_real = sum(1 for i in idx_t if i is not None and i is not Ellipsis)
    new, dim, changed = [], 0, False
    for i in idx_t:
        if i is Ellipsis:
            new.append(i)
            dim += len(shape) - n_real
            continue
        if i is None:
            new.append(i)
            continue
        if isinstance(i, slice) and all(isinstance(b, (int, type(None))) for b in
                                        (i.start, i.stop)) and i.step in (None, 1):
            along = _input_mask_along(node, lab_keep, dim)
            if along is not None:
                ni = slice(_remap_bound(along, i.start, shape[dim]),
                           _remap_bound(along, i.stop, shape[dim]), i.step)
                changed |= ni != i
                i = ni
        elif isinstance(i, int) and _input_mask_along(node, lab_keep, dim) is not None:
            along = _input_mask_along(node, lab_keep, dim)
            i = _remap_bound(along, i, shape[dim])
            changed = True
        new.append(i)
        dim += 1
    if changed:
        node.args = (node.args[0], tuple(new) if isinstance(idx, tuple) else new[0])
        changes.append(f"{node.name}: slice bounds rewritten")


def _rewrite_narrow(node, name, lab_keep, changes) -> None:
    shape = node.args[0].meta.get(SHAPE_KEY)
    if shape is None:
        return
    dim = node.args[1] % len(shape)
    along = _input_mask_along(node, lab_keep, dim)
    if along is None:
        return
    args = list(node.args)
    if name == "narrow":
        start, length = args[2], args[3]
        args[2] = _remap_bound(along, start, shape[dim])
        args[3] = _remap_bound(along, start + length, shape[dim]) - args[2]
    else:
        args += [None] * (5 - len(args))
        args[2] = _remap_bound(along, args[2], shape[dim])
        args[3] = _remap_bound(along, args[3], shape[dim]) if args[3] is not None and \
            args[3] < 2**62 else args[3]
    node.args = tuple(args)
    changes.append(f"{node.name}: {name} bounds rewritten")


def apply_slice(gm: torch.fx.GraphModule, analysis, keep: dict[int, np.ndarray],
                changes: list[str]) -> dict[str, dict[int, torch.Tensor]]:
    """Slice ``gm`` in place for ``keep``; returns the plan (original parameter names)."""
    lab_keep = label_keep(analysis, keep)
    masks = param_masks(analysis, lab_keep)
    aliases = getattr(analysis, "param_aliases", {}) or {}
    for name, mask in masks.items():
        owner, leaf = attr_owner(gm, name)
        tensor = getattr(owner, leaf)
        new = slice_tensor(tensor, mask)
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=tensor.requires_grad)
        for alias in aliases.get(name, [name]):  # tied names stay one tensor
            _set_attr(gm, alias, new)
        changes.append(f"{name}: {tuple(tensor.shape)} -> {tuple(new.shape)}")
    _fix_module_attrs(gm)
    rewrite_constants(gm, analysis, lab_keep, changes)
    expanded = {alias: mask for name, mask in masks.items()
                for alias in aliases.get(name, [name])}
    return plan_from_masks(expanded)
