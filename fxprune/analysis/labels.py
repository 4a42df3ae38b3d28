"""Channel labels: the bookkeeping under the coupling analysis.

Every channel position of every tensor gets an integer *label*. A tensor's channel information
is a list of :class:`Comp` (components): each is a label array broadcastable to the tensor's
shape, full-size on the dims it ``span``\\s and size 1 elsewhere. Ops relate labels:

* ``union`` (channel coupling): the positions must be kept or removed together, e.g. row ``i``
  of a Linear and column ``i`` of the next one, or q's channel ``(h, d)`` and k's ``(h, d)``;
* ``head_union`` (head membership): the positions live in the same attention head;
* ``freeze``: removing the position would change other values (LayerNorm over it, softmax
  over it, output of the model, an op fxprune does not know), so it must stay.

Example:
    >>> store = LabelStore()
    >>> a, b = store.fresh((4,)), store.fresh((4,))
    >>> store.union(a, b)
    >>> comp = store.finish()
    >>> bool((comp.channel_of(a) == comp.channel_of(b)).all())
    True
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Comp:
    """One channel component of a tensor value.

    ``lab`` has ``ndim`` equal to the tensor's; it is full-size on ``span`` dims and 1 elsewhere.
    ``soft`` means the labels come from parameters only: a soft dim is not yet known to be a
    channel dim (a position embedding's token dim becomes a plain dim when added to tokens).
    """

    lab: np.ndarray
    span: tuple[int, ...]
    soft: bool = False

    @property
    def distinct(self) -> int:
        return int(self.lab.size)

    def moved(self, lab: np.ndarray, span) -> Comp:
        return Comp(lab, tuple(sorted(span)), self.soft)


class LabelStore:
    """Allocates labels and records the relations between them; :meth:`finish` solves them."""

    def __init__(self) -> None:
        self.count = 0
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self._head_a: list[np.ndarray] = []
        self._head_b: list[np.ndarray] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.kind_marks: list[tuple[np.ndarray, str]] = []
        # (activation labels, parameter labels, activation span, parameter span): a parameter
        # broadcast over part of an activation's channel dims, resolved by head_order
        self.subset_params: list[tuple[np.ndarray, np.ndarray, tuple, tuple]] = []
        # (labels (parts, per part), what): channels an op reads in equal parts (a grouped
        # convolution); resolved into group layouts by grouping.adopt_split_layouts
        self.splits: list[tuple[np.ndarray, str]] = []

    def fresh(self, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        lab = np.arange(self.count, self.count + n, dtype=np.int64).reshape(shape)
        self.count += n
        return lab

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        self._edges_a.append(a.ravel().copy())
        self._edges_b.append(b.ravel().copy())

    def collapse(self, lab: np.ndarray, axis: int) -> np.ndarray:
        """Union every label along ``axis`` with the first one and drop the axis to size 1."""
        if lab.shape[axis] > 1:
            first = np.take(lab, [0], axis=axis)
            self.union(lab, first)
            lab = first
        return lab

    def head_union_along(self, a: np.ndarray, b: np.ndarray, axis: int) -> None:
        """For each index ``i`` along ``axis``: every label of ``a`` at ``i`` and every label of
        ``b`` at ``i`` are in the same head."""
        n = max(a.shape[axis], b.shape[axis])
        if n <= 1 and a.shape[axis] == b.shape[axis]:
            rep_a = a.ravel()[:1]
            rep_b = b.ravel()[:1]
            self._head(a.ravel(), np.broadcast_to(rep_a, a.ravel().shape))
            self._head(b.ravel(), np.broadcast_to(rep_b, b.ravel().shape))
            self._head(rep_a, rep_b)
            return
        am = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        bm = np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1)
        am = np.broadcast_to(am, (n, am.shape[1]))
        bm = np.broadcast_to(bm, (n, bm.shape[1]))
        self._head(am, am[:, :1])
        self._head(bm, bm[:, :1])
        self._head(am[:, 0], bm[:, 0])

    def head_union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Every label of ``a`` is in the same head as the label of ``b`` it broadcasts with."""
        self._head(a, b)

    def _head(self, a, b) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self._head_a.append(a.ravel().copy())
        self._head_b.append(b.ravel().copy())

    def freeze(self, lab: np.ndarray, reason: str) -> None:
        """The channels of ``lab`` must stay, because of ``reason`` (their group is frozen)."""
        lab = np.asarray(lab).ravel().copy()
        log.debug("freeze %d channel labels: %s", lab.size, reason)
        self.frozen.append((lab, reason))

    def split(self, lab: np.ndarray, what: str) -> None:
        """The channels of ``lab`` (shape ``(parts, per part)``) are read part by part by an
        op that needs the same count kept in every part (``what`` says which op)."""
        self.splits.append((np.asarray(lab).copy(), what))

    def mark(self, lab: np.ndarray, kind: str) -> None:
        self.kind_marks.append((np.asarray(lab).ravel().copy(), kind))

    def finish(self) -> Components:
        return Components(self)


def _components(n: int, a_list, b_list) -> np.ndarray:
    if not a_list:
        return np.arange(n, dtype=np.int64)
    a = np.concatenate(a_list)
    b = np.concatenate(b_list)
    graph = scipy.sparse.coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return comp.astype(np.int64)


class Components:
    """Solved relations: ``channel_of[label]`` (coupled positions share a channel id),
    ``head_of[label]``, and the freeze reasons per channel."""

    def __init__(self, store: LabelStore) -> None:
        n = store.count
        self.n_labels = n
        self.channel = _components(n, store._edges_a, store._edges_b)
        self.head = _components(n, store._head_a + store._edges_a, store._head_b + store._edges_b)
        # heads from head relations alone: coupling through a parameter shared by every head
        # (a q/k LayerNorm weight, a rotary table) does not make the heads one here
        self.head_only = _components(n, store._head_a, store._head_b)
        self.frozen_reason: dict[int, str] = {}
        for lab, reason in store.frozen:
            for ch in np.unique(self.channel[lab]):
                self.frozen_reason.setdefault(int(ch), reason)
        self.marks: dict[str, np.ndarray] = {}
        for lab, kind in store.kind_marks:
            ch = np.unique(self.channel[lab])
            prev = self.marks.get(kind)
            self.marks[kind] = ch if prev is None else np.union1d(prev, ch)

    def channel_of(self, lab: np.ndarray) -> np.ndarray:
        return self.channel[lab]

    def head_of(self, lab: np.ndarray) -> np.ndarray:
        return self.head[lab]
