"""Per-op channel rules: how each op moves, couples, contracts or freezes channel labels.

Ops are identified by what they are (torch functions, Tensor methods, aten overloads and
``torch.nn`` built-in modules), never by node or model names. An op without a rule freezes the
channels that reach it and is reported as opaque: unknown means dense, never wrong.

Example:
    >>> gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.gelu(x).transpose(0, 1))
    >>> [op_name(n, gm) for n in gm.graph.nodes]   # functions and methods by name, else None
    [None, 'gelu', 'transpose', None]
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.analysis import layout
from fxprune.analysis.labels import Comp
from fxprune.analysis.propagate import (
    LETTERS,
    TV,
    Propagator,
    RawSite,
    Sink,
    _align,
    _fetch_attr,
    _shape,
)

POINTWISE = {
    "add", "sub", "rsub", "mul", "div", "truediv", "floordiv", "pow", "neg", "exp", "log",
    "sqrt", "rsqrt", "abs", "sigmoid", "tanh", "relu", "gelu", "silu", "softplus", "elu",
    "leaky_relu", "hardswish", "hardsigmoid", "mish", "relu6", "hardtanh", "clamp", "clamp_min",
    "clamp_max", "clip", "where", "masked_fill", "dropout", "contiguous", "clone", "detach", "to",
    "type", "type_as", "float", "half", "bfloat16", "double", "sign", "erf", "sin", "cos",
    "reciprocal", "square", "maximum", "minimum", "le", "lt", "ge", "gt", "eq", "ne",
    "logical_and", "logical_or", "logical_not", "iadd", "imul", "isub", "itruediv", "add_",
    "mul_", "div_", "sub_", "bernoulli_", "bernoulli", "fill_", "zero_", "_to_copy", "alias",
    "lift_fresh_copy", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
    "randn_like", "exp_", "sigmoid_", "relu_", "gelu_", "native_dropout", "requires_grad_",
    "feature_dropout", "dropout1d", "dropout2d", "alpha_dropout", "_assert_tensor_metadata",
    "__and__", "__or__", "and_", "or_", "logit", "addcmul", "lerp",
}
CREATION = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "tensor", "new_zeros",
            "new_ones", "new_empty", "new_full", "new_tensor", "scalar_tensor", "linspace",
            "eye", "randint", "as_tensor", "meshgrid"}
RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as",
           "_reshape_alias"}
PERMUTE = {"permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "numpy_T"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
          "argmax", "argmin", "all", "any", "var_mean", "std_mean", "linalg_vector_norm",
          "linalg_norm", "nansum"}
NONTENSOR = {"getattr", "size", "dim", "numel", "_assert", "_assert_is_none", "sym_size",
             "sym_numel", "_assert_scalar", "sym_constrain_range_for_size", "_log_api_usage_once"}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax"}
SPATIAL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU,
               nn.ELU, nn.Softplus, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Dropout,
               nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)

_SAFE_MODULES = ("_operator", "operator", "builtins", "math")


def op_name(node: torch.fx.Node, gm) -> str | None:
    """Canonical op name of a call_function / call_method node (None for others)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    mod = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    if mod.startswith("torch") or mod in _SAFE_MODULES:
        return name.lstrip("_") if name in ("__getitem__",) else name
    return None


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims_arg(args, nd):
    """Normalise permute-style varargs or a single sequence argument."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return [int(a) % nd if isinstance(a, int) else a for a in args]


def apply_rule(p: Propagator, node: torch.fx.Node) -> Any:
    if node.op == "placeholder":
        return p.unlabeled_like(node)
    if node.op == "get_attr":
        val = _fetch_attr(p.gm, node.target)
        if isinstance(val, torch.Tensor):
            if not val.is_floating_point() and val.numel() < 4_000_000:
                p.const[node] = val
            return p.param_value(node.target)
        return None
    if node.op == "output":
        def walk(a):
            if isinstance(a, torch.fx.Node):
                p.freeze(p.value(a), "channels reach the model output")
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            elif isinstance(a, dict):
                for x in a.values():
                    walk(x)
        walk(node.args[0])
        return None
    if node.op == "call_module":
        return _module_rule(p, node, p.gm.get_submodule(node.target))
    name = op_name(node, p.gm)
    _fold_constant(p, node)
    if name is None:
        return _unknown(p, node, f"function {getattr(node.target, '__name__', node.target)}")
    rule = RULES.get(name)
    if rule is not None:
        return rule(p, node)
    if name in POINTWISE:
        return _pointwise(p, node)
    if name in CREATION:
        return p.unlabeled_like(node)
    if name in NONTENSOR:
        return None if not isinstance(node.meta.get("val"), torch.Tensor) else _pointwise(p, node)
    if name in RESHAPE:
        return _reshape(p, node)
    if name in PERMUTE:
        return _permute(p, node, name)
    if name in REDUCE:
        return _reduce(p, node, name)
    if name in SOFTMAX:
        return _softmax(p, node)
    return _unknown(p, node, f"op {name}")


def _fold_constant(p: Propagator, node) -> None:
    """Integer index tensors computed from buffers (e.g. a relative-position index) are
    evaluated so that gathers through them can be followed exactly."""
    tensors = [a for a in node.all_input_nodes]
    if not tensors or not all(a in p.const for a in tensors):
        return
    try:
        args = torch.fx.node.map_arg(node.args, lambda a: p.const[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: p.const[a])
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - folding is an optimisation; failure means "unknown"
        return
    if isinstance(out, torch.Tensor) and not out.is_floating_point():
        p.const[node] = out


def _unknown(p: Propagator, node, what: str) -> Any:
    for a in node.all_input_nodes:
        p.freeze(p.value(a), f"{what} is not understood by the analysis")
    if any(True for _ in _comps(node, p)):
        p.opaque.append((node, what))
    return p.unlabeled_like(node)


def _comps(node, p):
    for a in node.all_input_nodes:
        v = p.value(a)
        if isinstance(v, TV) and v.comps:
            yield v


def _out_shape(node):
    return _shape(node) or ()


def _pointwise(p: Propagator, node) -> Any:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
            # e.g. native_dropout returns (out, mask)
            first = _pointwise_tensor(p, node, tuple(int(s) for s in val[0].shape))
            return [first] + [_structure_of(v) for v in val[1:]]
        return _structure_of(val)
    return _pointwise_tensor(p, node, tuple(int(s) for s in val.shape))


def _structure_of(val):
    if isinstance(val, torch.Tensor):
        return TV([], tuple(int(s) for s in val.shape))
    if isinstance(val, (tuple, list)):
        return [_structure_of(v) for v in val]
    return None


def _pointwise_tensor(p, node, shape):
    operands = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, torch.fx.Node):
            v = p.value(a)
            if isinstance(v, TV):
                operands.append(v)
    out = p.pointwise(operands, shape)
    keep_param = [v for v in operands if v.param is not None]
    name = op_name(node, p.gm)
    if len(operands) == 1 and keep_param and name in ("to", "contiguous", "clone", "detach",
                                                      "type", "float", "half", "bfloat16",
                                                      "_to_copy", "alias", "requires_grad_"):
        out.param = keep_param[0].param
    return out


def _pointwise_lazy_ok(p, node):
    return None


def _reshape(p: Propagator, node) -> Any:
    """View-like reshape. A channel dim merged with a plain dim (heads folded into the batch,
    ``(B, h) -> B*h``) keeps its labels as copies along the merged dim: every position still
    knows its channel, so what the merged dim meets later is judged by the ops there (a
    depthwise conv shared by the folded heads ties channel ``j`` of every head)."""
    x = p.tv(node.args[0])
    out_shape = _out_shape(node)
    if x is None:
        return p.plain(out_shape)
    comps = []
    for c in x.comps:
        try:
            nc, _mixed = layout.reshape_comp(c, x.shape, out_shape)
        except ValueError:
            p.store.freeze(c.lab, f"reshape {x.shape} -> {out_shape} cannot be aligned at "
                           f"{node.name}")
            continue
        comps.append(layout.drop_constant_dims(nc))
    return TV(comps, out_shape, x.soft, None)


def _permute(p: Propagator, node, name) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.plain(_out_shape(node))
    nd = x.ndim
    if name == "permute":
        perm = _dims_arg(node.args[1:] or node.kwargs.get("dims"), nd)
    elif name == "t" or name == "numpy_T":
        perm = list(range(nd))[::-1]
    elif name == "movedim":
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d % nd] = s % nd
        rest = iter(d for d in range(nd) if d not in [s % nd for s in src])
        perm = [q if q is not None else next(rest) for q in perm]
    else:
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        perm = list(range(nd))
        d0, d1 = d0 % nd, d1 % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
    shape = tuple(x.shape[q] for q in perm)
    if x.param is not None:  # stay lazy: a transposed weight is usually contracted next
        param = (x.param[0], tuple(x.param[1][q] for q in perm))
        return TV(None, shape, x.soft, param,
                  lazy=lambda: [layout.permute_comp(c, perm) for c in x.comps])
    return TV([layout.permute_comp(c, perm) for c in x.comps], shape, x.soft)


# reductions with an order argument before ``dim``: (input, p/ord, dim, keepdim)
_NORMS = {"norm", "linalg_vector_norm", "linalg_norm"}


def _reduce_args(node, name):
    """``(dims, keepdim, order)`` of a reduction node, whatever the call form."""
    if name in _NORMS:
        order = _arg(node, 1, "ord" if name != "norm" else "p", None)
        return _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False)), order
    if name in ("var", "std", "var_mean", "std_mean") and len(node.args) > 3:
        return node.args[1], bool(node.args[3]), None
    return _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)), None


def _zero_safe(name: str, order) -> bool:
    """A reduction whose result ignores entries that are exactly zero: masking its input
    equals removing those entries (sum, p-norms with p > 0)."""
    if name in ("sum", "nansum"):
        return True
    if name in _NORMS:
        if order is None or order == "fro":
            return True
        return isinstance(order, (int, float)) and order > 0
    return False


def _reduce(p: Propagator, node, name) -> Any:
    """Reductions. One over all of a comp's channel dims that ignores zeros (a sum, a norm, as
    in focused linear attention's norm over all channels) is a sink: gating its input equals
    removing the channels. Any other reduction over channels freezes them."""
    x = p.tv(node.args[0])
    val = node.meta.get("val")
    if x is None:
        return p.unlabeled_like(node)
    dims, keepdim, order = _reduce_args(node, name)
    if isinstance(dims, torch.fx.Node) or isinstance(order, torch.fx.Node):
        return _pointwise(p, node)  # torch.max(a, b) and friends are elementwise
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % x.ndim for d in dims)
    comps = []
    for c in x.comps:
        if set(c.span) & set(dims):
            if not x.soft and set(c.span) <= set(dims) and _zero_safe(name, order):
                p.sinks.append(Sink(node, 0, c, "reduce"))
            else:
                p.store.freeze(c.lab, f"{name} reduces over channels at {node.name}")
            continue
        comps.append(c if keepdim else layout.squeeze_comp(
            Comp(c.lab, c.span, c.soft), dims))
    if isinstance(val, (tuple, list)):  # max/min with dim return (values, indices)
        shape = tuple(int(s) for s in val[0].shape)
        return [TV(comps, shape, x.soft), TV(list(comps), shape, x.soft)]
    return TV(comps, _out_shape(node), x.soft)


def _softmax(p: Propagator, node) -> Any:
    x = p.tv(node.args[0])
    if x is None:
        return p.plain(_out_shape(node))
    dim = _arg(node, 1, "dim")
    if dim is None:
        dim = x.ndim - 1
    dim %= x.ndim
    for c in x.comps:
        if dim in c.span:
            p.store.freeze(c.lab, f"softmax over channels at {node.name}")
    return TV(list(x.comps), x.shape, x.soft)


def _normalize(p: Propagator, node, x_arg, norm_dims, weight, bias, what) -> Any:
    x = p.tv(x_arg)
    shape = _out_shape(node) if isinstance(node.meta.get("val"), torch.Tensor) else (
        x.shape if x else ())
    if x is None:
        return p.plain(shape)
    nd = x.ndim
    norm_dims = {d % nd for d in norm_dims}
    for c in x.comps:
        if set(c.span) & norm_dims:
            p.store.freeze(c.lab, f"{what} normalizes over these channels at {node.name}")
    operands = [x] + [w for w in (weight, bias) if isinstance(w, TV)]
    out = p.pointwise(operands, x.shape)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):  # native_layer_norm returns (out, mean, rstd)
        return [out] + [p.plain(tuple(int(s) for s in v.shape)) for v in val[1:]]
    return out


def _param_of_module(p, node, attr) -> TV | None:
    mod = p.gm.get_submodule(node.target)
    if getattr(mod, attr, None) is None:
        return None
    return p.param_value(f"{node.target}.{attr}")


def _linear(p: Propagator, node, x_arg, w: TV | None, b: TV | None) -> Any:
    x = p.tv(x_arg) or p.plain(_out_shape(node))
    out_shape = _out_shape(node)
    if w is None:
        return _unknown(p, node, "linear without a weight")
    nd = max(x.ndim, 1)
    letters = LETTERS[:nd]
    out = p.contract([(x, letters), (w, "Z" + letters[-1])], letters[:-1] + "Z",
                     sink_args=[0, None], sink_kind="linear")
    if b is not None:
        out = p.pointwise([out, b], out.shape)
    out.shape = out_shape
    rows = [c for c in out.comps if c.span == (nd - 1,)]
    if rows:
        p.sources.append((node, rows[0].lab))
    return out


def _conv(p: Propagator, node, x_arg, w: TV | None, b: TV | None, groups: int) -> Any:
    x = p.tv(x_arg) or p.plain(_out_shape(node))
    out_shape = _out_shape(node)
    if w is None:
        return _unknown(p, node, "convolution without a weight")
    extra = len(out_shape) - 2
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
        p.freeze(x, f"grouped convolution (groups={groups})")
        head = p.plain((x.shape[0], out_shape[1]))
    comps = [Comp(c.lab.reshape(c.lab.shape + (1,) * extra), c.span, c.soft) for c in head.comps]
    out = TV(comps, out_shape, x.soft and head.soft)
    if b is not None:
        bb = TV([Comp(c.lab.reshape(c.lab.shape + (1,) * extra), c.span, c.soft)
                 for c in _align(b, 2).comps], (1, out_shape[1]) + (1,) * extra, True)
        out = p.pointwise([out, bb], out_shape)
    rows = [c for c in out.comps if c.span == (1,)]
    if rows:
        p.sources.append((node, rows[0].lab))
    return out


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


from fxprune.analysis.rules.contraction import RULES, _module_rule  # noqa: E402  (rules table needs helpers above)

__all__ = ["apply_rule", "op_name", "RULES", "_module_rule", "RawSite", "np", "operator"]
