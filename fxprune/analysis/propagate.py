"""Channel propagation: walks the graph once and relates the channel labels of every tensor.

Each tensor value becomes a :class:`TV` (its comps, whether it is derived from parameters only,
and which parameter it is when it is one). The per-op rules live in
:mod:`fxprune.analysis.rules`;
this module holds the state and the three generic mechanisms every rule is built from:
:meth:`Propagator.pointwise` (broadcasting elementwise ops), :meth:`Propagator.contract`
(einsum-shaped contractions: Linear, matmul, SDPA, einsum; in :mod:`fxprune.analysis.contract`)
and the view-like moves of :mod:`fxprune.analysis.layout`.

Example:
    >>> import torch, fxprune
    >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
    ...                    torch.randn(1, 4))
    >>> prop = Propagator(gm).run()
    >>> [s.node.name for s in prop.sinks]   # the hidden channels are contracted by the second
    ['_1']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.analysis.contract import ContractionMechanism
from fxprune.analysis.labels import Comp, LabelStore
from fxprune.analysis.rules.registry import apply_rule
from fxprune.analysis.values import (
    TV,
    RawSite,
    Sink,
    align_ndim,
    comps_meta,
    iter_comps,
    shape_of,
    structure,
)
from fxprune.meta import COMPS_KEY
from fxprune.ops import fetch_attr, op_name

#: elementwise ops that add one operand to another
_SHIFTS = ("add", "iadd", "add_", "sub", "isub", "sub_", "rsub")


class Propagator(ContractionMechanism):
    """Runs the op rules over ``gm`` and keeps everything the analysis needs."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.store = LabelStore()
        self.env: dict[torch.fx.Node, Any] = {}
        self.const: dict[torch.fx.Node, torch.Tensor] = {}
        self.param_comps: dict[str, list[Comp]] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.param_tv: dict[str, TV] = {}
        self.factor_labels: dict[tuple[str, int], np.ndarray] = {}
        self.param_aliases: dict[str, list[str]] = {}
        self._canonical: dict[str, str] = {}
        seen: dict[int, str] = {}
        named = list(gm.named_parameters(remove_duplicate=False)) + list(
            gm.named_buffers(remove_duplicate=False))
        for pname, tensor in named:
            # tied parameters (one tensor under several names) are one parameter here
            first = seen.setdefault(id(tensor), pname)
            self._canonical[pname] = first
            self.param_aliases.setdefault(first, []).append(pname)
        self.sinks: list[Sink] = []
        self.sites: list[RawSite] = []
        self.site_of_head_label: dict[int, int] = {}
        self.sources: list[tuple[torch.fx.Node, np.ndarray]] = []  # Linear/conv rows per node
        self.opaque: list[tuple[torch.fx.Node, str]] = []
        self.kv_origin: dict[int, tuple] = {}
        self.score_site: dict[torch.fx.Node, int] = {}
        self.current: torch.fx.Node | None = None

    # -- driver ---------------------------------------------------------------------------
    def run(self) -> Propagator:
        for node in self.gm.graph.nodes:
            self.current = node
            shape_of(node)
            try:
                self.env[node] = apply_rule(self, node)
            except Exception as exc:  # noqa: BLE001 - one op's rule never costs the model
                self.env[node] = self.rule_failed(node, exc)
            node.meta[COMPS_KEY] = comps_meta(self.env[node])
        return self

    def rule_failed(self, node: torch.fx.Node, exc: Exception) -> Any:
        """A rule raised: the channels reaching ``node`` stay dense (frozen with the
        error as the reason) and its output carries no labels, as for an unknown op."""
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        what = f"the rule of {op_name(node, self.gm) or node.target} raised " \
            f"{type(exc).__name__}: {first}"
        for a in node.all_input_nodes:
            self.freeze(self.value(a), what)
        self.opaque.append((node, what))
        return self.unlabeled_like(node)

    # -- values ---------------------------------------------------------------------------
    def value(self, arg) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env.get(arg)
        return None

    def tv(self, arg) -> TV | None:
        v = self.value(arg)
        return v if isinstance(v, TV) else None

    def plain(self, node_or_shape, soft=False) -> TV:
        shape = node_or_shape if isinstance(node_or_shape, tuple) else shape_of(node_or_shape)
        return TV([], shape or (), soft=soft)

    def unlabeled_like(self, node) -> Any:
        """A value with no channel labels shaped like ``node.meta['val']`` (tuples kept)."""
        return structure(node.meta.get("val"))

    def param_value(self, name: str) -> TV:
        """TV of a parameter or buffer: one soft comp over its full shape (cached per tensor:
        tied names share it)."""
        name = self._canonical.get(name, name)
        tv = self.param_tv.get(name)
        if tv is None:
            tensor = fetch_attr(self.gm, name)
            shape = tuple(int(s) for s in tensor.shape)
            self.param_shapes[name] = shape
            tv = TV(None, shape, soft=True, param=(name, tuple(range(len(shape)))),
                    lazy=lambda: self._full_param_comps(name))
            self.param_tv[name] = tv
        return tv

    def _full_param_comps(self, name: str) -> list[Comp]:
        shape = self.param_shapes[name]
        lab = self.store.fresh(shape) if len(shape) else self.store.fresh((1,)).reshape(())
        comp = Comp(lab, tuple(d for d in range(len(shape)) if shape[d] > 1), soft=True)
        self.param_comps.setdefault(name, []).append(comp)
        return [comp]

    def factor_param(self, tv: TV) -> TV:
        """Parameters used as the matrix of a contraction get one independent comp per dim
        (rows and columns are pruned independently), registered on the parameter."""
        name, perm = tv.param
        comps = []
        for d, size in enumerate(tv.shape):
            if size <= 1:
                continue
            # one label vector per (parameter, dim), whatever the number of uses: a Linear
            # called twice has the same rows and columns both times
            key = (name, perm[d])
            vec = self.factor_labels.get(key)
            if vec is None:
                vec = self.store.fresh((size,))
                self.factor_labels[key] = vec
                pshape = [1] * len(self.param_shapes[name])
                pshape[perm[d]] = size
                self.param_comps.setdefault(name, []).append(
                    Comp(vec.reshape(pshape), (perm[d],), soft=True))
            shape = [1] * tv.ndim
            shape[d] = size
            comps.append(Comp(vec.reshape(shape), (d,), soft=True))
        return TV(comps, tv.shape, soft=True, param=tv.param)

    def freeze(self, value, reason: str) -> None:
        for comp in iter_comps(value):
            self.store.freeze(comp.lab, f"{reason} at {self.current.name}")

    # -- generic mechanisms ---------------------------------------------------------------
    def pointwise(self, operands: list[Any], out_shape: tuple[int, ...]) -> TV:
        """Elementwise op with broadcasting. Equal spans are coupled; a parameter's dims that
        meet a plain (token) dim of an activation collapse into one label."""
        nd = len(out_shape)
        tvs = [align_ndim(v, nd) for v in operands if isinstance(v, TV)]
        hard = [v for v in tvs if not v.soft]
        plain_dims: dict[int, bool] = {}
        for v in hard:
            spanned = v.spanned()
            for d in range(nd):
                if d not in spanned and v.shape[d] == out_shape[d] and out_shape[d] > 1:
                    plain_dims[d] = True
        comps: list[Comp] = []
        for v in tvs:
            for c in v.comps:
                if v.soft:
                    lab = c.lab
                    span = list(c.span)
                    for d in list(span):
                        if d in plain_dims:
                            lab = self.store.collapse(lab, d)
                            span.remove(d)
                    c = Comp(lab, tuple(span), True)
                else:
                    if c.soft:
                        c = Comp(c.lab, c.span, False)
                    if any(d in plain_dims for d in c.span):
                        self.store.freeze(c.lab, "channels combined elementwise with a tensor "
                                          f"that has no channel labels at {self.current.name}")
                comps.append(c)
        target = self.current.target if self.current is not None else None
        name = getattr(target, "_opname", None) or getattr(target, "__name__", target)
        shift = len(hard) > 1 and name in _SHIFTS
        if shift:
            self._freeze_shifted(hard, out_shape)
        merged = self.merge_comps(comps)
        if shift:
            # two activations added channel by channel: a residual stream
            for c in merged:
                if not c.soft:
                    self.store.mark(c.lab, "residual")
        return TV(merged, out_shape, soft=bool(tvs) and not hard)

    def _freeze_shifted(self, hard: list[TV], out_shape: tuple[int, ...]) -> None:
        """``x + y`` where ``y`` broadcasts along a channel dim of ``x`` without labels there
        (``q - q.sum(-1, keepdim=True) / C``): a removed channel of ``x`` would take ``y``'s
        value instead of zero, which a later reduction over the channels reads."""
        for v in hard:
            for c in v.comps:
                # the heads of attention scores: a removed head's scores plus a mask only
                # weigh that head's v, which is removed with it
                if c.soft or int(c.lab.ravel()[0]) in self.site_of_head_label:
                    continue
                for u in hard:
                    if u is v:
                        continue
                    spanned = u.spanned()
                    if any(out_shape[d] > 1 and u.shape[d] == 1 and d not in spanned
                           for d in c.span):
                        self.store.freeze(c.lab, "channels shifted by a value broadcast over "
                                          "them (a removed channel would take it) at "
                                          f"{self.current.name}")
                        break

    def merge_comps(self, comps: list[Comp]) -> list[Comp]:
        """One comp per span: comps over the same dims are coupled (hard ones kept), a
        parameter's comp over a subset of an activation's dims is recorded for head order."""
        out: list[Comp] = []
        for c in sorted(comps, key=lambda c: c.soft):  # hard comps first: they are kept
            if not c.span:
                continue
            merged = False
            for o in out:
                if o.span == c.span:
                    if o.lab is not c.lab:
                        self.store.union(o.lab, c.lab)
                    merged = True
                    break
                if c.soft and set(c.span) < set(o.span):
                    # a parameter broadcast over some of the channel dims: shared across
                    # heads (couples channels) or per head (one value per head), which is
                    # only known once the heads are (fxprune/analysis/head_order.py)
                    self.store.subset_params.append((o.lab, c.lab, o.span, c.span))
                    merged = True
                    break
            if not merged:
                out.append(c)
        return out
