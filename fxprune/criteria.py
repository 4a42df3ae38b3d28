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

from .errors import InputError
from .propagate import _fetch_attr

CRITERIA = ("similarity", "l1", "random", "toast")
SKETCH_DIM = 256


def _features(gm, analysis, groups) -> dict[int, list[np.ndarray]]:
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
        tensor = _fetch_attr(gm, name)
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
    blocks = _features(gm, analysis, groups)
    out = {}
    for g in groups:
        n = g.layout.size
        l1 = np.zeros(n)
        for pos, feat in blocks[g.index]:
            ok = pos >= 0
            np.add.at(l1, pos[ok], np.abs(feat[ok]).sum(axis=1))
        score = l1
        if criterion == "similarity":
            score = l1 / _similarity_weight(g, blocks[g.index])
        elif criterion == "toast":
            score = _median_distance(g, blocks[g.index])
        out[g.index] = score.reshape(g.layout.shape)
    return out


def _feature_matrix(n: int, blocks) -> np.ndarray:
    """One row per channel position: the concatenation of all its tied parameter entries.
    Where one block holds several rows of the same channel (q and k rows of a fused qkv
    Linear), each occurrence gets its own columns instead of overwriting the previous one."""
    parts = []
    for pos, feat in blocks:
        ok = pos >= 0
        pos, feat = pos[ok], feat[ok]
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_pos))[0] + 1]
        rank = np.empty(len(pos), dtype=np.int64)
        run = np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
        rank[order] = run
        for r in range(int(rank.max()) + 1 if len(rank) else 0):
            sel = rank == r
            block = np.zeros((n, feat.shape[1]), dtype=np.float32)
            block[pos[sel]] = feat[sel]
            parts.append(block)
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)


def _similarity_weight(g, blocks) -> np.ndarray:
    """AMAP eq. 1-2: w_i = 1 + max over the other channels n of its head of |cos(i, n)|."""
    n = g.layout.size
    f = _feature_matrix(n, blocks)
    width = f.shape[1]
    if not width:
        return np.ones(n)
    heads, size = g.layout.shape
    # torch, not numpy, for the products: mixing numpy's BLAS threads with torch's OpenMP
    # threads right after torch work oversubscribes the cores (seen: 40x slower)
    ft = torch.from_numpy(f)
    if width > SKETCH_DIM and size > SKETCH_DIM:
        # wide groups (MLP hidden layers): cosines from a fixed random projection of the
        # features (Johnson-Lindenstrauss), so the cost is size^2 * 256 instead of
        # size^2 * width; attention heads (size <= 256) keep exact cosines
        gen = torch.Generator().manual_seed(0)
        ft = ft @ torch.randn(width, SKETCH_DIM, generator=gen)
    ft = ft / ft.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ft = ft.reshape(heads, size, -1)
    sim = (ft @ ft.transpose(1, 2)).abs()
    sim.diagonal(dim1=1, dim2=2).zero_()
    return (1.0 + sim.max(dim=2).values).reshape(-1).double().numpy()


def _median_distance(g, blocks) -> np.ndarray:
    """ToaSt: ||f_i - median_j f_j|| over the channels j of the same head."""
    n = g.layout.size
    f = _feature_matrix(n, blocks)
    width = f.shape[1]
    if not width:
        return np.ones(n)
    ft = torch.from_numpy(f).reshape(g.layout.shape[0], g.layout.shape[1], width)
    median = ft.median(dim=1, keepdim=True).values
    return (ft - median).norm(dim=2).reshape(-1).double().numpy()
