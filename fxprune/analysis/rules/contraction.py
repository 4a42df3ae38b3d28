"""Op rules for contractions (Linear, matmul, einsum, SDPA, conv), normalisations and
``torch.nn`` modules; indexing, splitting and joining are in :mod:`fxprune.analysis.rules.indexing`.
Attention sites are recorded here, found by what the ops do: a contraction of two activations
over channel dims is a q.k product; a contraction over a plain (token) dim that carries
channels of its second operand is the attention-times-value product.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.analysis.labels import Comp
from fxprune.analysis.propagate import LETTERS, TV, Propagator, RawSite, _shape
from fxprune.analysis.rules.indexing import INDEX_RULES, _along_dims


def _o():
    from fxprune.analysis.rules import core as oprules
    return oprules


def _tensor_args(node):
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


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
    a = p.tv(a_arg) or TV([], _shape(a_arg) or ())
    b = p.tv(b_arg) or TV([], _shape(b_arg) or ())
    n_sinks = len(p.sinks)
    out = p.contract([(a, la), (b, lb)], lo, sink_args=list(arg_positions), sink_kind="matmul")
    hard_contracted, by_operand, fresh_heads, (_, b) = p._last_contraction
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


def _matmul(p: Propagator, node) -> Any:
    a_arg, b_arg = node.args[0], node.args[1]
    na, nb = len(_shape(a_arg) or ()), len(_shape(b_arg) or ())
    la, lb, lo = _matmul_letters(na, nb)
    out = _contraction(p, node, a_arg, b_arg, la, lb, lo)
    out.shape = _shape(node) or out.shape
    return out


def _addmm(p: Propagator, node) -> Any:
    bias, x_arg, w_arg = node.args[0], node.args[1], node.args[2]
    out = _contraction(p, node, x_arg, w_arg, "MK", "KN", "MN", arg_positions=(1, 2))
    b = p.tv(bias)
    if b is not None:
        out = p.pointwise([out, b], out.shape)
    return out


def _einsum(p: Propagator, node) -> Any:
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    eq = eq.replace(" ", "")
    if "->" not in eq or "..." in eq or len(operands) < 2:
        return _o()._unknown(p, node, f"einsum {eq!r} (only explicit forms without '...')")
    ins, out = eq.split("->")
    terms = ins.split(",")
    # operands whose letters all stay in the output only scale the product elementwise (the
    # normaliser z in FLatten's 'bic,bcd,bi->bid'); the other two are the contraction
    main = [i for i, t in enumerate(terms) if not set(t) <= set(out)]
    if len(operands) > 2 and len(main) < 2:
        main = list(range(len(terms)))[:2]
    if len(main) != 2:
        return _o()._unknown(p, node, f"einsum {eq!r} (more than two contracted operands)")
    spread = len(node.args) == len(operands) + 1
    i, j = main
    positions = (i + 1, j + 1) if spread else (None, None)
    res = _contraction(p, node, operands[i], operands[j], terms[i], terms[j], out,
                       arg_positions=positions)
    res.shape = _shape(node) or res.shape
    for k, term in enumerate(terms):
        if k in main:
            continue
        res = p.pointwise([res, _scale_operand(p, operands[k], term, out, res.shape)],
                          res.shape)
    return res


def _scale_operand(p, arg, term: str, out: str, out_shape) -> TV:
    """An einsum operand whose letters all stay in the output, laid out on the output's
    letters (size 1 where it has none), for an elementwise product."""
    tv = p.tv(arg) or TV([], _shape(arg) or ())
    sizes = {ch: out_shape[out.index(ch)] for ch in out}
    comps = [p._to_letters(c, term, out, sizes) for c in tv.comps]
    shape = tuple(out_shape[d] if ch in term else 1 for d, ch in enumerate(out))
    return TV(comps, shape, tv.soft)


def _sdpa(p: Propagator, node) -> Any:
    q_arg, k_arg, v_arg = (node.args + (None,) * 3)[:3]
    q_arg = q_arg if q_arg is not None else node.kwargs.get("query")
    k_arg = k_arg if k_arg is not None else node.kwargs.get("key")
    v_arg = v_arg if v_arg is not None else node.kwargs.get("value")
    qs, ks, vs = _shape(q_arg), _shape(k_arg), _shape(v_arg)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if qs is None or ks is None or vs is None or qs[:-2] != ks[:-2] or ks[:-1] != vs[:-1]:
        return _o()._unknown(p, node, "scaled_dot_product_attention with broadcast or grouped "
                             "heads")
    nb = len(qs) - 2
    batch = LETTERS[:nb]
    q, k, v = p.tv(q_arg), p.tv(k_arg), p.tv(v_arg)
    scores = p.contract([(q, batch + "NK"), (k, batch + "MK")], batch + "NM",
                        sink_args=[0, None], sink_kind="qk")
    hard_contracted, by_operand, fresh_heads, _ = p._last_contraction
    if isinstance(mask, torch.fx.Node) and p.tv(mask) is not None:
        scores = p.pointwise([scores, p.tv(mask)], scores.shape)
    out = p.contract([(scores, batch + "NM"), (v, batch + "ME")], batch + "NE")
    out.shape = _shape(node) or out.shape
    if len(hard_contracted) == 2:
        v = p._last_contraction[3][1]  # v as the product with the scores read it
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


def _linear_fn(p: Propagator, node) -> Any:
    x_arg = node.args[0]
    w_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _o()._linear(p, node, x_arg, p.tv(w_arg), p.tv(b_arg) if b_arg is not None else None)


def _conv_fn(p: Propagator, node) -> Any:
    x_arg, w_arg = node.args[0], node.args[1]
    b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    name = _o().op_name(node, p.gm)
    if name == "convolution":
        groups = node.args[8] if len(node.args) > 8 else 1
        if len(node.args) > 6 and node.args[6]:
            return _o()._unknown(p, node, "transposed convolution")
    else:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return _o()._conv(p, node, x_arg, p.tv(w_arg), p.tv(b_arg) if b_arg is not None else None,
                      int(groups))


# -- normalisation ------------------------------------------------------------------------
def _lp_normalize_fn(p: Propagator, node) -> Any:
    """``F.normalize(x, p, dim)`` = ``x / max(|x|_p over dim, eps)``: the norm is a reduction
    over ``dim`` (a sink when it covers all of a comp's channel dims and ``p > 0``, a freeze
    otherwise, as for any reduction), the division is elementwise."""
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    order = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 2.0)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
    if not isinstance(dim, int) or not isinstance(order, (int, float)):
        return _o()._unknown(p, node, "normalize with a non-constant p or dim")
    dim %= x.ndim
    for c in x.comps:
        if dim not in c.span:
            continue
        if not x.soft and set(c.span) <= {dim} and order > 0:
            p.sinks.append(_o().Sink(node, 0, c, "reduce"))
        else:
            p.store.freeze(c.lab, f"normalize (p={order:g}) over channels at {node.name}")
    return TV(list(x.comps), x.shape, x.soft)


def _layer_norm_fn(p: Propagator, node) -> Any:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    return _o()._normalize(p, node, node.args[0], range(-k, 0), p.tv(w), p.tv(b), "LayerNorm")


def _rms_norm_fn(p: Propagator, node) -> Any:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    return _o()._normalize(p, node, node.args[0], range(-k, 0), p.tv(w), None, "RMSNorm")


def _group_norm_fn(p: Propagator, node) -> Any:
    return _o()._normalize(p, node, node.args[0], [1], None, None, "GroupNorm")


def _batch_norm_fn(p: Propagator, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.unlabeled_like(node)
    extra = x.ndim - 2
    operands = [x]
    for a in node.args[1:5]:
        t = p.tv(a) if isinstance(a, torch.fx.Node) else None
        if t is not None:
            operands.append(TV([Comp(c.lab.reshape((1,) + c.lab.shape + (1,) * extra),
                                     tuple(d + 1 for d in c.span), True) for c in t.comps],
                               (1,) + t.shape + (1,) * extra, True))
    out = p.pointwise(operands, x.shape)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [out] + [p.plain(tuple(int(s) for s in v.shape)) for v in val[1:]
                        if isinstance(v, torch.Tensor)]
    return out


RULES = {
    "linear": _linear_fn, "matmul": _matmul, "bmm": _matmul, "mm": _matmul,
    "addmm": _addmm, "einsum": _einsum, "scaled_dot_product_attention": _sdpa,
    "conv1d": _conv_fn, "conv2d": _conv_fn, "convolution": _conv_fn,
    "layer_norm": _layer_norm_fn, "native_layer_norm": _layer_norm_fn,
    "normalize": _lp_normalize_fn,
    "rms_norm": _rms_norm_fn, "group_norm": _group_norm_fn, "batch_norm": _batch_norm_fn,
    "_native_batch_norm_legit_no_training": _batch_norm_fn,
    **INDEX_RULES,
}

def _module_rule(p: Propagator, node, mod: nn.Module) -> Any:
    o = _o()
    x_arg = node.args[0] if node.args else None
    if isinstance(mod, nn.Linear):
        return o._linear(p, node, x_arg, o._param_of_module(p, node, "weight"),
                         o._param_of_module(p, node, "bias"))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return o._conv(p, node, x_arg, o._param_of_module(p, node, "weight"),
                       o._param_of_module(p, node, "bias"), mod.groups)
    if isinstance(mod, nn.LayerNorm):
        return o._normalize(p, node, x_arg, range(-len(mod.normalized_shape), 0),
                            o._param_of_module(p, node, "weight"),
                            o._param_of_module(p, node, "bias"), "LayerNorm")
    if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
        return o._normalize(p, node, x_arg, range(-len(mod.normalized_shape), 0),
                            o._param_of_module(p, node, "weight"), None, "RMSNorm")
    if isinstance(mod, nn.GroupNorm):
        return o._normalize(p, node, x_arg, [1], None, None, "GroupNorm")
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        x = p.tv(x_arg)
        if x is None:
            return p.unlabeled_like(node)
        extra = x.ndim - 2
        operands = [x]
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = o._param_of_module(p, node, attr)
            if t is not None:
                operands.append(TV([Comp(c.lab.reshape((1,) + c.lab.shape + (1,) * extra),
                                         tuple(d + 1 for d in c.span), True) for c in t.comps],
                                   (1,) + t.shape + (1,) * extra, True))
        return p.pointwise(operands, x.shape)
    if isinstance(mod, o.ACT_MODULES):
        return o._pointwise(p, node)
    if isinstance(mod, nn.Softmax):
        x = p.tv(x_arg)
        if x is None:
            return p.unlabeled_like(node)
        dim = mod.dim if mod.dim is not None else x.ndim - 1
        for c in x.comps:
            if dim % x.ndim in c.span:
                p.store.freeze(c.lab, f"softmax over channels at {node.name}")
        return TV(list(x.comps), x.shape, x.soft)
    if isinstance(mod, nn.Flatten):
        return o._reshape(p, node)
    if isinstance(mod, o.SPATIAL_MODULES):
        x = p.tv(x_arg)
        return _along_dims(p, node, range(2, x.ndim) if x else [], "pooling") if x else \
            p.unlabeled_like(node)
    return o._unknown(p, node, f"module {type(mod).__name__}")
