"""Rules for elementwise ops (channels pass through, equal dims of the operands couple),
tensor creation (unlabeled) and non-tensor ops (sizes, asserts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from fxprune.analysis.rules.common import pointwise
from fxprune.analysis.rules.registry import rule
from fxprune.ops import CREATION, NONTENSOR, POINTWISE

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


rule(*sorted(POINTWISE))(pointwise)


@rule(*sorted(CREATION))
def _creation(p: Propagator, node) -> Any:
    return p.unlabeled_like(node)


# ``getattr`` is a non-tensor op too, but the indexing rules follow it (``x.T``, ``x.mT``)
@rule(*sorted(NONTENSOR - {"getattr"}))
def _non_tensor(p: Propagator, node) -> Any:
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    return pointwise(p, node)
