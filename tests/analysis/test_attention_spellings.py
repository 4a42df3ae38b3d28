"""The same multi-head attention written in the other spellings users write it in: ``k.mT``,
``qkv.unflatten(-1, (3, H, d))``, ``torch.baddbmm`` on ``(B * H, N, d)`` with a bias, a float32
softmax cast back, a parallel block (``x + attn(x) + mlp(x)``) with a SwiGLU MLP. Each must be
found as one site of H heads and pruned exactly (equal to the original with the plan's
entries zeroed) with q/k and v of different widths.

Found by writing them as a user would: before, ``.mT`` was read as a reversal of every dim
(4-D q.k then met no head labels: no site), ``baddbmm`` had no rule (no site), and an
``unflatten`` of a fused qkv tied q/k and v to one width, so the freeze step left the
attention dense.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import rel_err, zeroed_original
from fxprune.errors import PlanError
from fxprune.passes.split_fused_heads import SplitFusedHeads

DIM, HEADS, TOKENS = 48, 4, 16


class _Block(nn.Module):
    def __init__(self, attn: nn.Module, parallel: bool = False, glu: bool = False):
        super().__init__()
        self.embed = nn.Linear(12, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn, self.parallel, self.glu = attn, parallel, glu
        self.fc1, self.fc3 = nn.Linear(DIM, 4 * DIM), nn.Linear(DIM, 4 * DIM)
        self.fc2, self.head = nn.Linear(4 * DIM, DIM), nn.Linear(DIM, 5)

    def mlp(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x) if self.glu else F.gelu(self.fc1(x)))

    def forward(self, x):
        x = self.embed(x)
        if self.parallel:
            x = x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x))
        else:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class _UnflattenMT(nn.Module):
    """``unflatten`` splits a fused qkv; ``k.mT`` transposes; the softmax runs in float32."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, DIM // HEADS)).permute(2, 0, 3, 1, 4)
        scores = q @ k.mT / math.sqrt(DIM // HEADS)
        attn = scores.float().softmax(-1).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class _BaddbmmBias(nn.Module):
    """Heads folded into the batch, scores from ``baddbmm`` with a per-head bias."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.proj = nn.Linear(DIM, DIM)
        self.bias = nn.Parameter(torch.randn(HEADS, TOKENS, TOKENS) * 0.1)

    def forward(self, x):
        B, N, _ = x.shape

        def fold(t):
            return t.reshape(B, N, HEADS, -1).transpose(1, 2).reshape(B * HEADS, N, -1)

        q, k, v = fold(self.q(x)), fold(self.k(x)), fold(self.v(x))
        scores = torch.baddbmm(self.bias.repeat(B, 1, 1), q, k.transpose(1, 2),
                               alpha=(DIM // HEADS) ** -0.5)
        out = torch.bmm(scores.softmax(-1), v)
        return self.proj(out.reshape(B, HEADS, N, -1).transpose(1, 2).reshape(B, N, DIM))


CASES = {
    "unflatten_mT_float_softmax": lambda: _Block(_UnflattenMT()),
    "baddbmm_with_bias": lambda: _Block(_BaddbmmBias()),
    "parallel_block_swiglu": lambda: _Block(_UnflattenMT(), parallel=True, glu=True),
}


def _model(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CASES[name]().eval(), torch.randn(2, TOKENS, 12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_site_found_with_its_heads(name):
    model, x = _model(name)
    analysis = fxprune.analyze(model, x)
    assert [s.num_heads for s in analysis.attention] == [HEADS]
    kinds = {g.kind for g in analysis.groups if g.prunable}
    assert {"qk", "v", "mlp"} <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_exactly_with_attention_pruned(name):
    model, x = _model(name)
    pruned = fxprune.prune(model, x, macs_ratio=0.6, align=1, criterion="l1")
    report = pruned.meta["fxprune.report"]
    assert all(not r["reason"].startswith("slicing it fails") for r in report["frozen"])
    (site,) = pruned.meta["fxprune.summary"][:1]
    assert site["qk_dim_after"] < site["qk_dim"] and site["v_dim_after"] < site["v_dim"]
    with torch.no_grad():
        assert rel_err(pruned(x), zeroed_original(model, pruned)(x)) < 1e-5
    assert abs(pruned.meta["fxprune.macs_ratio"] - 0.6) <= 0.02


def test_split_fused_heads_rewrites_an_unflatten():
    model, x = _model("unflatten_mT_float_softmax")
    gm = fxprune.trace(model, x)
    before = [n for n in gm.graph.nodes if n.target == "unflatten"]
    assert [n.args[1:] for n in before] == [(-1, (3, HEADS, DIM // HEADS))]
    result = SplitFusedHeads()(gm)
    out = result.graph_module
    assert result.modified and result.info["rewritten"] == 1
    parts = [u for u in out.graph.nodes if u.target is operator.getitem
             and getattr(u.args[0], "name", "") == "attn_qkv"]
    assert [p.args[1] for p in parts] == [(Ellipsis, slice(i * DIM, (i + 1) * DIM))
                                          for i in range(3)]
    assert [next(iter(p.users)).args[1:] for p in parts] == [(-1, (HEADS, DIM // HEADS))] * 3
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


class _UnflattenPartMinusOne(_UnflattenMT):
    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (-1, HEADS, DIM // HEADS)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_split_fused_heads_refuses_an_unflatten_with_minus_one_parts():
    model = _Block(_UnflattenPartMinusOne()).eval()
    x = torch.randn(2, TOKENS, 12)
    gm = fxprune.trace(model, x)
    result = SplitFusedHeads()(gm)
    assert not result.modified
    assert result.info["refused"] == [
        ("unflatten", "the part dim is given as -1 or the shape is not spelled per dim")]
    # q/k and v stay tied to one width: pruned exactly all the same
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1)
    with torch.no_grad():
        assert rel_err(pruned(x), zeroed_original(model, pruned)(x)) < 1e-5


# -- torch.nn.TransformerEncoder: torch's own attention --------------------------------------

class _TorchEncoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool):
        super().__init__()
        self.embed, self.head = nn.Linear(12, DIM), nn.Linear(DIM, 5)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, 0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.batch_first = batch_first

    def forward(self, x):
        x = self.embed(x)
        x = self.encoder(x) if self.batch_first else self.encoder(x.transpose(0, 1)).transpose(0, 1)
        return self.head(x.mean(1))


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_torch_transformer_encoder_is_traced_into_and_pruned(batch_first, norm_first):
    """As a leaf (torch.fx's default for torch.nn modules) the encoder was one opaque node:
    nothing to prune. fxprune traces into torch.nn's composite modules; the encoder layer's
    fast-path checks are control flow, so the trace falls back to torch.export (with a
    warning), and split-fused-heads separates q, k and v of torch's packed in-projection."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = _TorchEncoder(batch_first, norm_first).eval(), torch.randn(2, TOKENS, 12)
    with pytest.warns(UserWarning, match="torch.export instead"):
        analysis = fxprune.analyze(model, x)
    assert [s.num_heads for s in analysis.attention] == [HEADS, HEADS]
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1)
    sites = [r for r in pruned.meta["fxprune.summary"] if "site" in r]
    assert all(r["qk_dim_after"] < r["qk_dim"] for r in sites)
    assert abs(pruned.meta["fxprune.macs_ratio"] - 0.7) <= 0.02
    with torch.no_grad():
        assert rel_err(pruned(x), zeroed_original(model, pruned)(x)) < 1e-5


class _PackedInProjection(nn.Module):
    """torch's packed q/k/v in-projection: ``unflatten(-1, (3, E))``, a size-1 dim added,
    swapped with the part dim and squeezed away, then one ``select`` per part."""

    def __init__(self, squeeze_all: bool = False):
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.squeeze_all = squeeze_all

    def forward(self, x):
        B, N, _ = x.shape
        proj = self.in_proj(x).unflatten(-1, (3, DIM)).unsqueeze(0).transpose(0, -2)
        proj = (proj.squeeze() if self.squeeze_all else proj.squeeze(-2)).contiguous()
        q, k, v = (proj.select(0, i).view(B, N, HEADS, -1).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, DIM))


def test_split_fused_heads_follows_unsqueeze_transpose_squeeze_to_select():
    model, x = _PackedInProjection().eval(), torch.randn(2, TOKENS, DIM)
    gm = fxprune.trace(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"][:6] == [
        "unflatten", "unsqueeze", "transpose", "squeeze", "contiguous", "select"]
    result = SplitFusedHeads()(gm)
    out = result.graph_module
    assert result.modified and result.info["rewritten"] == 1
    assert not any(n.target == "select" for n in out.graph.nodes)
    parts = [n for n in out.graph.nodes if n.target is operator.getitem
             and getattr(n.args[0], "name", "") == "in_proj"]
    assert [p.args[1] for p in parts] == [(Ellipsis, slice(i * DIM, (i + 1) * DIM))
                                          for i in range(3)]
    for part in parts:  # the same chain per part, the part dim left out of every op
        chain, cur = [], part
        for _ in range(5):
            (cur,) = cur.users
            chain.append((cur.target, cur.args[1:]))
        assert chain == [("unflatten", (-1, (DIM,))), ("unsqueeze", (0,)),
                         ("permute", (1, 2, 0, 3)), ("squeeze", (2,)),
                         ("contiguous", ())]
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_split_fused_heads_leaves_a_squeeze_of_every_dim_alone():
    """``squeeze()`` without a dim would also drop a part dim of size 1: not followed."""
    model, x = _PackedInProjection(squeeze_all=True).eval(), torch.randn(2, TOKENS, DIM)
    result = SplitFusedHeads()(fxprune.trace(model, x))
    assert not result.modified and result.info == {"rewritten": 0, "refused": []}
    # q/k and v stay tied to one width, which the planner does not offer: frozen, and with
    # nothing else to prune, a typed refusal naming the construct
    with pytest.raises(PlanError, match="do not form a dense tensor"):
        fxprune.prune(model, x, macs_ratio=0.8, align=1)
