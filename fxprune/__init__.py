"""fxprune: graph-transformation passes on torch.fx for structured pruning of vision
transformers.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> model = tiny_vit()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> analysis = fxprune.analyze(fxprune.trace(model, x))
    >>> [site.num_heads for site in analysis.attention]
    [3, 3]
"""

from fxprune.errors import (
    AnalysisError,
    FxPruneError,
    InputError,
    MissingShapesError,
    PassOrderError,
    PlanError,
    SliceError,
    TraceError,
)
from fxprune.tracing import trace

__all__ = [
    "AnalysisError", "FxPruneError", "InputError", "MissingShapesError", "PassOrderError",
    "PlanError", "SliceError", "TraceError", "trace", "prepare", "analyze", "count_macs", "prune",
    "Pruner", "Plan", "apply_plan", "zeroed_copy", "save", "load",
]


def __getattr__(name):  # lazy: keep `import fxprune` cheap and free of import cycles
    if name == "analyze":
        from fxprune.analysis.engine import analyze
        return analyze
    if name == "prepare":
        from fxprune.pipeline import prepare
        return prepare
    if name == "count_macs":
        from fxprune.macs import count_macs
        return count_macs
    if name in ("prune", "Pruner"):
        from fxprune.planning import oneshot
        return getattr(oneshot, name)
    if name in ("Plan", "apply_plan", "zeroed_copy"):
        from fxprune.planning import plan
        return getattr(plan, name)
    if name in ("save", "load"):
        from fxprune import serialization
        return getattr(serialization, name)
    if name == "Analysis":
        from fxprune.analysis.engine import Analysis
        return Analysis
    raise AttributeError(name)
