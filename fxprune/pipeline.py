"""The standard preparation pipeline run before analysis by ``fxprune.prune`` and the CLI:
decompose opaque attention, normalise functional Linears, and split fused q/k/v reshapes so
Q/K and V can keep different head dims.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm, log = prepare(fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)))
    >>> [name for name, changed in log if changed]
    ['split-fused-heads']
"""

from __future__ import annotations

import torch.fx

from fxprune.meta import PREPARED_KEY


def default_passes() -> list:
    """The preparation passes, in order (instances of :class:`fxprune.passbase.FxPass`).
    split-fused-heads rewrites the graph in place: it changes no parameter, and the graph of a
    freshly traced module belongs to the caller."""
    from fxprune.passes.decompose_functional_linear import DecomposeFunctionalLinear
    from fxprune.passes.decompose_mha import DecomposeMultiheadAttention
    from fxprune.passes.decompose_window_attention import DecomposeWindowAttention
    from fxprune.passes.split_fused_heads import SplitFusedHeads

    return [DecomposeMultiheadAttention(), DecomposeWindowAttention(),
            DecomposeFunctionalLinear(), SplitFusedHeads(inplace=True)]


def prepare(gm: torch.fx.GraphModule, passes: list | None = None
            ) -> tuple[torch.fx.GraphModule, list[tuple[str, bool]]]:
    """Run the preparation passes; returns the new graph and ``[(pass name, modified)]``."""
    log = []
    for p in passes if passes is not None else default_passes():
        result = p(gm)
        gm = result.graph_module
        log.append((p.name, result.modified))
    gm.meta[PREPARED_KEY] = True
    return gm, log
