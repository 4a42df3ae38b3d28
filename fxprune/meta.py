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
INPUT_DTYPES_KEY = "fxprune.input_dtypes"
#: the Analysis of this graph (written by fxprune.analyze)
ANALYSIS_KEY = "fxprune.analysis"
#: gate modules inserted by insert-gates, by group
GATES_KEY = "fxprune.gates"
#: indicator modules inserted by insert-indicators, by group
INDICATORS_KEY = "fxprune.indicators"
#: on a pruned model: original parameter name -> {dim: kept indices}
PLAN_KEY = "fxprune.plan"
MACS_RATIO_KEY = "fxprune.macs_ratio"
DENSE_MACS_KEY = "fxprune.dense_macs"
CRITERION_KEY = "fxprune.criterion"
#: per attention site and MLP: widths before and after
SUMMARY_KEY = "fxprune.summary"
#: on a refined AMAP model: whether it was physically sliced
SLICED_KEY = "fxprune.sliced"

# -- names of the submodules passes insert ------------------------------------------------
#: gates of insert-gates: ``fxprune_gate_g<group>_<sink>``
GATE_PREFIX = "fxprune_gate_"
#: gates of insert-indicators: ``fxprune_indgate_g<group>_<sink>``
INDICATOR_GATE_PREFIX = "fxprune_indgate_"
#: the indicators those gates read: ``fxprune_indicator_g<group>``
INDICATOR_PREFIX = "fxprune_indicator_"


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The concrete shape of a tensor-valued node (None when it is not a tensor or unknown).

    Reads the analysis' cached shape, else the ``val`` fxprune.trace propagated."""
    shape = node.meta.get(SHAPE_KEY)
    if shape is not None:
        return shape
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def node_comps(node: torch.fx.Node) -> Any:
    """The channel labels the analysis recorded on a node (None before fxprune.analyze)."""
    return node.meta.get(COMPS_KEY)


def input_shapes(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    """Shapes of the example inputs fxprune.trace was called with ([] when not traced by it)."""
    return list(gm.meta.get(INPUT_SHAPES_KEY) or [])


def has_shapes(gm: torch.fx.GraphModule) -> bool:
    """True when every tensor-producing node carries a shape (fxprune.trace ran on it)."""
    return any(isinstance(n.meta.get("val"), torch.Tensor) for n in gm.graph.nodes)
