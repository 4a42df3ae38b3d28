"""AMAP's data-driven indicator initialization for linear attention (paper section 3.3,
eq. 5-6).

Linear attention computes ``Q K^T V`` as ``(K^T V)`` first, and per head it is a sum over the
q/k channels ``i`` of ``Q_i K_i^T V`` (eq. 5). A channel matters when its term alone is close
to the whole product. The distance is taken between singular values (eq. 6): ``Q_i K_i^T V``
is the rank-one matrix ``Q_i (K_i^T V)``, so its only non-zero singular value is
``|Q_i| |K_i^T V|`` and

    T_i = | sigma(Q K^T V) - (|Q_i| |K_i^T V|, 0, ..., 0) |_2

costs one small SVD per head and image. ``T`` is summed over the images of a few batches and
normalised to [0, 1] per group: 0 is the most important channel. The indicator is a pruning
score (a channel is kept while ``m* < tau``) and every other indicator starts at 0, where the
MACs loss starts pushing all of them up, each by what removing it saves. A linear-attention
q/k channel saves its q and k rows plus ``N * d_v`` in each of two products, more than most
channels, which is why the paper finds them removed severely without this start. So the
search starts them at ``m* = (T - 1) * tau``: the least important channel where every other
channel starts (0), the most important one a full ``tau`` further from the threshold. Every
channel is kept at the start.

The tensors are read at the site's nodes (``q`` of ``q @ (k^T v)``, and ``k``, ``v`` of
``k^T v``); a head's channels are found from the analysis labels (heads folded into the batch
dim are unfolded). Where the layout cannot be read (channel ids shared between heads, token
counts that differ) the group keeps the default start (zeros) and the reason is reported.

Example:
    >>> import torch
    >>> from fxprune.models.flatten import flatten_swin_nano
    >>> import fxprune
    >>> x = torch.randn(2, 3, 32, 32)
    >>> gm = fxprune.trace(flatten_swin_nano().eval(), x); a = fxprune.analyze(gm)
    >>> scores, skipped = linear_attention_scores(gm, a, [x])
    >>> all(0.0 <= float(s.min()) and float(s.max()) <= 1.0 for s in scores.values())
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx

from fxprune.amap.gates import batch_period
from fxprune.meta import COMPS_KEY

HEAD_START = 1.0  # in units of tau: how far below 0 the most important channel starts


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _by_heads(t: torch.Tensor, node, group_channels: np.ndarray | None, analysis,
              heads: int):
    """``t`` as (batch, tokens, heads, size) with the channel ids (heads, size) of its columns,
    or a reason why its layout cannot be read."""
    meta = node.meta.get(COMPS_KEY)
    entries = [e for e in meta if isinstance(e, tuple) and e[1]] if isinstance(meta, list) else []
    if group_channels is not None:
        entries = [e for e in entries if np.isin(analysis.components.channel_of(e[0]),
                                                 group_channels).all()]
    if len(entries) != 1:
        return None, f"{node.name}: no single channel component"
    lab, span = entries[0]
    if 0 in span:  # heads folded into the batch dim: unfold (B*h, ...) -> (B, h, ...)
        period = batch_period(torch.from_numpy(np.ascontiguousarray(lab)))
        if t.shape[0] % period:
            return None, f"{node.name}: channels folded into the batch dim"
        t = t.reshape(t.shape[0] // period, period, *t.shape[1:])
        lab = lab[:period].reshape(1, period, *lab.shape[1:])
        span = (1,) + tuple(d + 1 for d in span if d != 0)
    nd = t.ndim
    perm = [0] + [d for d in range(1, nd) if d not in span] + list(span)
    n_pos = int(np.prod([t.shape[d] for d in span]))
    if n_pos % heads:
        return None, f"{node.name}: {n_pos} channels do not split into {heads} heads"
    x = t.permute(perm).reshape(t.shape[0], -1, heads, n_pos // heads)
    ch = analysis.components.channel_of(
        lab.reshape([lab.shape[d] for d in span]).reshape(heads, -1))
    return x, ch


def _to_layout(x: torch.Tensor, ch: np.ndarray, layout: np.ndarray):
    """Reorder the (heads, size) columns of ``x`` into ``layout`` order (one channel id per
    layout entry), or None when the ids do not match one to one."""
    flat = layout.ravel()
    if len(np.unique(flat)) != flat.size or sorted(ch.ravel().tolist()) != sorted(flat.tolist()):
        return None
    where = {int(c): i for i, c in enumerate(ch.ravel())}
    order = torch.as_tensor([where[int(c)] for c in flat])
    b, t = x.shape[:2]
    return x.reshape(b, t, -1)[:, :, order].reshape(b, t, *layout.shape)


def channel_distance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per image, head and channel for ``q, k`` of shape (B, N, heads, d) and ``v`` of
    shape (B, N, heads, dv): returns (B, heads, d).

    Example:
        >>> q = torch.rand(1, 5, 1, 2); k = torch.rand(1, 5, 1, 2); v = torch.rand(1, 5, 1, 3)
        >>> channel_distance(q, k, v).shape
        torch.Size([1, 1, 2])
    """
    q, k, v = q.double(), k.double(), v.double()
    ktv = torch.einsum("bnhi,bnhj->bhij", k, v)
    full = torch.einsum("bnhi,bhij->bhnj", q, ktv)
    sv = torch.linalg.svdvals(full)                              # (B, heads, min(N, dv))
    single = q.norm(dim=1) * ktv.norm(dim=-1)                    # (B, heads, d)
    rest = sv[..., 1:].pow(2).sum(-1, keepdim=True)
    return ((sv[..., :1] - single).pow(2) + rest).sqrt()


def linear_attention_scores(gm: torch.fx.GraphModule, analysis, batches: Iterable
                            ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Normalised eq. 6 scores in [0, 1] (0: most important), shape of the group's layout,
    for the q/k group of every ``linear`` site; and ``{group: reason}`` for the linear sites'
    groups it could not score. ``batches`` yields model inputs (or ``(inputs, targets)``)."""
    sites = [s for s in analysis.attention if s.kind == "linear" and s.qk_group is not None
             and analysis.groups[s.qk_group].prunable and s.v is not None]
    if not sites:
        return {}, {}
    wanted = {n.name for s in sites for n in (s.q, s.k, s.v) if isinstance(n, torch.fx.Node)}
    sums: dict[int, torch.Tensor] = {}
    skipped: dict[int, str] = {}
    was_training = gm.training
    gm.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            cap = _Capture(gm, wanted)
            with torch.no_grad():
                cap.run(x)
            for s in sites:
                g = analysis.groups[s.qk_group]
                if g.index in skipped:
                    continue
                dist, reason = _site_distance(s, g, cap.values, analysis)
                if dist is None:
                    skipped[g.index] = reason
                    sums.pop(g.index, None)
                    continue
                sums[g.index] = sums.get(g.index, 0) + dist.sum(0)
    finally:
        gm.train(was_training)
    scores = {}
    for gi, total in sums.items():
        t = total.numpy()
        span = t.max() - t.min()
        scores[gi] = (t - t.min()) / span if span > 0 else np.zeros_like(t)
    return scores, skipped


def _site_distance(site, group, values, analysis):
    heads = group.layout.shape[0]
    views = []
    for node, channels in ((site.q, group.layout), (site.k, group.layout), (site.v, None)):
        if node.name not in values:
            return None, f"{node.name} was not computed"
        x, ch = _by_heads(values[node.name], node, np.unique(channels) if channels is not None
                          else None, analysis, heads)
        if x is None:
            return None, ch
        if channels is not None:
            x = _to_layout(x, ch, group.layout)
            if x is None:
                return None, f"{node.name}: its channels are not the group's layout"
        views.append(x)
    q, k, v = views
    if q.shape[1] != k.shape[1] and k.shape[1] != v.shape[1]:
        return None, "token counts of q, k and v differ"
    if k.shape[1] != v.shape[1]:
        return None, "k and v have different token counts"
    return channel_distance(q, k, v), None
