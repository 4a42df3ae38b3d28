"""Channel importance criteria for one-shot pruning. Every criterion returns, per prunable
group, a keep-score array shaped like the group's layout ``(heads, size)``: higher = keep.

* ``l1``: sum of |w| over every parameter entry tied to the channel (rows of the producing
  Linear, columns of the consuming one, biases, norms' scales...).
* ``similarity``: AMAP eq. 1-3 on the weights. In each head, the channel's feature vector is
  the concatenation of its tied parameter entries; ``w_i = 1 + max_{n != i} |cos(i, n)|`` and the
  keep-score is ``l1 / w_i``: a channel with a near-duplicate in its head is a better
  candidate for removal (AMAP section 3.1).
* ``random``: uniform noise from ``seed`` (a baseline).
* ``toast``: ToaSt's coupled head-wise score: the distance of each channel's tied weights
  (Q and K rows together for a ``qk`` group; V rows with the output projection's columns for
  a ``v`` group) from the element-wise median over the channels of its head.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)); a = fxprune.analyze(gm)
    >>> scores = channel_scores(gm, a, "l1")
    >>> {a.groups[g].kind: tuple(s.shape) for g, s in scores.items()}["qk"]
    (3, 16)
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.errors import InputError
from fxprune.ops import fetch_attr

CRITERIA = ("similarity", "l1", "random", "toast")
SKETCH_DIM = 256
#: rows per block of the Gram matrix of a large group (see :func:`max_abs_offdiag`)
GRAM_BLOCK = 1024
#: feature matrices of same-shaped groups are scored together, up to this many bytes at once
CHUNK_BYTES = 32 << 20
#: similarity products computed at once, at most (bytes)
SIM_BYTES = 32 << 20


def features(gm, analysis, groups) -> dict[int, list[np.ndarray]]:
    """Per group: list of (positions, features) blocks, one per tied parameter comp."""
    comps = analysis.components
    pos_of: dict[int, tuple[int, np.ndarray]] = {}
    for g in groups:
        flat = g.layout.ravel()
        lookup = np.full(int(comps.channel.max()) + 1, -1, dtype=np.int64)
        lookup[flat] = np.arange(flat.size)
        pos_of[g.index] = lookup
    blocks: dict[int, list] = {g.index: [] for g in groups}
    for name, pcomps in analysis.param_comps.items():
        tensor = fetch_attr(gm, name)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        w = tensor.detach().float().cpu().numpy()
        for c in pcomps:
            if not c.span:
                continue
            ch = comps.channel_of(c.lab)
            gids = np.unique(analysis.group_of_channel[ch.ravel()])
            for gi in gids.tolist():
                if gi not in blocks:
                    continue
                span = list(c.span)
                rest = [d for d in range(w.ndim) if d not in span]
                moved = np.transpose(w, span + rest).reshape(
                    int(np.prod([w.shape[d] for d in span])), -1)
                pos = pos_of[gi][ch.reshape(-1)] if ch.size == moved.shape[0] else None
                if pos is None:
                    continue
                blocks[gi].append((pos, moved))
    return blocks


def channel_scores(gm, analysis, criterion: str, seed: int = 0,
                   groups=None) -> dict[int, np.ndarray]:
    """Keep-scores ``{group index: (heads, size) array}`` for every prunable group."""
    if criterion not in CRITERIA:
        raise InputError("fxprune.prune", f"unknown criterion {criterion!r}",
                         hint=f"use one of {', '.join(CRITERIA)}")
    groups = [g for g in analysis.groups if g.prunable] if groups is None else groups
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {g.index: rng.random(g.layout.shape) for g in groups}
    blocks = features(gm, analysis, groups)
    if criterion == "l1":
        return {g.index: l1_norms(g.layout.size, blocks[g.index]).reshape(g.layout.shape)
                for g in groups}
    # similarity and toast need each group's feature matrix: built once per group (its l1
    # comes from it too), and same-shaped groups (the blocks of a ViT) are scored together
    # in a few large tensor ops rather than many small ones
    layouts = {g.index: feature_layout(g.layout.size, blocks[g.index]) for g in groups}
    buckets: dict[tuple, list] = {}
    for g in groups:
        buckets.setdefault((*g.layout.shape, layouts[g.index][0]), []).append(g)
    out = {}
    for (heads, size, width), members in buckets.items():
        n = heads * size
        per_chunk = max(1, min(len(members), CHUNK_BYTES // max(1, 4 * n * width)))
        buf = np.empty((per_chunk, n, width), dtype=np.float32)
        for c in range(0, len(members), per_chunk):
            chunk = members[c:c + per_chunk]
            f = buf[:len(chunk)]
            l1 = [l1_norms_from_matrix(n, f[i], fill_features(f[i], blocks[g.index],
                                                              layouts[g.index][1]))
                  for i, g in enumerate(chunk)]
            if not width:
                second = np.ones((len(chunk), n))
            elif criterion == "similarity":
                second = _similarity_weights(f, heads, size)
            else:
                second = _median_distances(f, heads, size)
            for i, g in enumerate(chunk):
                score = l1[i] / second[i] if criterion == "similarity" else second[i]
                out[g.index] = score.reshape(g.layout.shape)
    return {g.index: out[g.index] for g in groups}


def l1_norms(n: int, blocks) -> np.ndarray:
    """Sum of |w| over the tied parameter entries of every channel position."""
    l1 = np.zeros(n)
    for pos, feat in blocks:
        ok = pos >= 0
        # order="C": the same C-ordered rows as np.abs(feat[ok]) without that gather when
        # every row is kept, so the row sums add up in the same order to the same values
        rows = np.abs(feat, order="C") if ok.all() else np.abs(feat[ok])
        np.add.at(l1, pos[ok], rows.sum(axis=1))
    return l1


def l1_norms_from_matrix(n: int, f: np.ndarray, parts) -> np.ndarray:
    """:func:`l1_norms` from the assembled feature matrix: the same float32 row sums, added block
    by block and within a block occurrence by occurrence, as ``np.add.at`` adds them."""
    l1 = np.zeros(n)
    for start, stop, pos in parts:
        sums = np.abs(f[:, start:stop]).sum(axis=1)
        l1[pos] += sums[pos]
    return l1


def feature_layout(n: int, blocks) -> tuple[int, list[tuple[int, int, np.ndarray, np.ndarray]]]:
    """Column layout of :func:`feature_matrix`: its width and, per part (one per block and
    occurrence rank, in column order), ``(block, first column, positions, source rows)``."""
    todo = []
    width = 0
    for b, (pos, feat) in enumerate(blocks):
        src = np.nonzero(pos >= 0)[0]
        pos = pos[src]
        if not len(pos):
            continue
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_pos))[0] + 1]
        if len(starts) == len(pos):  # every position once: a single part
            todo.append((b, width, pos, src))
            width += feat.shape[1]
            continue
        rank = np.empty(len(pos), dtype=np.int64)
        rank[order] = np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            todo.append((b, width, pos[sel], src[sel]))
            width += feat.shape[1]
    return width, todo


def _rows(feat: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``feat[idx]``; a view when ``idx`` is all rows or a run of consecutive rows."""
    if len(idx) and _is_run(idx):
        return feat[idx[0]:idx[-1] + 1]
    return feat[idx]


def fill_features(f: np.ndarray, blocks, todo) -> list[tuple[int, int, np.ndarray]]:
    """Write the feature matrix laid out by :func:`feature_layout` into ``f`` (positions, width);
    returns ``[(first column, end column, positions)]`` per part."""
    if any(len(pos) < f.shape[0] for _, _, pos, _ in todo):
        f.fill(0)
    parts = []
    for b, start, pos, src in todo:
        feat = _rows(blocks[b][1], src)
        stop = start + feat.shape[1]
        if len(pos) == f.shape[0] and _is_run(pos):  # rows in order: a plain copy
            _copy_into(f[:, start:stop], feat)
        else:
            f[pos, start:stop] = feat
        parts.append((start, stop, pos))
    return parts


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``. A transposed source (a consuming Linear's columns) is copied as
    rows of ``src.T`` into columns of ``dst``, 16 at a time: about 4x faster than numpy's
    element order for a (3072, 768) block, and the same values."""
    if src.ndim == 2 and not src.flags.c_contiguous and src.T.flags.c_contiguous:
        dst_t, src_t = dst.T, src.T
        for j in range(0, src_t.shape[0], 16):
            dst_t[j:j + 16] = src_t[j:j + 16]
    else:
        dst[...] = src


def _is_run(idx: np.ndarray) -> bool:
    """``idx`` is ``idx[0], idx[0] + 1, ...`` (empty included)."""
    return not len(idx) or (int(idx[-1]) - int(idx[0]) == len(idx) - 1
                            and bool((np.diff(idx) == 1).all()))


def feature_matrix(n: int, blocks) -> np.ndarray:
    """One row per channel position: the concatenation of all its tied parameter entries.
    Where one block holds several rows of the same channel (q and k rows of a fused qkv
    Linear), each occurrence gets its own columns instead of overwriting the previous one."""
    width, todo = feature_layout(n, blocks)
    f = np.empty((n, width), dtype=np.float32)
    fill_features(f, blocks, todo)
    return f


def similarity_weight(g, blocks) -> np.ndarray:
    """AMAP eq. 1-2: w_i = 1 + max over the other channels n of its head of |cos(i, n)|."""
    n = g.layout.size
    f = feature_matrix(n, blocks)
    if not f.shape[1]:
        return np.ones(n)
    return _similarity_weights(f[None], *g.layout.shape)[0]


def _similarity_weights(f: np.ndarray, heads: int, size: int) -> np.ndarray:
    """:func:`similarity_weight` of same-shaped groups at once: ``f`` (groups, heads * size,
    width) -> (groups, heads * size); ``f`` is overwritten. Every value is what the group alone
    gets: the products are the same dot products in the same order, and max |s| is
    max(max s, -min s) exactly, without an |.| pass over the similarity matrix."""
    groups, n, width = f.shape
    # torch, not numpy, for the products: mixing numpy's BLAS threads with torch's OpenMP
    # threads right after torch work oversubscribes the cores (seen: 40x slower)
    ft = torch.from_numpy(f).reshape(groups * n, width)
    if width > SKETCH_DIM and size > SKETCH_DIM:
        # wide groups (MLP hidden layers): cosines from a fixed random projection of the
        # features (Johnson-Lindenstrauss), so the cost is size^2 * 256 instead of
        # size^2 * width; attention heads (size <= 256) keep exact cosines
        gen = torch.Generator().manual_seed(0)
        ft = ft @ torch.randn(width, SKETCH_DIM, generator=gen)
    # in place (f is the caller's scratch): the same quotients as ft / norm.clamp_min(1e-12)
    ft.div_(ft.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    ft = ft.reshape(groups * heads, size, -1)
    best = max_abs_offdiag(ft)
    return (best.reshape(groups, n) + 1.0).astype(np.float64)


def max_abs_offdiag(ft: torch.Tensor) -> np.ndarray:
    """max over j != i of |<ft[b, i], ft[b, j]>| for every row i of every matrix b of ``ft``
    (batch, size, k).

    The Gram matrices are computed by blocks of rows, and only the blocks on and above the
    diagonal (a Gram matrix is symmetric entry by entry: a block's column extremes are the row
    extremes of its mirror image), several matrices per product, never more than
    ``SIM_BYTES`` of products at once. Every entry is the same dot product as in the full
    product (k <= 256 for large sizes: one pass over k per entry, whatever the block), and
    max |s| is taken as max(max s, -min s), in numpy: single-threaded reductions, no thread
    hand-off per block."""
    batch, size, _ = ft.shape
    nblocks = -(-size // GRAM_BLOCK)
    step = -(-size // nblocks)
    bounds = list(range(0, size, step)) + [size]
    per = max(1, SIM_BYTES // (4 * step * step))
    hi = np.zeros((batch, size), dtype=np.float32)
    lo = np.zeros((batch, size), dtype=np.float32)
    diag = np.arange(step)
    for b0 in range(0, batch, per):
        x = ft[b0:b0 + per]
        h, low = hi[b0:b0 + per], lo[b0:b0 + per]
        for a, (i0, i1) in enumerate(zip(bounds[:-1], bounds[1:])):
            rows = x[:, i0:i1]
            for j0, j1 in zip(bounds[a:-1], bounds[a + 1:]):
                sim = torch.bmm(rows, x[:, j0:j1].transpose(1, 2)).numpy()
                if j0 == i0:
                    sim[:, diag[:i1 - i0], diag[:i1 - i0]] = 0
                np.maximum(h[:, i0:i1], sim.max(axis=2), out=h[:, i0:i1])
                np.minimum(low[:, i0:i1], sim.min(axis=2), out=low[:, i0:i1])
                if j0 != i0:
                    np.maximum(h[:, j0:j1], sim.max(axis=1), out=h[:, j0:j1])
                    np.minimum(low[:, j0:j1], sim.min(axis=1), out=low[:, j0:j1])
    return np.maximum(hi, -lo)


def _median_distance(g, blocks) -> np.ndarray:
    """ToaSt: ||f_i - median_j f_j|| over the channels j of the same head."""
    n = g.layout.size
    f = feature_matrix(n, blocks)
    if not f.shape[1]:
        return np.ones(n)
    return _median_distances(f[None], *g.layout.shape)[0]


def _median_distances(f: np.ndarray, heads: int, size: int) -> np.ndarray:
    """:func:`_median_distance` of same-shaped groups at once (``f``: groups, n, width). The
    median is torch's (the lower middle value, an exact selection), taken with numpy's
    partition, which is much faster than ``torch.median`` along a non-last dim."""
    groups, n, width = f.shape
    ft = torch.from_numpy(f).reshape(groups * heads, size, width)
    k = (size - 1) // 2
    median = np.partition(f.reshape(groups * heads, size, width), k, axis=1)[:, k:k + 1]
    dist = (ft - torch.from_numpy(median)).norm(dim=2)
    return dist.reshape(groups, n).double().numpy()
