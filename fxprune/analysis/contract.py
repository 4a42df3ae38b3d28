"""The contraction mechanism of the propagation: einsum-shaped products (Linear, conv,
matmul, SDPA, einsum) relate the channel labels of their operands. Channels on contracted
letters are coupled across operands and recorded as sinks; channels on kept letters are
carried to the output; letters kept by several operands (batch dims, e.g. heads) relate
heads. :class:`ContractionMechanism` is a mixin of :class:`~fxprune.analysis.propagate.
Propagator`, whose state (``store``, ``sinks``, ``current``, ``factor_param``) it uses.

Example:
    >>> import torch, fxprune
    >>> from fxprune.analysis.propagate import Propagator
    >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
    ...                    torch.randn(2, 4))
    >>> prop = Propagator(gm).run()
    >>> [(s.node.name, s.kind, s.comp.span) for s in prop.sinks]  # the 8 hidden channels
    [('_1', 'linear', (1,))]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fxprune.analysis.labels import Comp
from fxprune.analysis.layout import comp_to_letters
from fxprune.analysis.values import TV, Sink


def _onto_unit_dims(tvs: list[TV], operands, out_letters: str, sizes) -> list[TV]:
    """Channels of a head dim of size 1. Size-1 dims are never spanned (one label along them
    says nothing), so q of shape ``(B, h, N, 1)`` carries its ``h`` channels on the head letter
    only, which a contraction reads as a batch dim: no q.k product, no v. An activation comp
    whose letters are all batch letters of this contraction (kept, and shared by several
    operands) and whose operand has exactly one other letter of size 1 (contracted, or kept by
    it alone) has its channels there: the comp spans that letter too, as it would at size > 1.
    With two such letters (e.g. also one token) the choice is ambiguous and nothing changes."""
    batch = {ch for ch in out_letters if sum(ch in ls for _, ls in operands) > 1}
    out: list[TV] = []
    for tv, (_, letters) in zip(tvs, operands):
        unit = [d for d, ch in enumerate(letters) if d < tv.ndim and tv.shape[d] == 1
                and sizes[ch] == 1 and ch not in batch]
        if tv.soft or len(unit) != 1 or not tv.comps:
            out.append(tv)
            continue
        comps = [Comp(c.lab, tuple(sorted(c.span + (unit[0],))), c.soft)
                 if c.span and all(letters[d] in batch for d in c.span) else c
                 for c in tv.comps]
        out.append(TV(comps, tv.shape, tv.soft, tv.param))
    return out


@dataclasses.dataclass
class Contraction:
    """What :meth:`Propagator.contraction` did: the output value, the operands as it read
    them (parameters factored per dim, size-1 head dims spanned: see
    :func:`_onto_unit_dims`), each operand's comp over the contracted letters, the operands
    that are activations with contracted channels (two of them: a q.k product), and the head
    labels created over batch letters that carry channels (None if none)."""

    value: TV
    operands: list[TV]
    by_operand: dict[int, Comp]
    hard_contracted: list[int]
    fresh_heads: Comp | None


class ContractionMechanism:
    """:meth:`contract` and :meth:`contraction` with their steps (mixed into the
    Propagator)."""

    def contract(self, operands: list[tuple[Any, str]], out_letters: str, *,
                 sink_args: list[int | str] | None = None, sink_kind: str = "matmul"
                 ) -> TV:
        """The output value of :meth:`contraction` (what most rules need)."""
        return self.contraction(operands, out_letters, sink_args=sink_args,
                                sink_kind=sink_kind).value

    def contraction(self, operands: list[tuple[Any, str]], out_letters: str, *,
                    sink_args: list[int | str] | None = None, sink_kind: str = "matmul"
                    ) -> Contraction:
        """Einsum-shaped contraction of ``operands`` (value, letters) into ``out_letters``.
        Channels on contracted letters are coupled across operands and recorded as sinks
        (for the operands ``sink_args`` names); channels on kept letters are carried to the
        output; letters kept by several operands (batch dims, e.g. heads) relate heads."""
        tvs, sizes = self._read_operands(operands)
        contracted = {ch for _, ls in operands for ch in ls if ch not in out_letters}
        tvs = _onto_unit_dims(tvs, operands, out_letters, sizes)
        contracted_comps, carried = self._split_comps(tvs, operands, out_letters, contracted)
        by_operand = self._couple_contracted(tvs, operands, contracted_comps, contracted, sizes)
        for i in sorted(by_operand):
            if sink_args is not None and i < len(sink_args) and sink_args[i] is not None:
                self.sinks.append(Sink(self.current, sink_args[i], by_operand[i], sink_kind))
        batch = [ch for ch in out_letters if sum(ch in ls for _, ls in operands) > 1]
        fresh_heads = self._fresh_heads(contracted_comps, operands, batch, out_letters, sizes)
        self._freeze_on_unread_batch(tvs, operands, carried, batch, sizes)
        out_comps = self._carry(carried, operands, out_letters, batch, fresh_heads)
        out_shape = tuple(sizes[ch] for ch in out_letters)
        soft = all(tv.soft for tv in tvs)
        if not soft:  # a weight's row labels on an activation are activation channels
            out_comps = [c if not c.soft else Comp(c.lab, c.span, False) for c in out_comps]
        return Contraction(TV(out_comps, out_shape, soft=soft), tvs, by_operand,
                           [i for i in sorted(by_operand) if not tvs[i].soft], fresh_heads)

    def _read_operands(self, operands) -> tuple[list[TV], dict[str, int]]:
        """The operands as values (a parameter factored into one comp per dim) and the size
        of every letter."""
        sizes: dict[str, int] = {}
        tvs: list[TV] = []
        for v, letters in operands:
            tv = v if isinstance(v, TV) else TV([], (), False)
            if tv.param is not None:
                tv = self.factor_param(tv)
            tvs.append(tv)
            for d, ch in enumerate(letters):
                sizes[ch] = max(sizes.get(ch, 1), tv.shape[d] if d < tv.ndim else 1)
        return tvs, sizes

    def _split_comps(self, tvs, operands, out_letters, contracted):
        """``(operand, comp)`` pairs over contracted letters, and the carried ones. A
        contracted channel dim paired with a kept dim of its operand alone is frozen."""
        contracted_comps: list[tuple[int, Comp]] = []
        carried: list[tuple[int, Comp]] = []
        for i, (tv, (_, letters)) in enumerate(zip(tvs, operands)):
            for c in tv.comps:
                ls = {letters[d] for d in c.span}
                if not ls & contracted:
                    carried.append((i, c))
                    continue
                free_kept = [ch for ch in ls if ch in out_letters and
                             sum(ch in o[1] for o in operands) == 1]
                if free_kept and self._against_params_only(tvs, operands, i, ls):
                    # heads kept by this operand alone, channels contracted against a
                    # parameter that has no heads (a relative-position table read by q):
                    # the parameter's channel j meets channel j of every head, so every
                    # head keeps the same indices
                    for ch in free_kept:
                        self.store.collapse(c.lab, letters.index(ch))
                elif free_kept:
                    self.store.freeze(c.lab, "a contracted channel dim is paired with a "
                                      f"kept channel dim at {self.current.name}")
                contracted_comps.append((i, c))
        return contracted_comps, carried

    def _couple_contracted(self, tvs, operands, contracted_comps, contracted, sizes
                           ) -> dict[int, Comp]:
        """Couple the contracted channels across operands; returns each operand's comp over
        the contracted letters (the one with the most distinct labels)."""
        by_operand: dict[int, Comp] = {}
        for i, c in contracted_comps:
            if i not in by_operand or c.distinct > by_operand[i].distinct:
                by_operand[i] = c
        for i, c in contracted_comps:
            if by_operand[i] is not c:
                self._head_rel(c, by_operand[i], operands[i][1], operands[i][1])
        for ch in sorted(contracted):
            # a weight's size-1 dim has no labels (factor_param), yet slices with its partner
            holders = [i for i, (_, ls) in enumerate(operands)
                       if ch in ls and (sizes[ch] > 1 or not tvs[i].soft)]
            labeled = [i for i in holders if i in by_operand and
                       ch in {operands[i][1][d] for d in by_operand[i].span}]
            unlabeled = [i for i in holders if i not in labeled
                         and (not tvs[i].soft or tvs[i].comps)]
            for _ in unlabeled:
                for j in labeled:
                    self.store.freeze(by_operand[j].lab, "channels contracted against a "
                                      f"tensor without channel labels at {self.current.name}")
        ops_with = sorted(by_operand)
        for a, b in zip(ops_with, ops_with[1:]):
            la, lb = self._common(by_operand[a], operands[a][1], by_operand[b], operands[b][1])
            self.store.union(la, lb)
        return by_operand

    def _fresh_heads(self, contracted_comps, operands, batch, out_letters, sizes
                     ) -> Comp | None:
        """Head labels over the batch letters that contracted channels span (None if none),
        related to those channels."""
        span_batch = [ch for ch in batch if any(
            ch in {operands[i][1][d] for d in c.span} for i, c in contracted_comps)]
        if not span_batch:
            return None
        shape = [sizes[ch] if ch in span_batch else 1 for ch in out_letters]
        fresh_heads = Comp(self._head_labels(contracted_comps, operands, span_batch,
                                             out_letters, shape),
                           tuple(d for d, ch in enumerate(out_letters) if ch in span_batch))
        for i, c in contracted_comps:
            self._head_rel(c, fresh_heads, operands[i][1], out_letters)
        return fresh_heads

    def _carry(self, carried, operands, out_letters, batch, fresh_heads) -> list[Comp]:
        """The carried comps on the output's letters, heads related where they meet."""
        carried_out = [(i, comp_to_letters(c, operands[i][1], out_letters)) for i, c in carried]
        for x in range(len(carried_out)):
            for y in range(x + 1, len(carried_out)):
                (i, cx), (j, cy) = carried_out[x], carried_out[y]
                if i != j and set(cx.span) & set(cy.span):
                    self._head_rel(cx, cy, out_letters, out_letters)
        if fresh_heads is not None:
            for _, c in carried_out:
                if set(c.span) & set(fresh_heads.span):
                    self._head_rel(c, fresh_heads, out_letters, out_letters)
        out_comps: list[Comp] = []
        for i, c in carried_out:
            batch_only = all(out_letters[d] in batch for d in c.span)
            # a head-labels comp gives way to the channels that live in those heads (more
            # labels, or as many on more dims: a head dim of size 1)
            others = [c2 for j, c2 in carried_out if j != i and set(c2.span) >= set(c.span)
                      and (c2.distinct > c.distinct or set(c2.span) > set(c.span))]
            if batch_only and others:
                continue
            out_comps.append(c)
        if fresh_heads is not None and not any(
                set(c.span) >= set(fresh_heads.span) for c in out_comps):
            out_comps.append(fresh_heads)
        return out_comps

    @staticmethod
    def _against_params_only(tvs, operands, i, span_letters) -> bool:
        """Every other operand that holds one of ``span_letters`` is a parameter."""
        others = [j for j, (_, ls) in enumerate(operands)
                  if j != i and set(ls) & set(span_letters)]
        return bool(others) and all(tvs[j].soft and tvs[j].param is not None for j in others)

    def _freeze_on_unread_batch(self, tvs, operands, carried, batch, sizes) -> None:
        """Channels carried along a batch letter (e.g. heads) that another activation operand
        also has, at size > 1, without labels there: how that operand's slices pair with the
        channels is unknown (an attention whose q.k product fxprune could not read), so
        removing some of them per head cannot be proven exact."""
        def unread(ch, j, ls) -> bool:
            tv = tvs[j]
            pos = ls.index(ch)
            if tv.soft or pos >= tv.ndim or tv.shape[pos] <= 1:
                return False  # a weight, or broadcast along ch: the same for every head
            return not any(ch in {ls[d] for d in c2.span} for c2 in tv.comps)

        for i, c in carried:
            if tvs[i].soft:
                continue
            letters = operands[i][1]
            shared = [ch for ch in {letters[d] for d in c.span} & set(batch) if sizes[ch] > 1]
            if any(unread(ch, j, ls) for ch in shared
                   for j, (_, ls) in enumerate(operands) if j != i and ch in ls):
                self.store.freeze(c.lab, "channels share a batch dim (heads) with an operand "
                                  f"that has no channel labels there at {self.current.name}")

    def _head_labels(self, contracted_comps, operands, span_batch, out_letters, shape):
        """Fresh head labels over the batch letters that carry channels (the heads). Where the
        channels repeat along them (heads folded into the batch dim: one copy per batch item)
        the head labels repeat the same way, so the copies stay one head."""
        for i, c in contracted_comps:
            letters = operands[i][1]
            span_letters = {letters[d] for d in c.span}
            if not set(span_batch) <= span_letters:
                continue
            index = [slice(None) if letters[d] in span_batch else 0 for d in range(c.lab.ndim)]
            key = c.lab[tuple(index)]
            kept = [letters[d] for d in range(c.lab.ndim) if letters[d] in span_batch]
            order = [kept.index(ch) for ch in out_letters if ch in span_batch]
            key = np.transpose(key, order) if key.ndim > 1 else key
            _, inverse = np.unique(key, return_inverse=True)
            return self.store.fresh((int(inverse.max()) + 1,))[inverse.reshape(-1)].reshape(
                shape)
        return self.store.fresh(tuple(shape))

    def _common(self, a: Comp, la: str, b: Comp, lb: str) -> tuple[np.ndarray, np.ndarray]:
        """The labels of ``a`` and ``b`` laid out on the union of their span letters."""
        target = "".join(sorted({la[d] for d in a.span} | {lb[d] for d in b.span}))
        return comp_to_letters(a, la, target).lab, comp_to_letters(b, lb, target).lab

    def _head_rel(self, a: Comp, b: Comp, la: str, lb: str) -> None:
        """Relate the heads of ``a`` and ``b`` along their first common span letter."""
        common = sorted({la[d] for d in a.span} & {lb[d] for d in b.span})
        if not common:
            return
        letters = "".join(sorted({la[d] for d in a.span} | {lb[d] for d in b.span}))
        xa, xb = comp_to_letters(a, la, letters), comp_to_letters(b, lb, letters)
        self.store.head_union_along(xa.lab, xb.lab, letters.index(common[0]))
