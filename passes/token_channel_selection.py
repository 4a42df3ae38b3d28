"""``token-channel-selection``: ToaSt's Token Channel Selection (TCS) for every MLP.

Per forward pass and without training, each MLP scores its hidden units from the class token
and a random sample of patch tokens weighted by how much the class token attends to them:

    a      = mean over heads of softmax(q_cls . K^T * scale)      (the block's attention)
    h_t    = act(fc1(x_t))        for the class token and ``sample`` random patch tokens
    score  = |h_cls| + sum_t a_t |h_t|                 (summed over the batch)

and then computes the MLP only on the ``keep_ratio`` best hidden units, for all tokens:
``fc2[:, kept](act(fc1[kept](x)))``: rows of fc1 and columns of fc2 are gathered, so the work
really shrinks (and ``count_macs`` prices it). Selection is per batch, not per image, so one
gather serves the whole batch.

Applies to models with a class token (a learned token concatenated in front of the patch
tokens, as in ViT/DeiT) whose MLPs are ``Linear -> elementwise activation -> Linear`` after
an attention site with 4-d q and k (batch, heads, tokens, dim). Refused, with the reason, for
models without a class token (mean-pooled, Swin) and MLPs of other shapes.

Graph before and after (one block)::

    fc1 -> act -> fc2                  ->   tcs_0(x, q, k)

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> gm = fxprune.trace(tiny_vit(), torch.randn(2, 3, 32, 32)); _ = fxprune.analyze(gm)
    >>> r = TokenChannelSelection(keep_ratio=0.5, sample=4)(gm)
    >>> r.info["rewritten"], fxprune.count_macs(r.graph_module) < fxprune.count_macs(gm)
    (2, True)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx
import torch.nn as nn

from fxprune.analysis.engine import get_analysis
from fxprune.errors import PlanError
from fxprune.meta import ANALYSIS_FINGERPRINT_KEY, ANALYSIS_KEY, SHAPE_KEY
from fxprune.ops import ACT_MODULES, CAST, POINTWISE, op_name
from fxprune.passbase import FxPass, PassResult, copy_graph_module

_DROPOUT = (nn.Dropout, nn.Identity)


class TokenChannelSelectionMLP(nn.Module):
    """The MLP ``fc2(act(fc1(x)))`` computed on the hidden units TCS selects (see module doc)."""

    def __init__(self, fc1: nn.Linear, act, fc2: nn.Linear, keep_ratio: float, sample: int,
                 scale: float, seed: int = 0):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act = act
        self.keep = max(1, int(round(keep_ratio * fc1.out_features)))
        self.sample = sample
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        attn = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * self.scale, dim=-1)
        attn = attn.mean(dim=1)[:, 0]                                  # (B, N)
        count = min(self.sample, n - 1)
        patches = torch.randperm(n - 1, generator=self.generator)[:count] + 1
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), patches]).to(x.device)
        h = self.act(self.fc1(x[:, tokens])).abs()                    # (B, 1+s, hidden)
        weights = torch.cat([torch.ones_like(attn[:, :1]), attn[:, patches]], dim=1)
        score = (h * weights.unsqueeze(-1).to(h.dtype)).sum(dim=(0, 1))
        return score.topk(self.keep).indices.sort().values

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kept = self.select(x, q, k)
        w1 = self.fc1.weight[kept]
        b1 = self.fc1.bias[kept] if self.fc1.bias is not None else None
        h = self.act(nn.functional.linear(x, w1, b1))
        return nn.functional.linear(h, self.fc2.weight[:, kept], self.fc2.bias)

    def fxprune_macs(self, shapes) -> int:
        x = shapes[0]
        tokens = math.prod(x[:-1])
        scored = x[0] * (1 + min(self.sample, x[1] - 1)) * x[-1] * self.fc1.out_features
        return tokens * self.keep * (self.fc1.in_features + self.fc2.out_features) + scored


@dataclasses.dataclass(frozen=True)
class TokenChannelSelectionOptions:
    keep_ratio: float = 0.5
    sample: int = 16
    seed: int = 0
    inplace: bool = False


def _has_class_token(gm) -> bool:
    """A learned token concatenated in front of the patch tokens (cat along the token dim
    whose first operand comes from a parameter only)."""
    for node in gm.graph.nodes:
        if op_name(node, gm) in ("cat", "concat") and node.args and isinstance(
                node.args[0], (list, tuple)) and len(node.args[0]) == 2:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            first = node.args[0][0]
            shape = first.meta.get(SHAPE_KEY) if isinstance(first, torch.fx.Node) else None
            if shape and len(shape) == 3 and dim % 3 == 1 and shape[1] == 1 and _from_params(
                    first):
                return True
    return False


def _from_params(node) -> bool:
    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        frontier.extend(a for a in n.all_input_nodes
                        if not (op_name(a, None) in ("getattr", "getitem")
                                and a.args and isinstance(a.args[0], torch.fx.Node)
                                and a.meta.get(SHAPE_KEY) is None))
    return True


class TokenChannelSelection(FxPass):
    name = "token-channel-selection"
    Options = TokenChannelSelectionOptions

    def requires(self, gm):
        super().requires(gm)
        get_analysis(gm, self.name)
        if not 0.0 < self.options.keep_ratio <= 1.0:
            raise PlanError(self.name, f"keep_ratio must be in (0, 1], got "
                            f"{self.options.keep_ratio}")
        if not _has_class_token(gm):
            raise PlanError(self.name, "the model has no class token (no learned token is "
                            "concatenated in front of the patch tokens), so there is no class "
                            "attention to score channels with",
                            hint="TCS applies to ViT/DeiT-style models; use fxprune.prune for "
                            "mean-pooled models such as Swin")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        out = gm if self.options.inplace else copy_graph_module(gm)
        analysis = get_analysis(out, self.name)
        by_name = {n.name: n for n in out.graph.nodes}
        order = {n: i for i, n in enumerate(out.graph.nodes)}
        sites = [(order[by_name[s.av_node.name]], s) for s in analysis.attention
                 if s.av_node is not None]
        changes, refused, count = [], [], 0
        for g in analysis.groups:
            if g.kind != "mlp":
                continue
            sink = next((s for s in g.sinks if s.kind == "linear"), None)
            fc2 = by_name[sink.node.name] if sink else None
            chain = _mlp_chain(out, fc2) if fc2 is not None else None
            if chain is None:
                refused.append((g.index, "not a Linear -> activation -> Linear MLP"))
                continue
            fc1, act_nodes = chain
            before = [s for pos, s in sites if pos < order[fc1]]
            if not before:
                refused.append((g.index, "no attention site before this MLP"))
                continue
            site = before[-1]
            q, k = by_name[site.q.name], by_name[site.k.name]
            if len(q.meta[SHAPE_KEY]) != 4 or len(k.meta[SHAPE_KEY]) != 4:
                refused.append((g.index, "the attention's q/k are not (batch, heads, tokens, "
                                "dim)"))
                continue
            acts = [_as_callable(out, a) for a in act_nodes]
            act = nn.Sequential(*acts) if len(acts) != 1 else acts[0]
            name = f"fxprune_tcs_{count}"
            mod = TokenChannelSelectionMLP(out.get_submodule(fc1.target), act,
                                           out.get_submodule(fc2.target),
                                           self.options.keep_ratio, self.options.sample,
                                           site.scale if site.scale else 1.0,
                                           self.options.seed + count)
            out.add_submodule(name, mod)
            with out.graph.inserting_before(fc2):
                new = out.graph.call_module(name, (fc1.args[0], q, k))
            new.meta.update({k_: v for k_, v in fc2.meta.items()
                             if k_ in ("val", SHAPE_KEY)})
            fc2.replace_all_uses_with(new)
            for n in [fc2, *reversed(act_nodes), fc1]:
                out.graph.erase_node(n)
            count += 1
            changes.append(f"MLP group {g.index}: {fc1.target} -> {name}")
        out.graph.lint()
        out.recompile()
        out.meta.pop(ANALYSIS_KEY, None)
        out.meta.pop(ANALYSIS_FINGERPRINT_KEY, None)
        return PassResult(out, count > 0, changes, {"rewritten": count, "refused": refused})


def _mlp_chain(gm, fc2):
    if fc2.op != "call_module" or not isinstance(gm.get_submodule(fc2.target), nn.Linear):
        return None
    acts = []
    cur = fc2.args[0]
    while isinstance(cur, torch.fx.Node) and len(cur.users) == 1:
        if cur.op == "call_module":
            mod = gm.get_submodule(cur.target)
            if isinstance(mod, nn.Linear):
                return cur, list(reversed(acts))
            if not isinstance(mod, ACT_MODULES):
                return None
        elif op_name(cur, gm) not in POINTWISE | CAST or len(cur.all_input_nodes) != 1:
            return None
        acts.append(cur)
        cur = cur.args[0]
    return None


def _as_callable(gm, node) -> nn.Module:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    target, args, kwargs = node.target, node.args[1:], dict(node.kwargs)
    method = node.op == "call_method"

    class _Fn(nn.Module):
        def forward(self, x):
            return getattr(x, target)(*args, **kwargs) if method else target(x, *args, **kwargs)

    return _Fn()
