"""Every metadata key fxprune writes, in one place, and the accessors that read them.

Node keys live in ``node.meta``; GraphModule keys in ``gm.meta``. All start with
``fxprune.`` so they never collide with torch's own keys (``val``, ``tensor_meta``, ...).

Example:
    >>> import torch, fxprune
    >>> from fxprune.meta import node_shape, input_shapes
    >>> gm = fxprune.trace(torch.nn.Linear(4, 2), torch.randn(3, 4))
    >>> output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    >>> input_shapes(gm), node_shape(output)
    ([(3, 4)], (3, 2))
"""

from __future__ import annotations

from typing import Any

import torch.fx

from fxprune.errors import MissingShapesError

PREFIX = "fxprune."

# -- node.meta --------------------------------------------------------------------------
#: concrete shape of a tensor-valued node (a tuple of ints), written by the analysis
SHAPE_KEY = "fxprune.shape"
#: channel labels of a node's value, written by the analysis (read by slicing)
COMPS_KEY = "fxprune.comps"
#: on a canonical Linear: which parameters are its weight and bias
LINEAR_KEY = "fxprune.linear"
#: on nodes a decompose pass wrote: the module or function they replace
DECOMPOSED_FROM_KEY = "fxprune.decomposed_from"

# -- gm.meta ----------------------------------------------------------------------------
#: how the shapes were propagated ("meta" or "real")
SHAPE_PROP_KEY = "fxprune.shape_prop"
#: what fxprune.trace was given ("module", "graph_module", "exported_program", ...)
TRACED_FROM_KEY = "fxprune.traced_from"
#: set when torch.fx could not trace the module and torch.export did: why fx failed
TRACE_FALLBACK_KEY = "fxprune.trace_fallback"
INPUT_SHAPES_KEY = "fxprune.input_shapes"
#: True once fxprune.pipeline.prepare ran on the graph (a Plan re-runs it when applied)
PREPARED_KEY = "fxprune.prepared"
INPUT_DTYPES_KEY = "fxprune.input_dtypes"
#: calls a decompose pass inlined with the traced sizes as constants (the graph then runs at
#: the traced input size only; "batch free" where the batch size stays dynamic)
FIXED_SIZES_KEY = "fxprune.fixed_sizes"
#: the Analysis of this graph (written by fxprune.analyze)
ANALYSIS_KEY = "fxprune.analysis"
#: fingerprint of the graph the analysis describes (fxprune.analysis.fingerprint)
ANALYSIS_FINGERPRINT_KEY = "fxprune.analysis_fingerprint"
#: gate modules inserted by insert-gates, by group
GATES_KEY = "fxprune.gates"
#: indicator modules inserted by insert-indicators, by group
INDICATORS_KEY = "fxprune.indicators"
#: on a pruned model: original parameter name -> {dim: kept indices}
PLAN_KEY = "fxprune.plan"
#: on a sliced model: the fxprune.Plan (plain data, JSON, re-applicable to a fresh model)
PLAN_DATA_KEY = "fxprune.plan_data"
MACS_RATIO_KEY = "fxprune.macs_ratio"
DENSE_MACS_KEY = "fxprune.dense_macs"
CRITERION_KEY = "fxprune.criterion"
#: per attention site and MLP: widths before and after
SUMMARY_KEY = "fxprune.summary"
#: on a pruned model: what could not be pruned and why (frozen groups, what blocked the target)
REPORT_KEY = "fxprune.report"
#: on a refined AMAP model: whether it was physically sliced
SLICED_KEY = "fxprune.sliced"

# -- names of the submodules passes insert ------------------------------------------------
#: gates of insert-gates: ``fxprune_gate_g<group>_<sink>``
GATE_PREFIX = "fxprune_gate_"
#: gates of insert-indicators: ``fxprune_indgate_g<group>_<sink>``
INDICATOR_GATE_PREFIX = "fxprune_indgate_"
#: the indicators those gates read: ``fxprune_indicator_g<group>``
INDICATOR_PREFIX = "fxprune_indicator_"


def traced_shape(node: Any) -> tuple[int, ...] | None:
    """The concrete shape of ``node.meta["val"]``, the value fxprune.trace (or a pass's
    refresh) propagated; None for a non-node, a non-tensor value or symbolic sizes."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except Exception:  # noqa: BLE001 - symbolic sizes without a hint
        return None


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The concrete shape of a tensor-valued node (None when it is not a tensor or unknown).

    Reads the analysis' cached shape, else :func:`traced_shape`."""
    shape = node.meta.get(SHAPE_KEY)
    return shape if shape is not None else traced_shape(node)


def node_comps(node: torch.fx.Node) -> Any:
    """The channel labels the analysis recorded on a node (None before fxprune.analyze)."""
    return node.meta.get(COMPS_KEY)


def input_shapes(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    """Shapes of the example inputs fxprune.trace was called with ([] when not traced by it)."""
    return list(gm.meta.get(INPUT_SHAPES_KEY) or [])


def missing_shape(gm: torch.fx.GraphModule, inputs_only: bool = False
                  ) -> torch.fx.Node | None:
    """The first node without a traced value (``node.meta["val"]``): a graph input, or (unless
    ``inputs_only``) a node whose result is used (shape propagation records no value for ops
    returning None, such as ``torch._assert``, which nothing uses). None when fxprune.trace
    ran on ``gm``."""
    for n in gm.graph.nodes:
        if "val" not in n.meta and (n.op == "placeholder" or (
                not inputs_only and n.op != "output" and n.users)):
            return n
    return None


def has_shapes(gm: torch.fx.GraphModule) -> bool:
    """True when every graph input and every used value carries a shape (fxprune.trace ran).

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> has_shapes(fxprune.trace(m, torch.randn(3, 4))), has_shapes(torch.fx.symbolic_trace(m))
        (True, False)
    """
    return missing_shape(gm) is None


def require_shapes(where: str, gm: torch.fx.GraphModule) -> None:
    """Raise :class:`~fxprune.errors.MissingShapesError` naming ``where`` and the first graph
    input without a shape (what a pass or the analysis needs: it propagates or reads the
    rest, and a rewrite leaves new nodes without values until it refreshes them)."""
    node = missing_shape(gm, inputs_only=True)
    if node is not None:
        raise MissingShapesError(where, "the graph has no shape metadata (node.meta['val'])",
                                 node=node, hint="run fxprune.trace(model, example_inputs) "
                                 f"before {where}")
