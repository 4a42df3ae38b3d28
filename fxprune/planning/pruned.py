"""What :func:`fxprune.prune` does to a sliced graph before handing it back: its tensors
copied off the model's, its plan restricted to the model's own tensor names, the per-site
summary, and the warning that it runs at the traced size only where preparation fixed sizes.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> before = storages_of(gm)
    >>> own_tensors(gm, before)
    >>> storages_of(gm) & before
    set()
"""

from __future__ import annotations

import copy
import warnings

import torch

from fxprune.meta import (
    ANALYSIS_FINGERPRINT_KEY,
    ANALYSIS_KEY,
    FIXED_SIZES_KEY,
    INPUT_SHAPES_KEY,
    PLAN_DATA_KEY,
    PLAN_KEY,
)


def note_fixed_sizes(prepared, pruned, stacklevel: int = 3) -> None:
    """Say so (warning, meta, plan) when preparation inlined attention with the traced sizes:
    the pruned model then runs at the traced input size only, whatever the dense model took."""
    fixed = prepared.meta.get(FIXED_SIZES_KEY) or pruned.meta.get(FIXED_SIZES_KEY)
    if not fixed:
        return
    pruned.meta[FIXED_SIZES_KEY] = list(fixed)
    pruned.meta[PLAN_DATA_KEY].info["fixed_sizes"] = list(fixed)
    shapes = pruned.meta.get(INPUT_SHAPES_KEY) or []
    batch_free = all("batch free" in f for f in fixed)
    warnings.warn(f"fxprune.prune: the pruned model runs at the traced input size only "
                  f"({', '.join(str(tuple(s)[1:]) for s in shapes)} after the batch dim"
                  f"{'; any batch size' if batch_free else ', and the traced batch size'}): "
                  f"{len(fixed)} opaque call(s) were decomposed with the traced sizes as "
                  f"constants ({', '.join(fixed[:2])}{', ...' if len(fixed) > 2 else ''}); "
                  "prune at the resolution you deploy at", stacklevel=stacklevel)


def restrict_plan_to_model(pruned, model) -> None:
    """The plan names the model's own parameters and buffers only: a tensor constant the
    tracer created (a plain tensor attribute, e.g. a rotary table, becomes
    ``_tensor_constant0``) is sliced in the pruned graph but has no name in the model."""
    plan = pruned.meta.get(PLAN_KEY)
    if not plan:
        return
    if isinstance(model, torch.nn.Module):
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    elif hasattr(model, "state_dict") and hasattr(model, "constants"):  # ExportedProgram
        names = set(model.state_dict) | set(model.constants)
    else:
        return
    pruned.meta[PLAN_KEY] = {k: v for k, v in plan.items() if k in names}


def storages_of(gm) -> set[int]:
    """Data pointers of the storages behind ``gm``'s parameters and buffers."""
    tensors = [t for _, t in gm.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in gm.named_buffers(remove_duplicate=False)]
    return {t.untyped_storage().data_ptr() for t in tensors
            if t.device.type != "meta" and t.numel()}


def own_tensors(gm, storages: set[int]) -> None:
    """Replace every parameter and buffer of ``gm`` whose storage is one of ``storages`` (the
    model's) by a copy, so that the pruned model never shares memory with the original; tied
    names stay one tensor."""
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.device.type == "meta" or not t.numel() or \
                        t.untyped_storage().data_ptr() not in storages:
                    continue
                if id(t) not in copies:
                    new = t.detach().clone()
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    copies[id(t)] = new
                table[name] = copies[id(t)]


def dense_copy(gm):
    out = copy.deepcopy(gm)
    out.meta.pop(ANALYSIS_KEY, None)
    out.meta.pop(ANALYSIS_FINGERPRINT_KEY, None)
    out.meta[PLAN_KEY] = {}
    return out


def summary_rows(analysis, masks) -> list[dict]:
    """Per attention site and MLP: widths before and after (for reports)."""
    rows = []
    for s in analysis.attention:
        row = {"site": s.index, "kind": s.kind, "heads": s.num_heads,
               "heads_after": s.num_heads, "qk_dim": s.qk_head_dim, "v_dim": s.v_head_dim,
               "qk_dim_after": s.qk_head_dim, "v_dim_after": s.v_head_dim}
        for gi, key in ((s.qk_group, "qk_dim_after"), (s.v_group, "v_dim_after")):
            if gi in masks:
                per_head = masks[gi].sum(axis=1)
                row[key] = int(per_head.max())
                row["heads_after"] = int((per_head > 0).sum())
        rows.append(row)
    for g in analysis.groups:
        if g.kind == "mlp":
            rows.append({"group": g.index, "kind": "mlp", "width": g.width,
                         "width_after": int(masks[g.index].sum()) if g.index in masks
                         else g.width, "frozen": g.frozen})
    return rows
