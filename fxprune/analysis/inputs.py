"""What :func:`fxprune.analyze` accepts, and what it says when the graph is not ready.

``fxprune.analyze(model, example_inputs)`` traces and prepares (decomposes opaque attention)
itself; ``fxprune.analyze(gm)`` reads the graph as it is and names the attention modules it
cannot see into together with the call that decomposes them; an ExportedProgram's
``graph_module`` (parameters lifted to graph inputs) is refused with what to pass instead.

Example:
    >>> import torch, fxprune
    >>> mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = mha
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> x = torch.randn(1, 5, 16)
    >>> opaque_attention(fxprune.trace(Block(), x))
    [('attn', 'nn.MultiheadAttention')]
    >>> [s.num_heads for s in fxprune.analyze(Block(), x).attention]   # traced + prepared
    [2]
"""

from __future__ import annotations

import warnings

import torch
import torch.fx

from fxprune.errors import InputError
from fxprune.meta import PREPARED_KEY

WHERE = "fxprune.analyze"
PREPARE_CALL = "gm, _ = fxprune.pipeline.prepare(gm)"


def lifted_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Placeholders of ``gm`` that are parameters or buffers lifted to graph inputs by
    torch.export (an ``ExportedProgram.graph_module``); [] for a module-style graph."""
    if any(True for _ in gm.parameters()) or any(True for _ in gm.buffers()):
        return []
    lifted = [n.name for n in gm.graph.nodes if n.op == "placeholder"
              and n.name.startswith(("p_", "b_", "c_"))]
    aten = any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes
               if n.op == "call_function")
    return lifted if lifted and aten else []


def check_not_lifted(gm: torch.fx.GraphModule, where: str = WHERE) -> None:
    """Refuse an ExportedProgram's ``graph_module`` with what to pass instead."""
    lifted = lifted_inputs(gm)
    if lifted:
        raise InputError(where, f"this is an ExportedProgram's graph_module: its parameters "
                         f"are graph inputs ({', '.join(lifted[:3])}, ... {len(lifted)} in "
                         "all), so there are no weights to analyse or slice",
                         hint="pass the ExportedProgram itself: fxprune.analyze(ep, x) or "
                         "fxprune.trace(ep, x)")


def opaque_attention(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """``(node, what)`` for every attention call the preparation passes decompose and the
    analysis cannot see into (nn.MultiheadAttention, torchvision's shifted window attention)."""
    from fxprune.passes.decompose_window_attention import wrapped_functions

    table = wrapped_functions(helpers=False)
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   torch.nn.MultiheadAttention):
            found.append((node.name, "nn.MultiheadAttention"))
        elif node.op == "call_function":
            try:
                label = table.get(node.target)
            except TypeError:  # unhashable target
                label = None
            if label:
                found.append((node.name, label))
    return found


def graph_to_analyze(model, example_inputs, prepare: bool) -> torch.fx.GraphModule:
    """The GraphModule :func:`fxprune.analyze` reads: ``model`` itself when it is a traced
    GraphModule and no inputs are given, else ``trace`` (+ ``prepare``) of it."""
    from fxprune.tracing import trace

    if isinstance(model, torch.fx.GraphModule) and example_inputs is None:
        check_not_lifted(model)
        return model
    if example_inputs is None:
        example_inputs = _exported_inputs(model)
    if example_inputs is None:
        raise InputError(WHERE, f"expected a GraphModule, got {type(model).__name__} without "
                         "example inputs", hint="call fxprune.analyze(model, example_inputs)")
    if isinstance(model, torch.fx.GraphModule):
        check_not_lifted(model)
    gm = trace(model, example_inputs)
    if prepare:
        from fxprune.pipeline import prepare as run_prepare

        gm, _ = run_prepare(gm)
    return gm


def _exported_inputs(model):
    cls = getattr(torch.export, "ExportedProgram", None)
    if cls is not None and isinstance(model, cls) and model.example_inputs:
        return tuple(model.example_inputs[0])
    return None


def warn_opaque(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Warn (and return them) when an unprepared graph has attention the analysis cannot see
    into: its sites are not found until the preparation passes decompose it."""
    if gm.meta.get(PREPARED_KEY):
        return []
    found = opaque_attention(gm)
    if found:
        names = ", ".join(f"{n} ({w})" for n, w in found[:3])
        warnings.warn(f"fxprune.analyze: {len(found)} opaque attention call(s) not analysed "
                      f"({names}{', ...' if len(found) > 3 else ''}): their sites are found "
                      f"after `{PREPARE_CALL}`, or call fxprune.analyze(model, example_inputs)"
                      ", which traces and prepares", stacklevel=3)
    return found
