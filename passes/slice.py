"""``slice``: physically remove gated-off channels.

Reads binary gates (from ``insert-gates`` + ``sync-head-ranks``) or an explicit ``keep`` plan
``{group index: bool (heads, size)}``, removes the gates, slices every coupled parameter
(Linear rows and columns, biases, convs, position embeddings, per-head bias tables) and
rewrites the graph's constants (view/reshape sizes, split sizes, slice bounds; SDPA gets its
original scale). The result carries ``gm.meta["fxprune.plan"]`` (parameter name ->
{dim: kept indices}).

Graph before and after (a fused qkv whose v part lost half its channels)::

    qkv: Linear(48, 144)      ->   qkv: Linear(48, 120)
    split(qkv, [48, 48, 48])  ->   split(qkv, [48, 48, 24])

Example:
    >>> import torch, fxprune
    >>> from fxprune.passes.slice import Slice
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> gm = fxprune.trace(m, torch.randn(2, 4)); a = fxprune.analyze(gm)
    >>> keep = {0: torch.arange(8).reshape(1, 8) < 4}
    >>> Slice(keep=keep)(gm).graph_module.get_submodule("2").in_features
    4
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.fx

from fxprune.analysis.engine import get_analysis
from fxprune.errors import InputError, PlanError, SliceError
from fxprune.meta import (
    ANALYSIS_FINGERPRINT_KEY,
    ANALYSIS_KEY,
    COMPS_KEY,
    GATE_PREFIX,
    GATES_KEY,
    INDICATOR_GATE_PREFIX,
    INDICATOR_PREFIX,
    INDICATORS_KEY,
    INPUT_SHAPES_KEY,
    PLAN_DATA_KEY,
    PLAN_KEY,
    SHAPE_KEY,
)
from fxprune.passbase import FxPass, PassResult, copy_graph_module
from fxprune.planning.plan import Plan
from fxprune.shapes import example_zeros, propagate_shapes
from fxprune.slicing import apply_slice

from .insert_gates import gate_modules


@dataclasses.dataclass(frozen=True)
class SliceOptions:
    keep: dict | None = None   # {group: bool array (heads, size)}; default: read the gates
    inplace: bool = False


class Slice(FxPass):
    name = "slice"
    Options = SliceOptions

    def __init__(self, options=None, **kwargs):
        if "keep" in kwargs and kwargs["keep"] is not None:
            kwargs["keep"] = {int(g): np.asarray(torch.as_tensor(m).cpu().numpy(), dtype=bool)
                              for g, m in kwargs["keep"].items()}
        super().__init__(options, **kwargs)

    def requires(self, gm):
        super().requires(gm)
        get_analysis(gm, self.name)
        if self.options.keep is None and not gm.meta.get(GATES_KEY):
            raise PlanError(self.name, "nothing says what to keep: no gates and no keep plan",
                            hint="run insert-gates and sync-head-ranks, or pass keep={group: "
                            "mask}")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        out = gm if self.options.inplace else copy_graph_module(gm)
        analysis = get_analysis(out, self.name)
        keep = dict(self.options.keep or {})
        if not keep:
            for group, gate in gate_modules(out).items():
                values = gate.values.detach()
                if not torch.all((values == 0) | (values == 1)):
                    raise PlanError(self.name, f"gate of group {group} is not binary",
                                    hint="run sync-head-ranks first")
                keep[group] = (values > 0.5).cpu().numpy()
        _validate(analysis, keep, self.name)
        changes = _remove_gates(out)
        shapes = {n: list(t.shape) for n, t in out.state_dict().items()}
        plan = apply_slice(out, analysis, keep, changes)
        out.meta[PLAN_DATA_KEY] = Plan.from_slice(out, analysis, keep, plan, shapes)
        out.graph.eliminate_dead_code()
        out.graph.lint()
        if not (plan or changes):  # else ensures() recompiles (once)
            out.recompile()
        out.meta[PLAN_KEY] = plan
        out.meta.pop(ANALYSIS_KEY, None)
        out.meta.pop(ANALYSIS_FINGERPRINT_KEY, None)
        out.meta.pop(GATES_KEY, None)
        shapes = out.meta.get(INPUT_SHAPES_KEY)
        for node in out.graph.nodes:
            for key in (COMPS_KEY, SHAPE_KEY, "val"):
                node.meta.pop(key, None)
        if shapes:
            try:
                propagate_shapes(out, example_zeros(out), where=self.name)
            except InputError as exc:  # the traced input shapes ran before: the slice is wrong
                raise SliceError(self.name, "the sliced graph does not run on the input shapes "
                                 f"it was traced with: {str(exc).splitlines()[0]}",
                                 node=exc.node, hint="this pattern is not sliced correctly: "
                                 "keep its groups dense (fxprune.prune(..., dense_sites=...) or "
                                 "leave the group out of keep) and report the model") from exc
        return PassResult(out, bool(plan), changes, {"plan": plan})


def _validate(analysis, keep, name) -> None:
    for group, mask in keep.items():
        if not 0 <= group < len(analysis.groups):
            raise PlanError(name, f"no group {group} (the analysis has {len(analysis.groups)})")
        g = analysis.groups[group]
        mask = np.asarray(mask, dtype=bool)
        if mask.size != g.layout.size:
            raise PlanError(name, f"keep mask of group {group} has {mask.size} entries, the "
                            f"group has {g.layout.size}")
        mask = mask.reshape(g.layout.shape)
        counts = mask.sum(axis=1)
        if counts.min() == 0 and not _whole_heads_removed(analysis, keep, g):
            raise PlanError(name, f"group {group} ({g.kind}) would keep no channel in head "
                            f"{int(np.argmin(counts))}", hint="keep at least one channel per "
                            "head, or remove the same whole heads from the site's qk and v "
                            "groups together")
        counts = counts[counts > 0]
        if len(set(counts.tolist())) > 1:
            raise PlanError(name, f"group {group} ({g.kind}) keeps different counts per head "
                            f"{counts.tolist()}", hint="run sync-head-ranks first")


def _whole_heads_removed(analysis, keep, g) -> bool:
    """A head may lose all its channels only together: the q/k and v groups of its attention
    site drop exactly the same heads (then the whole head, bias entries included, goes)."""
    if g.site is None or g.kind not in ("qk", "v"):
        return False
    site = analysis.attention[g.site]
    if site.heads_group is not None and analysis.groups[site.heads_group].frozen is not None:
        return False  # the heads are used across heads (mixed, averaged, combined)
    dropped = []
    for gi in (site.qk_group, site.v_group):
        if gi is None or gi not in keep:
            return False
        m = np.asarray(keep[gi], dtype=bool).reshape(analysis.groups[gi].layout.shape)
        dropped.append(tuple(np.nonzero(~m.any(axis=1))[0].tolist()))
    return dropped[0] == dropped[1] and len(dropped[0]) < site.num_heads


def _remove_gates(gm: torch.fx.GraphModule) -> list[str]:
    changes = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(
                (GATE_PREFIX, INDICATOR_GATE_PREFIX)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changes.append(f"removed gate {node.target}")
    for name, _ in list(gm.named_children()):
        if name.startswith((GATE_PREFIX, INDICATOR_GATE_PREFIX, INDICATOR_PREFIX)):
            delattr(gm, name)
    gm.meta.pop(INDICATORS_KEY, None)
    return changes
