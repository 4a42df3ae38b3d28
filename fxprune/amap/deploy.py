"""Searched masks that run fast: kept counts rounded to ``align`` and, where the attention is
SDPA, q/k and v of a site given the same head dim (its fused kernels need equal head dims; with
different ones CPU SDPA falls back to the unfused math path and a pruned model can be slower
than the dense one).

The search's indicators decide the count per head of each group; this step moves each count to
the nearest allowed one (a multiple of ``align`` channels per head, or every channel) and, for
a q/k and v pair, to the allowed count nearest their mean, so the MACs stay about where the
search put them. Each head then keeps its best units by the indicators' weighted scores
(``m*``: lower is kept).

Example:
    >>> import numpy as np
    >>> allowed_counts(units=16, per_unit=1, align=8)
    [16, 8]
    >>> nearest(11, [16, 8]), nearest(13, [16, 8])
    (8, 16)
"""

from __future__ import annotations

import numpy as np
import torch


def allowed_counts(units: int, per_unit: int, align: int) -> list[int]:
    """Kept units per head whose channel count is a multiple of ``align`` (largest first);
    all units are always allowed."""
    return [units] + [k for k in range(units - 1, 0, -1) if (k * per_unit) % align == 0]


def nearest(k: float, allowed: list[int]) -> int:
    """The allowed count nearest ``k`` (ties: the larger)."""
    return min(allowed, key=lambda a: (abs(a - k), -a))


def deployable_masks(analysis, indicators: dict, units: dict, align: int = 8,
                     match_qk_v: bool | None = None) -> dict[int, np.ndarray]:
    """Binary keep masks (heads, size) per group from trained ``indicators`` with counts
    rounded to ``align`` and equal q/k and v counts at SDPA sites (``match_qk_v=None``) or at
    every site (True). ``units`` is :class:`fxprune.amap.macs_model.MacsModel`'s. Groups whose
    heads keep different counts (search without synchronisation) are left as searched."""
    scores, counts = {}, {}
    for g, ind in indicators.items():
        with torch.no_grad():
            keep = ind.keep().detach().cpu().numpy() > 0.5
            scores[g] = ind.weighted().detach().cpu().numpy()
        per_head = keep.sum(axis=1)
        counts[g] = int(per_head[0]) if (per_head == per_head[0]).all() else None
    target = {g: _rounded(k, units[g], align) for g, k in counts.items() if k is not None}
    for site in analysis.attention:
        pair = (site.qk_group, site.v_group)
        paired = match_qk_v if match_qk_v is not None else site.uses_sdpa
        if not paired or not all(g in target for g in pair):
            continue
        uq, uv = units[pair[0]], units[pair[1]]
        if uq.channels.shape != uv.channels.shape or uq.per_unit != uv.per_unit:
            continue
        k = nearest((counts[pair[0]] + counts[pair[1]]) / 2,
                    allowed_counts(uq.channels.shape[1], uq.per_unit, align))
        target[pair[0]] = target[pair[1]] = k
    masks = {}
    for g, ind in indicators.items():
        layout = analysis.groups[g].layout
        if g not in target:  # unsynchronised: as searched
            mask = np.isin(layout, ind.channels[ind.keep().detach().cpu().numpy() > 0.5])
        else:
            top = np.argsort(scores[g], axis=1, kind="stable")[:, :target[g]]
            mask = np.isin(layout, np.take_along_axis(units[g].channels, top, axis=1))
        if not mask.all():
            masks[g] = mask
    return masks


def unit_keep(masks: dict[int, np.ndarray], analysis, units: dict) -> dict[int, torch.Tensor]:
    """The masks as the MACs model's per-unit keep tensors."""
    out = {}
    for g, u in units.items():
        if g in masks:
            kept = analysis.groups[g].layout[masks[g]]
            out[g] = torch.as_tensor(np.isin(u.channels, kept), dtype=torch.float32)
        else:
            out[g] = torch.ones(u.channels.shape)
    return out


def pin_indicators(indicators: dict, keep: dict[int, torch.Tensor]) -> None:
    """Set every indicator whose binary keep differs from ``keep`` so that it equals it (the
    gated model then computes what the deployable masks slice): kept units far below tau,
    the others far above, which rank-wise averaging across heads leaves in place."""
    with torch.no_grad():
        for g, ind in indicators.items():
            k = keep[g].to(ind.m.dtype).reshape(ind.m.shape)
            if torch.equal(ind.keep().detach(), k):
                continue
            ind.m.copy_(torch.where(k > 0.5, torch.full_like(k, -1.0),
                                    torch.full_like(k, 1e3 * (1.0 + abs(ind.tau)))))


def _rounded(k: int, units, align: int) -> int:
    return nearest(k, allowed_counts(units.channels.shape[1], units.per_unit, align))
