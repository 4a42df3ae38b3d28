"""The values channel propagation works on: :class:`TV` (the channel view of one tensor),
:class:`Sink` (where channels are contracted away), :class:`RawSite` (an attention site as
found), and small helpers over them. Split out of
:mod:`fxprune.analysis.propagate`, which re-exports
them.

Example:
    >>> import numpy as np
    >>> from fxprune.analysis.labels import Comp
    >>> tv = TV([Comp(np.arange(4).reshape(1, 4), (1,))], (2, 4))
    >>> align_ndim(tv, 3).shape, align_ndim(tv, 3).comps[0].span
    ((1, 2, 4), (2,))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.analysis.labels import Comp
from fxprune.meta import SHAPE_KEY, traced_shape

#: einsum-style letters the propagator names dims with
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TV:
    """Channel view of one tensor value: its comps, shape, whether it derives from parameters
    only (``soft``) and, when it is a parameter seen through a transpose, ``param``
    ``(qualified name, permutation)``. A parameter's full-shape comp is only built when an
    elementwise use needs it: contractions factor weights per dim instead."""

    __slots__ = ("_comps", "shape", "soft", "param", "_lazy")

    def __init__(self, comps, shape, soft=False, param=None, lazy=None):
        self._comps = comps
        self.shape = tuple(shape)
        self.soft = soft
        self.param = param
        self._lazy = lazy

    @property
    def comps(self) -> list[Comp]:
        if self._comps is None:
            self._comps = self._lazy()
            self._lazy = None
        return self._comps

    @comps.setter
    def comps(self, value) -> None:
        self._comps = value

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def spanned(self) -> set[int]:
        return {d for c in self.comps for d in c.span}


@dataclasses.dataclass
class Sink:
    """Where channels are contracted away: gating the operand here equals removing them."""

    node: torch.fx.Node
    arg: int | str          # positional index or kwarg name of the operand in ``node``
    comp: Comp              # comp of the operand whose channels are contracted
    kind: str               # "linear" | "qk" | "matmul" | "conv"


@dataclasses.dataclass
class RawSite:
    qk_node: torch.fx.Node
    q: Any
    k: Any
    q_comp: Comp
    k_comp: Comp
    head_labels: np.ndarray
    av_node: torch.fx.Node | None = None
    v: Any = None
    v_comp: Comp | None = None
    fused: bool = False      # one node (SDPA) does both products


def shape_of(node) -> tuple[int, ...] | None:
    """:func:`fxprune.meta.traced_shape`, cached in ``node.meta`` for the analysis."""
    if not isinstance(node, torch.fx.Node):
        return None
    cached = node.meta.get(SHAPE_KEY, False)
    if cached is not False:
        return cached
    shape = traced_shape(node)
    node.meta[SHAPE_KEY] = shape
    return shape


def align_ndim(v: TV, nd: int) -> TV:
    pad = nd - v.ndim
    if pad <= 0:
        return v
    comps = [Comp(c.lab.reshape((1,) * pad + c.lab.shape), tuple(d + pad for d in c.span), c.soft)
             for c in v.comps]
    return TV(comps, (1,) * pad + v.shape, v.soft, None)


def structure(val) -> Any:
    if isinstance(val, torch.Tensor):
        return TV([], tuple(int(s) for s in val.shape))
    if isinstance(val, (list, tuple)):
        return [structure(v) for v in val]
    return None


def iter_comps(value):
    if isinstance(value, TV):
        yield from value.comps
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_comps(v)


def comps_meta(value):
    if isinstance(value, TV):
        if value._comps is None:  # an unused parameter view: do not build its labels
            return []
        return [(c.lab, c.span) for c in value.comps]
    if isinstance(value, (list, tuple)):
        return [comps_meta(v) for v in value]
    return None
