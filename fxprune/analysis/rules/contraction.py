"""Rules for contractions: Linear, conv, matmul/bmm, addmm, einsum and
scaled_dot_product_attention.
Attention sites are recorded here, found by what the ops do: a contraction of two activations
over channel dims is a q.k product; a contraction over a plain (token) dim that carries
channels of its second operand is the attention-times-value product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from fxprune.analysis.labels import Comp
from fxprune.analysis.layout import comp_to_letters
from fxprune.analysis.rules.common import out_shape, unknown
from fxprune.analysis.rules.registry import rule
from fxprune.analysis.values import LETTERS, TV, RawSite, Sink, align_ndim, shape_of
from fxprune.ops import op_name

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


# -- contractions -------------------------------------------------------------------------
def _matmul_letters(na: int, nb: int):
    nbatch = max(na, nb) - 2 if min(na, nb) >= 2 else max(na, nb) - (1 if min(na, nb) == 1 else 2)
    batch = LETTERS[:max(nbatch, 0)]
    if na >= 2 and nb >= 2:
        la = batch[len(batch) - (na - 2):] + "MK"
        lb = batch[len(batch) - (nb - 2):] + "KN"
        lo = batch + "MN"
    elif na == 1 and nb >= 2:
        la, lb, lo = "K", batch[len(batch) - (nb - 2):] + "KN", batch + "N"
    elif nb == 1 and na >= 2:
        la, lb, lo = batch[len(batch) - (na - 2):] + "MK", "K", batch + "M"
    else:
        la, lb, lo = "K", "K", ""
    return la, lb, lo


def _contraction(p: Propagator, node, a_arg, b_arg, la, lb, lo, *, arg_positions=(0, 1)) -> TV:
    a = p.tv(a_arg) or TV([], shape_of(a_arg) or ())
    b = p.tv(b_arg) or TV([], shape_of(b_arg) or ())
    n_sinks = len(p.sinks)
    done = p.contraction([(a, la), (b, lb)], lo, sink_args=list(arg_positions),
                         sink_kind="matmul")
    out, hard_contracted, by_operand, fresh_heads = (done.value, done.hard_contracted,
                                                     done.by_operand, done.fresh_heads)
    b = done.operands[1]  # b as the product read it
    if len(hard_contracted) == 2:
        # both operands are activations whose channels meet here: a q.k product
        new = p.sinks[n_sinks:]
        p.sinks[n_sinks:] = new[:1]  # gate one operand only (q): masking it removes the pair
        for sink in new[:1]:
            sink.kind = "qk"
        site = RawSite(node, a_arg, b_arg, by_operand[0], by_operand[1],
                       fresh_heads.lab if fresh_heads is not None else np.zeros(0, np.int64))
        carried_b = [c for c in b.comps if c is not by_operand[1]]
        kv = _kv_origin(p, carried_b)
        if kv is not None:  # q @ (k^T v): linear attention
            site.av_node, site.v, site.v_comp = node, kv[0], kv[1]
            site.k = kv[2]  # the k of k^T v, not the product
            site.fused = True
        p.sites.append(site)
        p.score_site[node] = len(p.sites) - 1
        if fresh_heads is not None:
            for lab in np.unique(fresh_heads.lab):
                p.site_of_head_label[int(lab)] = len(p.sites) - 1
    elif not by_operand and not a.soft and not b.soft:
        # contraction over a plain dim (tokens): attention @ value, or k^T @ v
        site_idx = _site_of(p, a)
        if site_idx is None:  # one head: the scores carry no head labels; follow the graph
            site_idx = _score_site_upstream(p, a_arg)
        carried_b = [c for c in b.comps if all(lb[d] in lo for d in c.span)]
        if site_idx is not None and carried_b and p.sites[site_idx].av_node is None:
            site = p.sites[site_idx]
            site.av_node, site.v = node, b_arg
            site.v_comp = max(carried_b, key=lambda c: c.distinct)
            p.store.mark(site.v_comp.lab, "v")
        elif a.comps and b.comps:
            for c in b.comps:
                p.kv_origin[int(c.lab.ravel()[0])] = (b_arg, c, a_arg)
                p.store.mark(c.lab, "v")
    return out


def _score_site_upstream(p, arg, steps: int = 8):
    """The site whose q.k scores reach ``arg`` through elementwise ops (scale, bias, softmax,
    dropout): how attention probabilities of a single head are tied to their site."""
    cur = arg
    for _ in range(steps):
        if not isinstance(cur, torch.fx.Node):
            return None
        if cur in p.score_site:
            return p.score_site[cur]
        tensors = [a for a in cur.all_input_nodes if isinstance(p.value(a), TV)
                   and not p.value(a).soft]
        if len(tensors) != 1:
            return None
        cur = tensors[0]
    return None


def _kv_origin(p, comps):
    for c in comps:
        hit = p.kv_origin.get(int(c.lab.ravel()[0]))
        if hit is not None:
            return hit
    return None


def _site_of(p, a: TV):
    for c in a.comps:
        site = p.site_of_head_label.get(int(c.lab.ravel()[0]))
        if site is not None:
            return site
    return None


@rule("matmul", "bmm", "mm")
def _matmul(p: Propagator, node) -> Any:
    a_arg, b_arg = node.args[0], node.args[1]
    na, nb = len(shape_of(a_arg) or ()), len(shape_of(b_arg) or ())
    la, lb, lo = _matmul_letters(na, nb)
    out = _contraction(p, node, a_arg, b_arg, la, lb, lo)
    out.shape = shape_of(node) or out.shape
    return out


@rule("addmm")
def _addmm(p: Propagator, node) -> Any:
    bias, x_arg, w_arg = node.args[0], node.args[1], node.args[2]
    out = _contraction(p, node, x_arg, w_arg, "MK", "KN", "MN", arg_positions=(1, 2))
    b = p.tv(bias)
    if b is not None:
        out = p.pointwise([out, b], out.shape)
    return out


@rule("baddbmm")
def _baddbmm(p: Propagator, node) -> Any:
    """``beta * input + alpha * (batch1 @ batch2)``: a batched product (scores with a bias
    folded in, in attention written on ``(B * heads, N, d)``) plus an elementwise term."""
    out = _contraction(p, node, node.args[1], node.args[2], "BMK", "BKN", "BMN",
                       arg_positions=(1, 2))
    out.shape = shape_of(node) or out.shape
    added = p.tv(node.args[0])
    if added is not None:
        out = p.pointwise([out, added], out.shape)
    return out


@rule("einsum")
def _einsum(p: Propagator, node) -> Any:
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    eq = eq.replace(" ", "")
    if "->" not in eq or "..." in eq or len(operands) < 2:
        return unknown(p, node, f"einsum {eq!r} (only explicit forms without '...')")
    ins, out = eq.split("->")
    terms = ins.split(",")
    # operands whose letters all stay in the output only scale the product elementwise (the
    # normaliser z in FLatten's 'bic,bcd,bi->bid'); the other two are the contraction
    main = [i for i, t in enumerate(terms) if not set(t) <= set(out)]
    if len(operands) > 2 and len(main) < 2:
        main = list(range(len(terms)))[:2]
    if len(main) != 2:
        return unknown(p, node, f"einsum {eq!r} (more than two contracted operands)")
    spread = len(node.args) == len(operands) + 1
    i, j = main
    positions = (i + 1, j + 1) if spread else (None, None)
    res = _contraction(p, node, operands[i], operands[j], terms[i], terms[j], out,
                       arg_positions=positions)
    res.shape = shape_of(node) or res.shape
    for k, term in enumerate(terms):
        if k in main:
            continue
        res = p.pointwise([res, _scale_operand(p, operands[k], term, out, res.shape)],
                          res.shape)
    return res


def _scale_operand(p, arg, term: str, out: str, out_shape) -> TV:
    """An einsum operand whose letters all stay in the output, laid out on the output's
    letters (size 1 where it has none), for an elementwise product."""
    tv = p.tv(arg) or TV([], shape_of(arg) or ())
    comps = [comp_to_letters(c, term, out) for c in tv.comps]
    shape = tuple(out_shape[d] if ch in term else 1 for d, ch in enumerate(out))
    return TV(comps, shape, tv.soft)


@rule("scaled_dot_product_attention")
def _sdpa(p: Propagator, node) -> Any:
    q_arg, k_arg, v_arg = (node.args + (None,) * 3)[:3]
    q_arg = q_arg if q_arg is not None else node.kwargs.get("query")
    k_arg = k_arg if k_arg is not None else node.kwargs.get("key")
    v_arg = v_arg if v_arg is not None else node.kwargs.get("value")
    qs, ks, vs = shape_of(q_arg), shape_of(k_arg), shape_of(v_arg)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if qs is None or ks is None or vs is None or len(qs) != len(ks) or ks[:-1] != vs[:-1] or \
            any(b not in (1, a) for a, b in zip(qs[:-2], ks[:-2])):
        # k/v batch dims equal to q's or broadcast (size 1: multi-query attention); grouped
        # k/v heads (enable_gqa) pair q head i with k/v head i // group, which is not read
        return unknown(p, node, "scaled_dot_product_attention with grouped heads")
    nb = len(qs) - 2
    batch = LETTERS[:nb]
    q, k, v = p.tv(q_arg), p.tv(k_arg), p.tv(v_arg)
    qk = p.contraction([(q, batch + "NK"), (k, batch + "MK")], batch + "NM",
                       sink_args=[0, None], sink_kind="qk")
    scores, hard_contracted, by_operand, fresh_heads = (qk.value, qk.hard_contracted,
                                                        qk.by_operand, qk.fresh_heads)
    if isinstance(mask, torch.fx.Node) and p.tv(mask) is not None:
        scores = p.pointwise([scores, p.tv(mask)], scores.shape)
    av = p.contraction([(scores, batch + "NM"), (v, batch + "ME")], batch + "NE")
    out = av.value
    out.shape = shape_of(node) or out.shape
    if len(hard_contracted) == 2:
        v = av.operands[1]  # v as the product with the scores read it
        v_comps = [c for c in (v.comps if v else []) if c.span]
        site = RawSite(node, q_arg, k_arg, by_operand[0], by_operand[1],
                       fresh_heads.lab if fresh_heads is not None else np.zeros(0, np.int64),
                       av_node=node, v=v_arg,
                       v_comp=max(v_comps, key=lambda c: c.distinct) if v_comps else None,
                       fused=True)
        if site.v_comp is not None:
            p.store.mark(site.v_comp.lab, "v")
        p.sites.append(site)
    return out


@rule("linear")
def _linear_fn(p: Propagator, node) -> Any:
    x_arg = node.args[0]
    w_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return linear(p, node, x_arg, p.tv(w_arg), p.tv(b_arg) if b_arg is not None else None)


@rule("conv1d", "conv2d", "convolution")
def _conv_fn(p: Propagator, node) -> Any:
    x_arg, w_arg = node.args[0], node.args[1]
    b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    name = op_name(node, p.gm)
    if name == "convolution":
        groups = node.args[8] if len(node.args) > 8 else 1
        if len(node.args) > 6 and node.args[6]:
            return unknown(p, node, "transposed convolution")
    else:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return conv(p, node, x_arg, p.tv(w_arg), p.tv(b_arg) if b_arg is not None else None,
                      int(groups))


def linear(p: Propagator, node, x_arg, w: TV | None, b: TV | None) -> Any:
    x = p.tv(x_arg) or p.plain(out_shape(node))
    shape_out = out_shape(node)
    if w is None:
        return unknown(p, node, "linear without a weight")
    nd = max(x.ndim, 1)
    letters = LETTERS[:nd]
    out = p.contract([(x, letters), (w, "Z" + letters[-1])], letters[:-1] + "Z",
                     sink_args=[0, None], sink_kind="linear")
    if b is not None:
        out = p.pointwise([out, b], out.shape)
    out.shape = shape_out
    rows = [c for c in out.comps if c.span == (nd - 1,)]
    if rows:
        p.sources.append((node, rows[0].lab))
    return out


def conv(p: Propagator, node, x_arg, w: TV | None, b: TV | None, groups: int) -> Any:
    x = p.tv(x_arg) or p.plain(out_shape(node))
    shape_out = out_shape(node)
    if w is None:
        return unknown(p, node, "convolution without a weight")
    extra = len(shape_out) - 2
    for c in x.comps:
        if any(d >= 2 for d in c.span):
            p.store.freeze(c.lab, f"convolution over channel-carrying spatial dims at {node.name}")
    cin = x.shape[1] if x.ndim > 1 else 1
    if groups == 1:
        head = p.contract([(TV([c for c in x.comps if all(d < 2 for d in c.span)],
                                x.shape[:2], x.soft), "bk"), (_first2(w), "Zk")], "bZ",
                          sink_args=[0, None], sink_kind="conv")
    elif groups == cin and w.shape[0] == cin:
        wf = p.factor_param(w) if w.param is not None else w
        rows = [c for c in wf.comps if c.span == (0,)]
        # a comp may also span dim 0 when heads are folded into the batch: the conv is then
        # shared by the heads and ties channel j of every head to its row j
        chan = [c for c in x.comps if 1 in c.span and set(c.span) <= {0, 1}]
        comps = []
        if rows:
            r = rows[0].lab.reshape(1, -1)
            if chan:
                lab = chan[0].lab.reshape(chan[0].lab.shape[:2])
                p.store.union(lab, r)
                comps = [Comp(lab, chan[0].span, x.soft)]
            else:
                comps = [Comp(r, (1,), True)]
        head = TV(comps, (x.shape[0], cin), x.soft)
    else:
        head = grouped_conv(p, x, w, groups)
        if head is None:
            p.freeze(x, f"grouped convolution (groups={groups}) with a weight or input "
                     "fxprune cannot read per group")
            # contracted here all the same: their group exists and shows why it is dense
            p.sinks += [Sink(node, 0, c, "conv") for c in x.comps if 1 in c.span]
            head = p.plain((x.shape[0], shape_out[1]))
    comps = [Comp(c.lab.reshape(c.lab.shape + (1,) * extra), c.span, c.soft) for c in head.comps]
    out = TV(comps, shape_out, x.soft and head.soft)
    if b is not None:
        bb = TV([Comp(c.lab.reshape(c.lab.shape + (1,) * extra), c.span, c.soft)
                 for c in align_ndim(b, 2).comps], (1, shape_out[1]) + (1,) * extra, True)
        out = p.pointwise([out, bb], shape_out)
    rows = [c for c in out.comps if c.span == (1,)]
    if rows:
        p.sources.append((node, rows[0].lab))
    return out


def grouped_conv(p: Propagator, x: TV, w: TV, groups: int) -> TV | None:
    """A convolution with ``groups`` > 1 that is not depthwise: output channel ``o`` reads
    only the input channels of its group ``o // (Cout / groups)``. It is read as a contraction
    of the input seen as ``(batch, group, in per group)`` with the weight seen as ``(group,
    out per group, in per group)``: the group is a batch letter, like heads, so the channels
    of one group are one head on both sides. The weight's input dim gets labels per (group,
    column) and its rows labels per row; both are registered on the parameter. A group of
    channels that holds either side keeps the same count in every convolution group
    (:func:`fxprune.analysis.grouping.adopt_split_layouts`), so ``groups`` still divides the
    sliced widths and every kept row still reads its own group's inputs. Returns the
    ``(batch, out)`` value, or None where the weight is not a plain parameter, the input's
    channels are not on dim 1 alone or the conv is depthwise with a channel multiplier (the
    caller then freezes)."""
    cout, cin_g = (w.shape[0], w.shape[1]) if w.ndim >= 2 else (0, 0)
    cin = x.shape[1] if x.ndim > 1 else 0
    if (w.param is None or tuple(w.param[1]) != tuple(range(w.ndim)) or cout % groups
            or cin != groups * cin_g or cin_g < 2 or any(c.span != (1,) for c in x.comps)):
        return None  # cin_g 1: depthwise with a channel multiplier, whose groups follow cin
    name = w.param[0]
    cout_g, nd = cout // groups, w.ndim
    rows = p.factor_labels.get((name, 0))
    if rows is None:
        rows = p.store.fresh((cout,))
        p.factor_labels[(name, 0)] = rows
        p.param_comps.setdefault(name, []).append(
            Comp(rows.reshape((cout,) + (1,) * (nd - 1)), (0,), soft=True))
    cols = p.factor_labels.get((name, ("per group", 1)))
    if cols is None:
        cols = p.store.fresh((groups, cin_g))
        p.factor_labels[(name, ("per group", 1))] = cols
        full = np.repeat(cols, cout_g, axis=0).reshape((cout, cin_g) + (1,) * (nd - 2))
        p.param_comps.setdefault(name, []).append(Comp(full, (0, 1), soft=True))
    x_view = TV([Comp(c.lab.reshape(1, groups, cin_g), (1, 2), c.soft) for c in x.comps],
                (x.shape[0], groups, cin_g), x.soft)
    w_view = TV([Comp(rows.reshape(groups, cout_g, 1), (0, 1), True),
                 Comp(cols.reshape(groups, 1, cin_g), (0, 2), True)],
                (groups, cout_g, cin_g), True)
    n_sinks = len(p.sinks)
    out = p.contract([(x_view, "bgk"), (w_view, "gZk")], "bgZ", sink_args=[0, None],
                     sink_kind="conv")
    for sink in p.sinks[n_sinks:]:  # gates and members see the input as it is, (B, C, ...)
        sink.comp = Comp(sink.comp.lab.reshape(x.comps[0].lab.shape) if x.comps else
                         sink.comp.lab, (1,), sink.comp.soft)
    for c in x.comps:
        p.store.split(c.lab.reshape(groups, cin_g), f"grouped convolution (groups={groups}) "
                      f"input at {p.current.name}")
    p.store.split(rows.reshape(groups, cout_g), f"grouped convolution (groups={groups}) "
                  f"output at {p.current.name}")
    comps = [Comp(c.lab.reshape(1, cout), (1,), c.soft) for c in out.comps
             if c.lab.size == cout]
    return TV(comps, (x.shape[0], cout), x.soft)


def _first2(w: TV) -> TV:
    """A conv weight (out, in, *kernel) seen as its (out, in) matrix."""
    if w.param is None:
        return TV([Comp(c.lab.reshape(c.lab.shape[:2]) if c.lab.ndim >= 2 else c.lab,
                        tuple(d for d in c.span if d < 2), c.soft)
                   for c in w.comps if c.lab.ndim >= 2 and all(
                       s == 1 for s in c.lab.shape[2:])], w.shape[:2], w.soft)
    name, perm = w.param
    return _KernelView(name, perm, w.shape)


class _KernelView(TV):
    def __init__(self, name, perm, shape):
        super().__init__([], tuple(shape[:2]), True, (name, tuple(perm[:2])))
        self.full_shape = shape
