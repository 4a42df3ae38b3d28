"""Channel rules: how each op moves, couples, contracts or freezes channel labels.

Rules register in :mod:`~fxprune.analysis.rules.registry` (``@rule("linear", "addmm")``,
``@module_rule(nn.LayerNorm)``); one module per family: ``elementwise``, ``movement``,
``indexing``, ``contraction``, ``normalization`` and ``modules``. Importing this package
registers them all. :func:`register_rule` teaches fxprune an op of your own; the building
blocks below cover most ops.
"""

from fxprune.analysis.rules import (  # noqa: F401  (imported to register their rules)
    contraction,
    elementwise,
    indexing,
    modules,
    movement,
    normalization,
)
from fxprune.analysis.rules.common import arg, pointwise, unknown
from fxprune.analysis.rules.contraction import conv, linear
from fxprune.analysis.rules.movement import permute, reshape
from fxprune.analysis.rules.normalization import normalize
from fxprune.analysis.rules.registry import module_rule, register_rule, rule

__all__ = ["arg", "conv", "linear", "module_rule", "normalize", "permute", "pointwise",
           "register_rule", "reshape", "rule", "unknown"]
