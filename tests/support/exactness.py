"""Shared checks for the central invariants (used by several test files).

* ``zeroed_original``: the ORIGINAL model with the plan's not-kept entries set to zero, the
  check anyone can run on a pruned model without trusting fxprune (``docs/guarantees.md``).
* ``gated_and_sliced``: the same binary masks applied as gates and as slicing.
"""

from __future__ import annotations

import torch

from fxprune.passes.insert_gates import InsertGates, gate_modules
from fxprune.passes.slice import Slice
from fxprune.planning.plan import zeroed_copy

#: the library's own reference builder; tests use it under the name the docs give the check
zeroed_original = zeroed_copy


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def gated_and_sliced(gm, masks):
    gated = InsertGates()(gm).graph_module
    for group, gate in gate_modules(gated).items():
        gate.set_mask(torch.as_tensor(masks[group]) if group in masks else
                      torch.ones_like(gate.values, dtype=torch.bool))
    sliced = Slice(keep=masks)(gm).graph_module
    return gated, sliced


def outputs(module, x):
    with torch.no_grad():
        out = module(x)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return out
