"""Rules for ``torch.nn`` modules called as ``call_module`` nodes, registered by class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from fxprune.analysis.labels import Comp
from fxprune.analysis.rules.common import param_of_module, pointwise
from fxprune.analysis.rules.contraction import conv, linear
from fxprune.analysis.rules.indexing import along_dims
from fxprune.analysis.rules.movement import reshape
from fxprune.analysis.rules.normalization import normalize, softmax_over
from fxprune.analysis.rules.registry import module_rule
from fxprune.analysis.values import TV
from fxprune.ops import ACT_MODULES, SPATIAL_MODULES

if TYPE_CHECKING:
    from fxprune.analysis.propagate import Propagator


def _input(node) -> Any:
    return node.args[0] if node.args else None


@module_rule(nn.Linear)
def _linear_module(p: Propagator, node) -> Any:
    return linear(p, node, _input(node), param_of_module(p, node, "weight"),
                  param_of_module(p, node, "bias"))


@module_rule(nn.Conv1d, nn.Conv2d)
def _conv_module(p: Propagator, node) -> Any:
    mod = p.gm.get_submodule(node.target)
    return conv(p, node, _input(node), param_of_module(p, node, "weight"),
                param_of_module(p, node, "bias"), mod.groups)


@module_rule(nn.LayerNorm)
def _layer_norm_module(p: Propagator, node) -> Any:
    mod = p.gm.get_submodule(node.target)
    return normalize(p, node, _input(node), range(-len(mod.normalized_shape), 0),
                     param_of_module(p, node, "weight"), param_of_module(p, node, "bias"),
                     "LayerNorm")


if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    @module_rule(nn.RMSNorm)
    def _rms_norm_module(p: Propagator, node) -> Any:
        mod = p.gm.get_submodule(node.target)
        return normalize(p, node, _input(node), range(-len(mod.normalized_shape), 0),
                         param_of_module(p, node, "weight"), None, "RMSNorm")


@module_rule(nn.GroupNorm)
def _group_norm_module(p: Propagator, node) -> Any:
    return normalize(p, node, _input(node), [1], None, None, "GroupNorm")


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm_module(p: Propagator, node) -> Any:
    x = p.tv(_input(node))
    if x is None:
        return p.unlabeled_like(node)
    extra = x.ndim - 2
    operands = [x]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = param_of_module(p, node, attr)
        if t is not None:
            operands.append(TV([Comp(c.lab.reshape((1,) + c.lab.shape + (1,) * extra),
                                     tuple(d + 1 for d in c.span), True) for c in t.comps],
                               (1,) + t.shape + (1,) * extra, True))
    return p.pointwise(operands, x.shape)


@module_rule(*ACT_MODULES)
def _activation_module(p: Propagator, node) -> Any:
    return pointwise(p, node)


@module_rule(nn.Softmax)
def _softmax_module(p: Propagator, node) -> Any:
    x = p.tv(_input(node))
    if x is None:
        return p.unlabeled_like(node)
    mod = p.gm.get_submodule(node.target)
    dim = mod.dim if mod.dim is not None else x.ndim - 1
    return softmax_over(p, node, x, dim % x.ndim)


@module_rule(nn.Flatten)
def _flatten_module(p: Propagator, node) -> Any:
    return reshape(p, node)


@module_rule(*SPATIAL_MODULES)
def _pooling_module(p: Propagator, node) -> Any:
    x = p.tv(_input(node))
    if x is None:
        return p.unlabeled_like(node)
    return along_dims(p, node, range(2, x.ndim), "pooling")
