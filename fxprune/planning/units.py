"""Pruning units: what one step of pruning removes from a channel group.

A group's layout is a (heads, size) array of channel ids. Normally every (head, channel)
position is its own unit. Where positions share a channel (rotary pairs, a parameter shared
by every head, the q heads of one grouped-query k/v head) they are kept or dropped together,
so the shared channel is one unit and its score is the mean of its positions' scores: counts
and costs are then not counted twice.

Example:
    >>> import numpy as np
    >>> head_classes(np.array([[0, 1], [0, 1], [2, 3]]))   # heads 0 and 1 share channels
    [[0, 1], [2]]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fxprune.errors import PlanError

WHERE = "fxprune.prune"


@dataclasses.dataclass(frozen=True, eq=False)
class Units:
    """A group seen as independent units, one row per effective head.

    ``channels[h, u]`` is the channel id of unit ``u`` of effective head ``h``, ``scores`` its
    importance (same shape) and ``per_unit`` how many positions of each head one unit covers.
    """

    channels: np.ndarray   # (heads_eff, units) channel ids
    scores: np.ndarray     # (heads_eff, units)
    per_unit: int          # positions per unit in each head


def group_units(group, score: np.ndarray) -> Units:
    """The units of ``group`` with ``score`` (shaped like its layout) averaged per unit.

    Example:
        >>> import numpy as np
        >>> from types import SimpleNamespace
        >>> g = SimpleNamespace(layout=np.array([[0, 1], [2, 3]]), shared_across_heads=False,
        ...                     index=0)
        >>> u = group_units(g, np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> u.channels.tolist(), u.per_unit
        ([[0, 1], [2, 3]], 1)
    """
    layout = group.layout
    if not group.shared_across_heads:
        classes = [[h] for h in range(layout.shape[0])]
    else:
        # heads sharing all their channels (grouped-query attention: the q heads of one k/v
        # head; every head, for a parameter shared by all) are one effective head
        classes = head_classes(layout) or [list(range(layout.shape[0]))]
    rows = [_mean_by_channel(layout[heads], score[heads]) for heads in classes]
    if len({len(ids) for ids, _ in rows}) != 1:
        if not group.shared_across_heads:
            raise PlanError(WHERE, f"group {group.index} has heads with different channel "
                            "counts")
        rows = [_mean_by_channel(layout, score)]  # one effective head over every channel
    per_unit = max(1, layout.shape[1] // len(rows[0][0]))
    return Units(np.stack([ids for ids, _ in rows]), np.stack([m for _, m in rows]), per_unit)


def _mean_by_channel(ids: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct channel ids of ``ids`` and the mean score of the positions of each."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.bincount(inverse, weights=score.ravel(), minlength=len(uniq))
    return uniq, sums / np.bincount(inverse, minlength=len(uniq))


def head_classes(layout: np.ndarray) -> list[list[int]] | None:
    """Heads grouped by their set of channel ids when any two heads have either the same set
    or disjoint ones (None otherwise: channels shared across heads in some other pattern).

    Example:
        >>> import numpy as np
        >>> head_classes(np.array([[0, 1], [1, 2]])) is None   # overlapping, not equal
        True
    """
    classes: dict[frozenset, list[int]] = {}
    for h, row in enumerate(layout):
        classes.setdefault(frozenset(row.tolist()), []).append(h)
    sets = list(classes)
    for i, a in enumerate(sets):
        if any(a & b for b in sets[i + 1:]):
            return None
    return list(classes.values())
