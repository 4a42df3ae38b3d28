"""Shared checks for the central invariants (used by several test files).

* ``zeroed_original``: the ORIGINAL model with the plan's not-kept entries set to zero, the
  check anyone can run on a pruned model without trusting fxprune (DESIGN.md section 3).
* ``gated_and_sliced``: the same binary masks applied as gates and as slicing.
"""

from __future__ import annotations

import copy

import torch

from fxprune.passes.insert_gates import InsertGates, gate_modules
from fxprune.passes.slice import Slice


def zeroed_original(model: torch.nn.Module, plan: dict) -> torch.nn.Module:
    zeroed = copy.deepcopy(model)
    tensors = dict(zeroed.named_parameters(remove_duplicate=False))
    tensors.update(dict(zeroed.named_buffers(remove_duplicate=False)))
    for name, dims in plan.items():
        assert name in tensors, f"plan names {name!r}, which the original model does not have"
        t = tensors[name]
        with torch.no_grad():
            for dim, kept in dims.items():
                drop = torch.ones(t.shape[dim], dtype=torch.bool)
                drop[kept] = False
                index = [slice(None)] * t.ndim
                index[dim] = drop
                t[tuple(index)] = 0
    return zeroed


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
