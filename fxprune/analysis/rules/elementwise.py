"""Rules for elementwise ops (channels pass through, equal dims of the operands couple),
tensor creation (unlabeled) and non-tensor ops (sizes, asserts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from fxprune.analysis.rules.common import pointwise
from fxprune.analysis.rules.registry import rule
from fxprune.ops import CAST, CREATION, NONTENSOR, POINTWISE

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


rule(*sorted(POINTWISE))(pointwise)


@rule(*sorted(CAST))
def _cast(p: Propagator, node) -> Any:
    """``x.type_as(y)``, ``x.to(y)``: the channels of ``x``; ``y`` only gives the dtype (as
    an operand it would couple q with v in ``q.type_as(v)``)."""
    x = p.tv(node.args[0]) if node.args else None
    val = node.meta.get("val")
    if x is None or not isinstance(val, torch.Tensor):
        return pointwise(p, node)
    out = p.pointwise([x], tuple(int(s) for s in val.shape))
    out.param = x.param
    return out


@rule(*sorted(CREATION))
def _creation(p: Propagator, node) -> Any:
    return p.unlabeled_like(node)


# ``getattr`` is a non-tensor op too, but the indexing rules follow it (``x.T``, ``x.mT``)
@rule(*sorted(NONTENSOR - {"getattr"}))
def _non_tensor(p: Propagator, node) -> Any:
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    return pointwise(p, node)
