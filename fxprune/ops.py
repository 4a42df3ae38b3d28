"""One way to name an op, and the op families every part of fxprune uses.

Ops are identified by what they are (torch functions, Tensor methods, aten overloads,
``operator`` builtins and ``torch.nn`` module classes), never by node or model names. The
analysis rules, slicing, the MACs model and the passes all name ops through :func:`op_name`.

Example:
    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.gelu(x).transpose(0, 1))
    >>> [op_name(n) for n in gm.graph.nodes]   # functions and methods by name, else None
    [None, 'gelu', 'transpose', None]
    >>> "gelu" in POINTWISE, "transpose" in PERMUTE
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn

POINTWISE = {
    "add", "sub", "rsub", "mul", "div", "truediv", "floordiv", "pow", "neg", "exp", "log",
    "sqrt", "rsqrt", "abs", "sigmoid", "tanh", "relu", "gelu", "silu", "softplus", "elu",
    "leaky_relu", "hardswish", "hardsigmoid", "mish", "relu6", "hardtanh", "clamp", "clamp_min",
    "clamp_max", "clip", "where", "masked_fill", "dropout", "contiguous", "clone", "detach",
    "type", "float", "half", "bfloat16", "double", "sign", "erf", "sin", "cos",
    "reciprocal", "square", "maximum", "minimum", "le", "lt", "ge", "gt", "eq", "ne",
    "logical_and", "logical_or", "logical_not", "iadd", "imul", "isub", "itruediv", "add_",
    "mul_", "div_", "sub_", "bernoulli_", "bernoulli", "fill_", "zero_", "_to_copy", "alias",
    "lift_fresh_copy", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
    "randn_like", "exp_", "sigmoid_", "relu_", "gelu_", "native_dropout", "requires_grad_",
    "feature_dropout", "dropout1d", "dropout2d", "alpha_dropout", "_assert_tensor_metadata",
    "__and__", "__or__", "and_", "or_", "logit", "addcmul", "lerp",
    # in-place activations as torch.export records them (``nn.Hardswish(inplace=True)``)
    "hardswish_", "hardsigmoid_", "hardtanh_", "silu_", "elu_", "leaky_relu_", "mish_",
    "tanh_", "clamp_", "clamp_min_", "clamp_max_",
}
#: elementwise casts whose tensor arguments after the first only give a dtype or device
CAST = {"to", "type_as"}
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
             "sym_numel", "_assert_scalar", "sym_constrain_range_for_size", "_log_api_usage_once",
             "_enter_autocast", "_exit_autocast"}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax"}
SPATIAL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU,
               nn.ELU, nn.Softplus, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Dropout,
               nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)

SAFE_FUNCTION_MODULES = ("_operator", "operator", "builtins", "math")


def op_name(node: torch.fx.Node, gm=None) -> str | None:
    """Canonical name of a call_function / call_method node: a torch function, Tensor method,
    aten overload or safe builtin by its name, else None (placeholders, modules, user
    functions). ``gm`` is accepted for call sites that have it; the name does not depend on it."""
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
    if mod.startswith("torch") or mod in SAFE_FUNCTION_MODULES:
        return name.lstrip("_") if name in ("__getitem__",) else name
    return None


def fetch_attr(root: torch.nn.Module, target: str) -> Any:
    """The object at a dotted attribute path (``"blocks.0.attn.qkv.weight"``) under ``root``.

    Example:
        >>> fetch_attr(torch.nn.Sequential(torch.nn.Linear(2, 3)), "0.weight").shape
        torch.Size([3, 2])
    """
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def attr_owner(root: torch.nn.Module, target: str) -> tuple[Any, str]:
    """The object holding the attribute at a dotted path, and the attribute's own name (to
    replace it with ``setattr``).

    Example:
        >>> owner, leaf = attr_owner(torch.nn.Sequential(torch.nn.Linear(2, 3)), "0.weight")
        >>> type(owner).__name__, leaf
        ('Linear', 'weight')
    """
    path, _, leaf = target.rpartition(".")
    return (fetch_attr(root, path) if path else root), leaf
