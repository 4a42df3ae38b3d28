"""``decompose-mha``: replace every ``call_module`` of ``torch.nn.MultiheadAttention`` by plain
ops the analysis reads.

The rewrite of one call (self-attention, packed in-projection, as in torchvision's ViT)::

    qkv = F.linear(x, <get_attr ...in_proj_weight>, <get_attr ...in_proj_bias>)
    q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)           # need_weights=False, no dropout
    o = o.transpose(1, 2).reshape(B, N, embed_dim)
    out = F.linear(o, <get_attr ...out_proj.weight>, <get_attr ...out_proj.bias>)

* ``batch_first=False`` inputs are transposed to batch-first first and the output back.
* Cross-attention (query, key, value not the same node) or separate ``q/k/v_proj_weight``
  (``kdim``/``vdim`` != ``embed_dim``): three ``F.linear`` calls; with a packed in-projection
  their weights and biases are row slices (``getitem``) of the ``get_attr`` parameters.
* ``need_weights=True`` (the default of ``nn.MultiheadAttention.forward``) with the weights
  read by some node, or ``dropout > 0``: explicit attention,
  ``softmax((q * head_dim**-0.5) @ k.transpose(-2, -1)) @ v`` (the scaling torch's MHA uses);
  the returned weights are averaged over heads when ``average_attn_weights`` (as in torch).
  Attention dropout becomes an ``nn.Dropout`` submodule added to the GraphModule root (named
  ``<node>_attn_dropout``), so it follows ``gm.train()``/``gm.eval()`` like the original.
* The node's ``(attn_output, attn_weights_or_None)`` result is honoured: ``getitem`` users are
  folded to the new values (``None`` where weights were not asked for).
* Parameters are read with ``get_attr`` under their original qualified names
  (``<mha>.in_proj_weight``, ``<mha>.out_proj.weight``, ...); ``Options.out_proj="module"``
  keeps the output projection as ``call_module <mha>.out_proj`` instead.

Refused (the node is left as it is; the reason is recorded in ``PassResult.info["refused"]``
as ``{"node", "target", "reason"}``, or :class:`DecomposeError` is raised with
``Options(strict=True)``): ``key_padding_mask`` or ``attn_mask`` given (as a graph value or a
constant), ``is_causal=True``, ``need_weights``/``average_attn_weights`` given as graph values,
``add_bias_kv`` (``bias_k``/``bias_v``), ``add_zero_attn``, unbatched (2-D) inputs, and calls
whose shapes cannot be traced.

Example:
    >>> import torch, fxprune
    >>> from fxprune.passes.decompose_mha import DecomposeMultiheadAttention
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> gm = fxprune.trace(Block().eval(), torch.randn(2, 5, 16))
    >>> result = DecomposeMultiheadAttention()(gm)
    >>> result.changes[0].split(":")[0]
    'attn'
    >>> sorted({n.target for n in result.graph_module.graph.nodes if n.op == "get_attr"})
    ['attn.in_proj_bias', 'attn.in_proj_weight', 'attn.out_proj.bias', 'attn.out_proj.weight']
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Node

from fxprune.errors import DecomposeError
from fxprune.passbase import FxPass, PassResult

from ._support.fake_meta import copy_for_rewrite, refresh_meta, require_shapes
from ._support.inline import inline_call, replace_node
from ._support.worlds import InlineError, WorldSet

__all__ = ["DecomposeMultiheadAttention", "DecomposeMhaOptions"]


@dataclasses.dataclass(frozen=True)
class DecomposeMhaOptions:
    """``strict``: raise :class:`DecomposeError` on the first unsupported call instead of
    leaving it and recording the reason. ``out_proj``: ``"linear"`` (``F.linear`` with
    ``get_attr`` weight and bias) or ``"module"`` (``call_module`` of ``<mha>.out_proj``)."""

    strict: bool = False
    out_proj: str = "linear"

    def __post_init__(self):
        if self.out_proj not in ("linear", "module"):
            raise ValueError(f"out_proj must be 'linear' or 'module', got {self.out_proj!r}")


_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


def _mha_plain(query, key, value, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
               v_proj_weight, out_proj_weight, out_proj_bias, *, num_heads: int, embed_dim: int,
               batch_first: bool, self_attention: bool, need_weights: bool,
               average_attn_weights: bool, attn_dropout: str | None, out_proj_module: str | None,
               tracer) -> tuple[Any, Any]:
    """nn.MultiheadAttention's forward (no masks, no bias_kv, no zero_attn) in plain ops."""
    head_dim = embed_dim // num_heads
    if not batch_first:
        query = query.transpose(0, 1)
        if not self_attention:
            key = key.transpose(0, 1)
            value = value.transpose(0, 1)
    if self_attention:
        key = value = query
    B, L, _ = query.shape
    S = key.shape[1]
    if self_attention and in_proj_weight is not None:
        qkv = F.linear(query, in_proj_weight, in_proj_bias)
        qkv = qkv.reshape(B, L, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        E = embed_dim
        if in_proj_weight is not None:
            w_q, w_k, w_v = in_proj_weight[:E], in_proj_weight[E:2 * E], in_proj_weight[2 * E:]
        else:
            w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias[:E], in_proj_bias[E:2 * E], in_proj_bias[2 * E:]
        else:
            b_q = b_k = b_v = None
        q = F.linear(query, w_q, b_q).reshape(B, L, num_heads, head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).reshape(B, S, num_heads, head_dim).transpose(1, 2)
        v = F.linear(value, w_v, b_v).reshape(B, S, num_heads, head_dim).transpose(1, 2)
    weights = None
    if need_weights or attn_dropout is not None:
        attn = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        attn = attn.softmax(dim=-1)
        if attn_dropout is not None:
            attn = tracer.module_call(attn_dropout, attn)
        out = torch.matmul(attn, v)
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(B, L, embed_dim)
    if out_proj_module is not None:
        out = tracer.module_call(out_proj_module, out)
    else:
        out = F.linear(out, out_proj_weight, out_proj_bias)
    if not batch_first:
        out = out.transpose(0, 1)
    return out, weights


class DecomposeMultiheadAttention(FxPass):
    """Replace ``nn.MultiheadAttention`` calls by plain ops (see the module docstring)."""

    name = "decompose-mha"
    Options = DecomposeMhaOptions

    def requires(self, gm: torch.fx.GraphModule) -> None:
        super().requires(gm)
        require_shapes(self.name, gm)

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        if not _sites(gm):
            return PassResult(gm, modified=False, changes=[], info={"refused": []})
        gm = copy_for_rewrite(gm)
        changes: list[str] = []
        refused: list[dict[str, str]] = []
        worlds: WorldSet | None = None
        sites = _sites(gm)
        for node in sites:
            mha = gm.get_submodule(node.target)
            reason, call = self._check(node, mha)
            if reason is None:
                worlds = worlds or WorldSet(gm, self.name)
                reason = self._rewrite(gm, node, mha, call, worlds, changes)
            if reason is not None:
                if self.options.strict:
                    raise DecomposeError(
                        self.name, f"cannot decompose nn.MultiheadAttention {node.target!r}: "
                        f"{reason}", node=node,
                        hint="run with strict=False to leave this call opaque (the analysis "
                        "then reports it and keeps its channels dense), or rewrite the model "
                        "to call attention without the unsupported option")
                refused.append({"node": node.name, "target": str(node.target), "reason": reason})
        if changes:
            refresh_meta(gm, self.name)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=bool(changes), changes=changes,
                          info={"refused": refused})

    # -- checks -------------------------------------------------------------------------
    def _check(self, node: Node, mha: nn.MultiheadAttention
               ) -> tuple[str | None, dict[str, Any]]:
        try:
            bound = _FORWARD.bind(None, *node.args, **node.kwargs)
        except TypeError as exc:
            return f"unexpected call arguments ({exc})", {}
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        for name in ("query", "key", "value"):
            if not isinstance(call[name], Node):
                return f"{name} is not a graph value", call
        if call["key_padding_mask"] is not None:
            return "key_padding_mask is given (masks are not supported)", call
        if call["attn_mask"] is not None:
            return "attn_mask is given (masks are not supported)", call
        for name in ("need_weights", "average_attn_weights", "is_causal"):
            if not isinstance(call[name], bool):
                return f"{name} is a graph value, not a constant", call
        if call["is_causal"]:
            return "is_causal=True is not supported", call
        if mha.bias_k is not None or mha.bias_v is not None:
            return "add_bias_kv=True (bias_k/bias_v) is not supported", call
        if mha.add_zero_attn:
            return "add_zero_attn=True is not supported", call
        for name in ("query", "key", "value"):
            val = call[name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                return f"{name} has no shape metadata (run fxprune.trace first)", call
            if val.dim() != 3:
                return f"{name} is {val.dim()}-D; only batched (3-D) inputs are supported", call
        return None, call

    # -- rewrite ------------------------------------------------------------------------
    def _rewrite(self, gm: torch.fx.GraphModule, node: Node, mha: nn.MultiheadAttention,
                 call: dict[str, Any], worlds: WorldSet, changes: list[str]) -> str | None:
        target = node.target
        self_attention = call["query"] is call["key"] is call["value"]
        packed = mha._qkv_same_embed_dim
        # weights nobody reads (need_weights defaults to True) are not computed: SDPA
        need_weights = call["need_weights"] and _weights_used(node)
        modules: dict[str, nn.Module] = {}
        drop_name = None
        if mha.dropout > 0:
            drop_name = f"{node.name}_attn_dropout"
            modules[drop_name] = nn.Dropout(mha.dropout)
        out_name = f"{target}.out_proj" if self.options.out_proj == "module" else None
        if out_name is not None:
            modules[out_name] = mha.out_proj

        created: list[Node] = []

        def param(attr: str) -> Node | None:
            if _get(mha, attr) is None:
                return None
            with gm.graph.inserting_before(node):
                n = gm.graph.get_attr(f"{target}.{attr}")
            created.append(n)
            return n

        args = (call["query"], call["key"], call["value"],
                param("in_proj_weight") if packed else None,
                param("in_proj_bias"),
                None if packed else param("q_proj_weight"),
                None if packed else param("k_proj_weight"),
                None if packed else param("v_proj_weight"),
                None if out_name else param("out_proj.weight"),
                None if out_name else param("out_proj.bias"))
        kwargs = dict(num_heads=mha.num_heads, embed_dim=mha.embed_dim,
                      batch_first=mha.batch_first, self_attention=self_attention,
                      need_weights=need_weights,
                      average_attn_weights=call["average_attn_weights"],
                      attn_dropout=drop_name, out_proj_module=out_name)
        if drop_name is not None:
            gm.add_submodule(drop_name, modules[drop_name])
            gm.get_submodule(drop_name).train(mha.training)
        try:
            result = inline_call(gm, node, _mha_plain, args, kwargs, worlds=worlds,
                                 where=self.name, modules=modules, call_with_tracer=True)
        except InlineError as exc:
            for n in created:
                gm.graph.erase_node(n)
            if drop_name is not None:
                gm.delete_submodule(drop_name)
            return f"could not trace the decomposition: {exc}"
        replace_node(node, result.outputs, worlds)
        for n in created:  # a parameter the decomposition did not read
            if not n.users:
                gm.graph.erase_node(n)
        kind = "self-attention" if self_attention else "cross-attention"
        proj = "fused qkv F.linear" if self_attention and packed else "q/k/v F.linear"
        attn = ("explicit softmax" + (" + attn dropout module" if drop_name else "")
                if need_weights or drop_name else "scaled_dot_product_attention")
        changes.append(
            f"{target}: nn.MultiheadAttention ({kind}, heads={mha.num_heads}, "
            f"embed_dim={mha.embed_dim}, batch_first={mha.batch_first}, "
            f"need_weights={need_weights}) -> {proj} + {attn} + out_proj "
            f"({len(result.nodes)} nodes, dynamic sizes: {result.world_kind})")
        return None


def _weights_used(node: Node) -> bool:
    """Whether anything reads element 1 (the attention weights) of the call's result."""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem \
                and user.args[1] == 0:
            continue
        if user.op == "call_function" and user.target is operator.getitem \
                and user.args[1] == 1 and not user.users:
            continue
        return True
    return False


def _sites(gm: torch.fx.GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]


def _get(module: nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
