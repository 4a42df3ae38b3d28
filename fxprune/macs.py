"""The MACs model: multiply-accumulates of one forward pass, read off an fx graph's shapes.

"MACs" here means the multiply-accumulates of the matrix products only (Linear, convolution,
matmul/bmm/einsum, attention's ``q @ k^T`` and ``attn @ v``); elementwise ops, norms, softmax and
pooling count 0. That is the convention of the published figures (DeiT-S 4.6 G, Swin-T 4.5 G)
and of ``torch.utils.flop_counter`` (which reports FLOPs = 2 x MACs).

Every count is a function of tensor shapes obtained through ``shape_of(node)``, so a caller can
ask what a graph would cost with other (e.g. pruned) widths without rebuilding it.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> fxprune.count_macs(m, torch.randn(2, 8))  # 2*16*8 + 2*4*16
    384
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxprune.errors import InputError
from fxprune.meta import has_shapes
from fxprune.tracing import trace

WHERE = "fxprune.count_macs"

ShapeFn = Callable[[torch.fx.Node], tuple[int, ...]]
aten = torch.ops.aten


def _default_shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise InputError(WHERE, "node has no tensor shape in node.meta['val']", node=node,
                         hint="trace the model with fxprune.trace(model, example_inputs) first")
    return tuple(int(s) for s in val.shape)


def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# -- handlers: (node, shape_of) -> MACs -------------------------------------------------------

def _matmul(node, shape, index=0, name="input"):
    # numel(out) * K holds for every matmul form: 1-D operands only drop a dim of the output,
    # and broadcast batch dims are already in the output's numel.
    return _numel(shape(node)) * shape(_arg(node, index, name))[-1]


def _addmm(node, shape):
    return _matmul(node, shape, 1, "mat1" if "mat1" in node.kwargs else "batch1")


def _conv_fn(node, shape):
    # weight is (Cout, Cin/groups, *k) for a convolution, (Cin, Cout/groups, *k) transposed;
    # each output (resp. input) element costs prod(weight.shape[1:]).
    w = shape(_arg(node, 1, "weight"))
    transposed = node.target is aten.convolution.default and bool(_arg(node, 6, "transposed"))
    if transposed:
        return _numel(shape(_arg(node, 0, "input"))) * _numel(w[1:])
    # the input's channels, not the weight's (a planner prices pruned inputs by the input's
    # shape alone); a depthwise conv (one input channel per group) stays depthwise
    x = shape(_arg(node, 0, "input"))
    groups = _arg(node, 8 if node.target is aten.convolution.default else 6, "groups") or 1
    cin = x[len(x) - (len(w) - 2) - 1] if x is not None and len(x) >= len(w) - 1 else None
    per_group = w[1] if cin is None or w[1] == 1 or not isinstance(groups, int) \
        else cin // groups
    return _numel(shape(node)) * per_group * _numel(w[2:])


def _sdpa(node, shape):
    q = shape(_arg(node, 0, "query"))
    k = shape(_arg(node, 1, "key"))
    v = shape(_arg(node, 2, "value"))
    # q's leading dims, not k's: with grouped-query attention k/v heads are broadcast to q's.
    return _numel(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _einsum(node, shape):
    if node.target is aten.einsum.default:
        operands = list(node.args[1])
    elif len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        operands = list(node.args[1])
    else:
        operands = list(node.args[1:])
    return einsum_macs(node.args[0], [shape(o) for o in operands])


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """MACs of ``torch.einsum(equation, *operands)`` with operands of the given shapes,
    contracted left to right as torch does.

    Example:
        >>> einsum_macs("bhnd,bhmd->bhnm", [(2, 3, 5, 8), (2, 3, 7, 8)])  # 2*3*5*7*8
        1680
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    n_ell = max((len(s) - len(t) + 3 for t, s in zip(terms, shapes) if "..." in t), default=0)
    ell = [chr(0x100 + i) for i in range(n_ell)]  # stand-ins that cannot clash with letters
    sizes: dict[str, int] = {}
    expanded = []
    for term, shp in zip(terms, shapes):
        if "..." in term:
            k = len(shp) - len(term) + 3
            term = term.replace("...", "".join(ell[n_ell - k:]))
        for ch, size in zip(term, shp):
            sizes[ch] = max(sizes.get(ch, 1), int(size))  # broadcast dims of size 1
        expanded.append(term)
    if arrow:
        out = set(rhs.replace("...", "".join(ell)))
    else:  # implicit mode keeps the letters that occur once
        letters = "".join(expanded)
        out = {c for c in letters if letters.count(c) == 1} | set(ell)
    total, current = 0, set(expanded[0]) if expanded else set()
    for i, term in enumerate(expanded[1:], start=1):
        needed = out.union(*map(set, expanded[i + 1:]))
        # a letter private to one side is summed out before the product: it costs no MACs
        left = {c for c in current if c in needed or c in term}
        right = {c for c in term if c in needed or c in current}
        total += math.prod(sizes[c] for c in left | right)
        current = (left | right) & needed
    return total


def _shifted_window_attention(node, shape):
    # torchvision's swin wraps its whole attention in one fx leaf; the math mirrors its body:
    # pad to whole windows, qkv Linear, per-window q @ k^T and attn @ v, output Linear.
    b, h, w, c = shape(_arg(node, 0, "input"))
    qkv = shape(_arg(node, 1, "qkv_weight"))
    proj = shape(_arg(node, 2, "proj_weight"))
    wh, ww = _arg(node, 4, "window_size")
    tokens = b * math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
    return tokens * (c * qkv[0] + wh * ww * 2 * (qkv[0] // 3) + proj[1] * proj[0])


def _linear_module(node, mod, shape):
    return _numel(shape(node)) * shape(_arg(node, 0, "input"))[-1]


def _conv_module(node, mod, shape):
    kernel = _numel(mod.kernel_size)
    x = shape(_arg(node, 0, "input"))
    cin = x[len(x) - len(mod.kernel_size) - 1]
    # a depthwise conv stays depthwise when its channels are pruned: groups follow cin
    groups = cin if 1 < mod.groups == mod.in_channels else mod.groups
    if mod.transposed:
        out = shape(node)
        cout = out[len(out) - len(mod.kernel_size) - 1]
        return _numel(x) * (cout // groups) * kernel
    return _numel(shape(node)) * (cin // groups) * kernel


def _mha_module(node, mod, shape):
    q = shape(_arg(node, 0, "query"))
    k = shape(_arg(node, 1, "key"))
    v = shape(_arg(node, 2, "value"))
    e = mod.embed_dim
    tokens_q, tokens_k = _numel(q[:-1]), _numel(k[:-1])
    len_k = k[1] if mod.batch_first and len(k) == 3 else k[0]
    projections = tokens_q * q[-1] * e + tokens_k * (k[-1] + v[-1]) * e + tokens_q * e * e
    return projections + tokens_q * len_k * 2 * e  # heads * head_dim == e for q@k and attn@v


_FUNCTIONS: dict[Any, Callable] = {
    F.linear: _matmul, aten.linear: _matmul,
    operator.matmul: _matmul, torch.matmul: _matmul, torch.bmm: _matmul, torch.mm: _matmul,
    aten.matmul: _matmul, aten.mm: _matmul, aten.bmm: _matmul,
    torch.addmm: _addmm, torch.baddbmm: _addmm, aten.addmm: _addmm, aten.baddbmm: _addmm,
    torch.conv1d: _conv_fn, torch.conv2d: _conv_fn, torch.conv3d: _conv_fn,
    aten.conv1d: _conv_fn, aten.conv2d: _conv_fn, aten.conv3d: _conv_fn,
    aten.convolution: _conv_fn,
    F.scaled_dot_product_attention: _sdpa, aten.scaled_dot_product_attention: _sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention: _sdpa,
    aten._scaled_dot_product_efficient_attention: _sdpa,
    torch.einsum: _einsum, aten.einsum: _einsum,
}
_METHODS = {"matmul": _matmul, "__matmul__": _matmul, "bmm": _matmul, "mm": _matmul}
_MODULES: list[tuple[type, Callable]] = [
    (nn.Linear, _linear_module), (nn.modules.conv._ConvNd, _conv_module),
    (nn.MultiheadAttention, _mha_module),
]
# fx leaves that third-party libraries declare with torch.fx.wrap: (module, name) -> handler
_WRAPPED = {("torchvision.models.swin_transformer", "shifted_window_attention"):
            _shifted_window_attention}


def _function_handler(target: Any) -> Callable | None:
    key = getattr(target, "overloadpacket", target)  # aten.mm.default -> aten.mm
    try:
        handler = _FUNCTIONS.get(key)
    except TypeError:  # unhashable target
        return None
    if handler is None:
        handler = _WRAPPED.get((getattr(target, "__module__", None),
                                getattr(target, "__name__", None)))
    return handler


def node_macs(node: torch.fx.Node, gm: torch.fx.GraphModule,
              shape_of: ShapeFn | None = None) -> int:
    """MACs of one node. ``shape_of(node)`` gives the shape of a tensor-valued node (default:
    its ``meta["val"]`` shape); pass another function to price would-be shapes.

    Example:
        >>> import torch, fxprune
        >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(8, 16)), torch.randn(2, 8))
        >>> lin = next(n for n in gm.graph.nodes if n.op == "call_module")
        >>> halved = lambda n: (2, 8) if n is lin else tuple(n.meta["val"].shape)
        >>> node_macs(lin, gm), node_macs(lin, gm, halved)
        (256, 128)
    """
    shape = shape_of or _default_shape
    if node.op == "call_function":
        handler = _function_handler(node.target)
        return int(handler(node, shape)) if handler else 0
    if node.op == "call_method":
        handler = _METHODS.get(node.target)
        return int(handler(node, shape)) if handler else 0
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        own = getattr(mod, "fxprune_macs", None)
        if callable(own):  # modules fxprune inserts (e.g. token channel selection) price
            return int(own([shape(a) for a in node.args if isinstance(a, torch.fx.Node)]))
        for cls, handler in _MODULES:
            if isinstance(mod, cls):
                return int(handler(node, mod, shape))
        _warn_opaque(node, mod)
    return 0


def _warn_opaque(node: torch.fx.Node, mod: nn.Module) -> None:
    # A leaf hiding Linear/Conv layers (e.g. nn.TransformerEncoderLayer) would be undercounted
    # silently; say so instead of guessing its internals.
    kinds = tuple(cls for cls, _ in _MODULES)
    name = type(mod).__name__
    if any(isinstance(m, kinds) for m in mod.modules()):
        warnings.warn(f"[{WHERE}] call_module {node.target!r} ({name}) is an opaque leaf with "
                      "matrix-product layers inside; it counts 0 MACs", stacklevel=3)


def macs_by_node(gm: torch.fx.GraphModule, shape_of: ShapeFn | None = None) -> dict[str, int]:
    """Node name -> MACs, for the nodes that cost any.

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        >>> macs_by_node(fxprune.trace(m, torch.randn(2, 8)))
        {'_0': 256}
    """
    counts = {}
    for node in gm.graph.nodes:
        macs = node_macs(node, gm, shape_of)
        if macs:
            counts[node.name] = macs
    return counts


def count_macs(module: Any, example_inputs: Any = None) -> int:
    """Multiply-accumulates of one forward of ``module`` (matrix products only; see the
    module docstring).

    ``module`` may be an ``nn.Module``, a ``GraphModule`` or a ``torch.export.ExportedProgram``.
    A GraphModule from :func:`fxprune.trace` is counted as is when ``example_inputs`` is None;
    an ExportedProgram without inputs uses its own example inputs.

    Example:
        >>> import torch, fxprune
        >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        >>> fxprune.count_macs(conv, torch.randn(1, 3, 4, 4))  # 8*4*4 outputs * 3*3*3
        3456
    """
    exported_cls = getattr(torch.export, "ExportedProgram", None)
    is_exported = exported_cls is not None and isinstance(module, exported_cls)
    if not (isinstance(module, nn.Module) or is_exported):
        raise InputError(WHERE, f"expected an nn.Module, GraphModule or ExportedProgram, got "
                         f"{type(module).__name__}", hint="pass the model object itself")
    if example_inputs is None:
        if isinstance(module, torch.fx.GraphModule) and has_shapes(module):
            return sum(macs_by_node(module).values())
        if is_exported and module.example_inputs is not None:
            example_inputs = module.example_inputs[0]
        else:
            raise InputError(WHERE, "example_inputs are needed to know the shapes",
                             hint="pass e.g. torch.randn(1, 3, 224, 224), or a GraphModule "
                             "from fxprune.trace")
    return sum(macs_by_node(trace(module, example_inputs)).values())
