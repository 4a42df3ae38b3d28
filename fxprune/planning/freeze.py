"""Freeze, before planning, every group the slicer cannot slice exactly.

The analysis proves which channels are coupled; the slicer must then turn a keep mask into a
smaller graph (dense parameter slices, rewritten reshapes and split sizes) that computes what
the gated model computes. Where it cannot (a structure it does not know how to rewrite), the
whole model used to be lost at slicing time. Here every prunable group is tried first: a
trial keep mask (half of each head's units, different ones in every head) is sliced on a copy,
the copy must run, and its outputs must equal the gated model's on the example inputs. Groups
that fail are found by bisection and frozen with the reason, so the plan only ever hands the
slicer groups it has sliced once already; the rest of the model is pruned as usual.

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> x = torch.randn(1, 3, 32, 32)
    >>> gm = fxprune.trace(tiny_vit().eval(), x); a = fxprune.analyze(gm)
    >>> ids = [g.index for g in a.groups if g.prunable]
    >>> sorted(freeze_unsliceable(gm, a, ids, (x,)).values())[0]  # one fused qkv: q/k, v apart
    'slicing it fails: [slice] kept entries of a (3, 3, 16) tensor do not form a dense tensor ...'
    >>> gm = fxprune.prepare(gm)[0]; a = fxprune.analyze(gm)   # split-fused-heads first
    >>> freeze_unsliceable(gm, a, [g.index for g in a.groups if g.prunable], (x,))
    {}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree

from fxprune.errors import FxPruneError

#: outputs of the sliced trial may differ from the gated model's by this much (relative)
TOLERANCE = 1e-4


def trial_masks(analysis, groups: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    """A keep mask per group that drops about half of every head's units, chosen at random
    per head (so heads keep different indices wherever the group allows it)."""
    from fxprune.planning.allocation import KeptChannels, keep_masks

    rng = np.random.default_rng(seed)
    masks = {}
    for gi in groups:
        g = analysis.groups[gi]
        units = len(np.unique(g.layout[0]))
        if units < 2:
            continue
        scores = {gi: rng.random(g.layout.shape)}
        masks.update(keep_masks(analysis, scores, [KeptChannels(gi, units // 2)]))
    return masks


def shape_failure(analysis, masks: dict[int, np.ndarray]) -> str | None:
    """Why the sliced shapes of ``masks`` cannot be dense tensors, or None: a cheap check
    (no copy, no run) of every sliced parameter and every member node's new shape."""
    from fxprune.slicing import label_keep, new_shape, param_masks, sizes_from_mask

    try:
        lab_keep = label_keep(analysis, masks)
        for mask in param_masks(analysis, lab_keep).values():
            sizes_from_mask(mask)
        for node in {n for gi in masks for n, _ in analysis.groups[gi].members}:
            new_shape(node, lab_keep)
    except FxPruneError as exc:
        return f"slicing it fails: {str(exc).splitlines()[0]}"
    return None


def slice_failure(gm: torch.fx.GraphModule, masks: dict[int, np.ndarray],
                  example_inputs: tuple) -> str | None:
    """Why slicing ``gm`` with ``masks`` is not exact, or None when it is: the sliced copy
    must build, run and give the gated model's outputs on ``example_inputs``."""
    from fxprune.passes.insert_gates import InsertGates, gate_modules
    from fxprune.passes.slice import Slice

    try:
        sliced = Slice(keep=masks)(gm).graph_module
        gated = InsertGates(groups=tuple(masks))(gm).graph_module
        for group, gate in gate_modules(gated).items():
            gate.set_mask(torch.as_tensor(masks[group]))
        with torch.no_grad():
            got = [t for t in pytree.tree_leaves(sliced(*example_inputs))
                   if isinstance(t, torch.Tensor)]
            want = [t for t in pytree.tree_leaves(gated(*example_inputs))
                    if isinstance(t, torch.Tensor)]
    except FxPruneError as exc:
        return f"slicing it fails: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - any failure of the trial means "cannot slice"
        return f"slicing it fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return "the sliced graph returns outputs of other shapes than the gated one"
    for a, b in zip(got, want):
        if not a.is_floating_point():
            continue
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if a.numel() else 0.0
        if not err <= TOLERANCE:  # also catches NaN
            return (f"the sliced graph does not compute what the gated one does (relative "
                    f"error {err:.1e} on the example inputs)")
    return None


def freeze_unsliceable(gm: torch.fx.GraphModule, analysis, groups: list[int],
                       example_inputs: tuple, seed: int = 0) -> dict[int, str]:
    """Try slicing ``groups``; freeze (``group.frozen = reason``) every one that cannot be
    sliced exactly and return ``{group index: reason}``. Groups are tried together first and
    bisected only on failure, so a model whose groups all slice costs one trial."""
    frozen = unsliceable(gm, analysis, trial_masks(analysis, groups, seed), example_inputs)
    for gi, reason in frozen.items():
        analysis.groups[gi].frozen = reason
    return frozen


def unsliceable(gm: torch.fx.GraphModule, analysis, masks: dict[int, np.ndarray],
                example_inputs: tuple) -> dict[int, str]:
    """``{group: reason}`` for the groups of ``masks`` that cannot be sliced exactly with
    their mask: a cheap shape check first, then trial slices, bisected on failure."""
    frozen: dict[int, str] = {}
    for gi in masks:
        why = shape_failure(analysis, {gi: masks[gi]})
        if why is not None:
            frozen[gi] = why
    candidates = [gi for gi in masks if gi not in frozen]
    _bisect(gm, masks, candidates, example_inputs, frozen)
    # groups that slice alone yet fail together: add them one by one
    rest = [gi for gi in candidates if gi not in frozen]
    if rest and slice_failure(gm, {gi: masks[gi] for gi in rest}, example_inputs):
        accepted: list[int] = []
        for gi in rest:
            why = slice_failure(gm, {g: masks[g] for g in accepted + [gi]}, example_inputs)
            if why is None:
                accepted.append(gi)
            else:
                frozen[gi] = f"{why} (together with other groups)"
    return frozen


def _bisect(gm, masks, groups: list[int], example_inputs, frozen: dict[int, str]) -> None:
    if not groups:
        return
    why = slice_failure(gm, {gi: masks[gi] for gi in groups}, example_inputs)
    if why is None:
        return
    if len(groups) == 1:
        frozen[groups[0]] = why
        return
    half = len(groups) // 2
    _bisect(gm, masks, groups[:half], example_inputs, frozen)
    _bisect(gm, masks, groups[half:], example_inputs, frozen)


def as_inputs(example_inputs) -> tuple:
    """``example_inputs`` as the positional arguments of a call."""
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)
