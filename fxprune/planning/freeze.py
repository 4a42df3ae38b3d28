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
    return Trials(gm, masks, example_inputs).full(list(masks))


class Trials:
    """Trial slices of ``gm`` with subsets of ``masks``, each set of groups tried once.

    :meth:`sliced` only slices (the slice pass builds the smaller graph and propagates its
    shapes: cheap, and where shapes no longer fit it fails here already); :meth:`full` also
    runs the sliced copy and the gated model on the example inputs and compares them (two
    forward passes). The copies share ``gm``'s parameters (slicing replaces tensors, it never
    writes into them) but not its buffers, which a forward pass may update in place (batch
    norm statistics in training mode).

    Example:
        >>> import torch, fxprune
        >>> from fxprune.models.reference import tiny_vit
        >>> x = torch.randn(1, 3, 32, 32)
        >>> gm = fxprune.prepare(fxprune.trace(tiny_vit().eval(), x))[0]
        >>> a = fxprune.analyze(gm); ids = [g.index for g in a.groups if g.prunable]
        >>> trials = Trials(gm, trial_masks(a, ids), (x,))
        >>> trials.sliced(ids), trials.full(ids)
        (None, None)
    """

    def __init__(self, gm: torch.fx.GraphModule, masks: dict[int, np.ndarray],
                 example_inputs: tuple):
        self.gm, self.masks, self.example_inputs = gm, masks, example_inputs
        self._sliced: dict[frozenset, str | None] = {}
        self._full: dict[frozenset, str | None] = {}
        self._last: tuple[frozenset, torch.fx.GraphModule] | None = None
        self._params = {id(t): t for _, t in gm.named_parameters(remove_duplicate=False)}

    def _copy(self) -> torch.fx.GraphModule:
        from fxprune.passbase import copy_graph_module

        return copy_graph_module(self.gm, memo=dict(self._params))

    def sliced(self, groups: list[int]) -> str | None:
        """Why slicing ``groups`` fails, or None where the sliced graph builds."""
        from fxprune.passes.slice import Slice

        key = frozenset(groups)
        if key not in self._sliced:
            self._last = None
            try:
                out = Slice(keep=self._keep(groups), inplace=True)(self._copy()).graph_module
                self._last = (key, out)
                self._sliced[key] = None
            except Exception as exc:  # noqa: BLE001 - any failure of the trial: cannot slice
                self._sliced[key] = _failure(exc)
        return self._sliced[key]

    def full(self, groups: list[int]) -> str | None:
        """Why slicing ``groups`` is not exact, or None where the sliced copy computes what
        the gated model computes."""
        key = frozenset(groups)
        if key not in self._full:
            why = self.sliced(groups)
            if why is None:
                if self._last is None or self._last[0] != key:
                    self._sliced.pop(key)
                    self.sliced(groups)
                why = self._compare(self._last[1], groups)
            self._last = None  # the sliced copy is not needed again
            self._full[key] = why
        return self._full[key]

    def _keep(self, groups: list[int]) -> dict[int, np.ndarray]:
        return {gi: self.masks[gi] for gi in groups}

    def _compare(self, sliced: torch.fx.GraphModule, groups: list[int]) -> str | None:
        from fxprune.passes.insert_gates import InsertGates, gate_modules

        try:
            gated = InsertGates(groups=tuple(groups), inplace=True)(self._copy()).graph_module
            for group, gate in gate_modules(gated).items():
                gate.set_mask(torch.as_tensor(self.masks[group]))
            with torch.no_grad():
                got = [t for t in pytree.tree_leaves(sliced(*self.example_inputs))
                       if isinstance(t, torch.Tensor)]
                want = [t for t in pytree.tree_leaves(gated(*self.example_inputs))
                        if isinstance(t, torch.Tensor)]
        except Exception as exc:  # noqa: BLE001 - any failure of the trial: cannot slice
            return _failure(exc)
        return _mismatch(got, want)


def _failure(exc: Exception) -> str:
    """The freeze reason of a failed trial: an fxprune error says what failed itself."""
    if isinstance(exc, FxPruneError):
        return f"slicing it fails: {str(exc).splitlines()[0]}"
    return f"slicing it fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _mismatch(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
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
    their mask: a cheap shape check first, then trial slices, bisected on failure.

    The search is a bisection with full trials (each runs the model twice), then the groups
    left are tried together and, if they fail together, added one by one. Where every set of
    groups that slices exactly keeps doing so without some of its groups (a subset of an
    exact set is exact), the same groups and reasons come out of a cheaper search, tried
    first: :func:`find_failing` with slicing only (no run), then one full trial of the
    groups left. Only when that trial fails does the full search run (sharing the trials
    already made)."""
    frozen: dict[int, str] = {}
    for gi in masks:
        why = shape_failure(analysis, {gi: masks[gi]})
        if why is not None:
            frozen[gi] = why
    candidates = [gi for gi in masks if gi not in frozen]
    trials = Trials(gm, masks, example_inputs)
    quick: dict[int, str] = {}
    kinds = [str(analysis.groups[gi].kind) for gi in candidates]
    find_failing(trials.sliced, candidates, kinds, quick)
    rest = [gi for gi in candidates if gi not in quick]
    if not rest or trials.full(rest) is None:
        return {**frozen, **{gi: quick[gi] for gi in candidates if gi in quick}}
    _bisect(trials.full, candidates, frozen)
    # groups that slice alone yet fail together: add them one by one
    rest = [gi for gi in candidates if gi not in frozen]
    if rest and trials.full(rest):
        accepted: list[int] = []
        for gi in rest:
            why = trials.full(accepted + [gi])
            if why is None:
                accepted.append(gi)
            else:
                frozen[gi] = f"{why} (together with other groups)"
    return frozen


def find_failing(failure, groups: list[int], kinds: list[str], frozen: dict[int, str]) -> None:
    """Put into ``frozen`` the groups that fail alone (``failure([group])`` is a reason, not
    None), for a ``failure`` under which a set fails when one of its groups does: all groups
    at once, then kind by kind (every block's q/k groups tend to fail alike), then halving a
    failing set, or trying its groups one by one once both halves fail (failures are dense
    there: halving would cost more).

    Example:
        >>> tried = []
        >>> def failure(groups):
        ...     tried.append(groups)
        ...     bad = [g for g in groups if g % 3 == 1]   # every block's q/k
        ...     return f"group {bad[0]}" if bad else None
        >>> ids = list(range(1, 13)); frozen = {}
        >>> find_failing(failure, ids, ["qk", "v", "mlp"] * 4, frozen)
        >>> frozen, len(tried)
        ({1: 'group 1', 4: 'group 4', 7: 'group 7', 10: 'group 10'}, 10)
    """
    if not groups or failure(groups) is None:
        return
    by_kind: dict[str, list[int]] = {}
    for gi, kind in zip(groups, kinds):
        by_kind.setdefault(kind, []).append(gi)
    for same in by_kind.values():
        why = failure(same)  # tried already where there is one kind only
        if why is not None:
            _split(failure, same, why, frozen)


def _split(failure, groups: list[int], why: str, frozen: dict[int, str]) -> None:
    """:func:`find_failing` below a failing set ``groups`` (``why``: its failure)."""
    if len(groups) == 1:
        frozen[groups[0]] = why
        return
    half = len(groups) // 2
    halves = [groups[:half], groups[half:]]
    whys = [failure(h) for h in halves]
    if len(groups) > 3 and all(w is not None for w in whys):
        for gi in groups:
            alone = failure([gi])
            if alone is not None:
                frozen[gi] = alone
        return
    for h, w in zip(halves, whys):
        if w is not None:
            _split(failure, h, w, frozen)


def _bisect(failure, groups: list[int], frozen: dict[int, str]) -> None:
    """Freeze (into ``frozen``) the groups whose set ``failure(groups)`` fails alone, halving
    the failing sets."""
    if not groups:
        return
    why = failure(groups)
    if why is None:
        return
    if len(groups) == 1:
        frozen[groups[0]] = why
        return
    half = len(groups) // 2
    _bisect(failure, groups[:half], frozen)
    _bisect(failure, groups[half:], frozen)


def as_inputs(example_inputs) -> tuple:
    """``example_inputs`` as the positional arguments of a call."""
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)
