"""Pure label-array transforms for view-like ops: reshape, permute, indexing, splitting.

They move a :class:`~fxprune.analysis.labels.Comp` through an op that only rearranges positions.

Example:
    >>> import numpy as np
    >>> from fxprune.analysis.labels import Comp
    >>> c = Comp(np.arange(6).reshape(1, 6), (1,))
    >>> out, mixed = reshape_comp(c, (2, 6), (2, 2, 3))
    >>> out.span, out.lab.shape, mixed
    ((1, 2), (1, 2, 3), False)
"""

from __future__ import annotations

import numpy as np

from fxprune.analysis.labels import Comp


def reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims whose products match."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < n_out and out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n_in or j >= n_out:
            raise ValueError(f"cannot align reshape {tuple(in_shape)} -> {tuple(out_shape)}")
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj and i < n_in:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif j < n_out:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                raise ValueError(f"cannot align reshape {tuple(in_shape)} -> {tuple(out_shape)}")
        groups.append((gi, gj))
    return groups


def reshape_comp(comp: Comp, in_shape, out_shape) -> tuple[Comp, bool]:
    """Reshape a comp; ``mixed`` is True when a channel dim was merged with a plain dim of size
    > 1 (then per-channel slicing of the result is not a plain slice)."""
    groups = reshape_groups(in_shape, out_shape)
    lab = comp.lab
    partial = list(lab.shape)
    mixed = False
    span_set = set(comp.span)
    bearing = []
    for gi, _ in groups:
        has = any(d in span_set for d in gi)
        bearing.append(has)
        if has:
            for d in gi:
                if d not in span_set and in_shape[d] > 1:
                    mixed = True
                    partial[d] = in_shape[d]
    lab = np.broadcast_to(lab, partial)
    new_shape: list[int] = []
    new_span: list[int] = []
    for (gi, gj), has in zip(groups, bearing):
        for d in gj:
            if has:
                new_shape.append(out_shape[d])
                if out_shape[d] > 1 or (len(gj) == 1 and any(d2 in span_set for d2 in gi)):
                    new_span.append(d)
            else:
                new_shape.append(1)
    return Comp(np.ascontiguousarray(lab).reshape(new_shape), tuple(new_span), comp.soft), mixed


def drop_constant_dims(comp: Comp) -> Comp:
    """Drop span dims along which every label is the same id: a channel dim merged into a plain
    dim and split off again carries copies of one label there, so it is a plain dim again."""
    lab = comp.lab
    span = []
    for d in comp.span:
        if lab.shape[d] > 1 and (lab == np.take(lab, [0], axis=d)).all():
            lab = np.take(lab, [0], axis=d)
        else:
            span.append(d)
    if len(span) == len(comp.span):
        return comp
    return Comp(lab, tuple(span), comp.soft)


def permute_comp(comp: Comp, perm) -> Comp:
    inv = {old: new for new, old in enumerate(perm)}
    return Comp(np.transpose(comp.lab, perm), tuple(sorted(inv[d] for d in comp.span)), comp.soft)


def unsqueeze_comp(comp: Comp, dim: int) -> Comp:
    return Comp(np.expand_dims(comp.lab, dim),
                tuple(sorted(d + 1 if d >= dim else d for d in comp.span)), comp.soft)


def squeeze_comp(comp: Comp, dims) -> Comp:
    dims = sorted(dims)
    lab = np.squeeze(comp.lab, axis=tuple(dims)) if dims else comp.lab
    span = []
    for d in comp.span:
        if d in dims:
            continue
        span.append(d - sum(1 for x in dims if x < d))
    return Comp(lab, tuple(span), comp.soft)


def take_comp(comp: Comp, dim: int, index) -> Comp:
    """Select ``index`` (int, slice or int array) along ``dim``; an int drops the dim."""
    if dim not in comp.span:
        if isinstance(index, int):
            return squeeze_comp(comp, [dim])
        if isinstance(index, slice):
            return comp
        idx = np.asarray(index)
        lab = np.take(comp.lab, np.zeros(idx.shape, dtype=np.int64), axis=dim)
        return _after_index(comp, lab, dim, idx.ndim, spanned=False)
    if isinstance(index, int):
        return squeeze_comp(Comp(np.take(comp.lab, [index], axis=dim), comp.span, comp.soft),
                            [dim])
    if isinstance(index, slice):
        sl = [slice(None)] * comp.lab.ndim
        sl[dim] = index
        return Comp(comp.lab[tuple(sl)], comp.span, comp.soft)
    idx = np.asarray(index)
    lab = np.take(comp.lab, idx, axis=dim)
    return _after_index(comp, lab, dim, idx.ndim, spanned=True)


def _after_index(comp: Comp, lab, dim, idx_ndim, spanned) -> Comp:
    span = []
    for d in comp.span:
        if d < dim:
            span.append(d)
        elif d > dim:
            span.append(d + idx_ndim - 1)
    if spanned:
        span.extend(range(dim, dim + idx_ndim))
    return Comp(lab, tuple(sorted(span)), comp.soft)


def comp_to_letters(c: Comp, letters: str, out_letters: str) -> Comp:
    """``c`` (on a tensor whose dims are named by ``letters``) laid out on the dims named by
    ``out_letters``: its span dims moved to where their letters are, every other dim size 1.

    Example:
        >>> import numpy as np
        >>> c = comp_to_letters(Comp(np.arange(6).reshape(1, 2, 3), (1, 2)), "bhd", "dxh")
        >>> c.lab.shape, c.span
        ((3, 1, 2), (0, 2))
    """
    span_letters = [letters[d] for d in c.span]
    lab = c.lab
    # drop non-span dims, order span dims as in out_letters
    lab = lab.reshape([lab.shape[d] for d in c.span]) if c.span else lab.reshape(())
    order = sorted(range(len(span_letters)), key=lambda k: out_letters.index(span_letters[k]))
    lab = np.transpose(lab, order) if order else lab
    shape = [1] * len(out_letters)
    for k in order:
        shape[out_letters.index(span_letters[k])] = c.lab.shape[c.span[k]]
    return Comp(lab.reshape(shape), tuple(sorted(out_letters.index(ch) for ch in span_letters)),
                c.soft)


def split_sizes(total: int, arg, dim_size: int | None = None) -> list[int]:
    """Sizes produced by ``torch.split(x, arg)`` along a dim of length ``total``."""
    if isinstance(arg, int):
        return [min(arg, total - s) for s in range(0, total, arg)]
    return [int(a) for a in arg]
