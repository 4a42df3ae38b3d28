"""Linear attention end to end (issue 5): FLatten-Swin's focused linear attention and the
hand-written linear variants of the zoo.

- analysis: ``linear`` sites, q/k + per-channel scale + positional encoding in one group, the
  shared depthwise conv tying v's channel j across heads, v coupled with the projection;
- gates: where masking equals removal (the norms over all channels see gated values);
- slicing: gated with binary gates == sliced on random patterns, whole heads removed with heads
  folded into the batch dim, the batch size still free afterwards;
- refusals: a reduction that does not ignore zeros, a three-operand einsum;
- the eq. 5-6 indicator initialization.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original
from fxprune.amap.linear_init import channel_distance, linear_attention_scores
from fxprune.amap.macs_model import MacsModel
from fxprune.amap.search import search
from fxprune.models.flatten import flatten_swin_nano
from fxprune.passes.insert_gates import InsertGates
from fxprune.passes.slice import Slice
from fxprune.pipeline import prepare
from fxprune.slicing import label_keep, param_masks
from zoo import ZOO


def _nano():
    torch.manual_seed(0)
    model = flatten_swin_nano().eval()
    with torch.no_grad():  # non-trivial scale and positional encoding
        for name, p in model.named_parameters():
            if name.endswith(("attn.scale", "positional_encoding")):
                p.copy_(0.3 * torch.randn_like(p))
    return model, torch.randn(2, 3, 32, 32)


def _prepared(model, x):
    gm, _ = prepare(fxprune.trace(model, x))
    return gm, fxprune.analyze(gm)


def _random_masks(analysis, rng):
    masks = {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        if g.shared_across_heads:
            units = np.unique(g.layout)
            masks[g.index] = np.isin(g.layout, rng.choice(units, max(1, len(units) // 2),
                                                          replace=False))
            continue
        k = int(rng.integers(1, g.layout.shape[1] + 1))
        masks[g.index] = np.stack([np.isin(row, rng.choice(row, k, replace=False))
                                   for row in g.layout])
    return masks


# -- analysis ---------------------------------------------------------------------------------
def test_flatten_nano_sites_and_coupling():
    model, x = _nano()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    assert [s.kind for s in a.attention] == ["linear", "linear", "window", "window"]
    for s in a.attention[:2]:
        qk, v = a.groups[s.qk_group], a.groups[s.v_group]
        assert qk.prunable and v.prunable
        assert not qk.shared_across_heads          # q/k heads prune independently
        assert v.shared_across_heads               # the dwc is one conv for every head
        # dropping q/k channel 0 of head 0 touches the qkv rows, the scale and the positional
        # encoding of that channel only
        keep = np.ones(qk.layout.shape, bool)
        keep[0, 0] = False
        touched = param_masks(a, label_keep(a, {qk.index: keep}))
        prefix = s.proj.target.rsplit(".attn.proj", 1)[0]
        names = {n for n in touched if n.startswith(prefix)}
        assert names == {f"{prefix}.attn.qkv.weight", f"{prefix}.attn.qkv.bias",
                         f"{prefix}.attn.scale", f"{prefix}.attn.positional_encoding"}
        assert (~touched[f"{prefix}.attn.scale"]).sum() == 1
        # dropping v unit 0 drops it in every head, with the dwc row and the proj columns
        keep = np.ones(v.layout.shape, bool)
        keep[:, 0] = False
        touched = param_masks(a, label_keep(a, {v.index: keep}))
        heads = v.layout.shape[0]
        assert (~touched[f"{prefix}.attn.proj.weight"]).sum(axis=1)[0] == heads
        assert (~touched[f"{prefix}.attn.dwc.weight"]).any(axis=(1, 2, 3)).sum() == 1


def test_count_macs_covers_linear_attention_products():
    """count_macs of a FLatten block equals FlopCounterMode's count / 2 (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _nano()
    gm = fxprune.trace(model, x)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert fxprune.count_macs(gm) == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


# -- gates ------------------------------------------------------------------------------------
def test_insert_gates_gates_the_norms_over_all_channels():
    """Graph before and after on one focused-linear block: every norm over q's or k's channels
    reads a gate, so a gated-off channel adds nothing to the norms (masking == removal; gating
    before ReLU + 1e-6 would not be)."""
    model, x, _ = ZOO["focused_linear"]()
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    norms_before = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "norm"]
    assert len(norms_before) == 8  # 2 blocks x (q, k) x (norm before and after the power)
    assert not any(str(n.args[0].target).startswith("fxprune_gate") for n in norms_before)
    out = InsertGates()(gm).graph_module
    norms_after = [n for n in out.graph.nodes if n.op == "call_method" and n.target == "norm"]
    qk_groups = {s.qk_group for s in a.attention}
    for n in norms_after:
        gate = n.args[0]
        assert gate.op == "call_module" and str(gate.target).startswith("fxprune_gate_g")
        assert out.get_submodule(gate.target).group in qk_groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flatten_nano_gated_equals_sliced(seed):
    model, x = _nano()
    gm, a = _prepared(model, x)
    masks = _random_masks(a, np.random.default_rng(seed))
    assert any(a.groups[g].site in (0, 1) for g in masks), "no linear group pruned"
    gated, sliced = gated_and_sliced(gm, masks)
    y = outputs(sliced, x)
    assert rel_err(y, outputs(gated, x)) < 1e-4
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in gm.parameters())
    # no zeroed-original check here: with ReLU + 1e-6 a zeroed projection row is a channel of
    # 1e-6, not a removed one, and where ReLU zeroes a token's kept channels of a head those
    # 1e-6 entries are as large as the kept ones (seen: 7e-4 relative). Masking at the gates
    # (after the kernel) is removal; that is the invariant.


def test_flatten_nano_prune_and_macs_model():
    model, x = _nano()
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1)
    assert abs(pruned.meta["fxprune.macs_ratio"] - 0.7) <= 0.02
    summary = pruned.meta["fxprune.summary"]
    assert any(r.get("kind") == "linear" and r["qk_dim_after"] < r["qk_dim"] for r in summary)
    gm, a = _prepared(model, x)
    masks = _random_masks(a, np.random.default_rng(5))
    from fxprune.planning.units import group_units

    keep = {}
    for gi, mask in masks.items():
        units = group_units(a.groups[gi], np.zeros(mask.shape))
        keep[gi] = torch.tensor(np.isin(units.channels, a.groups[gi].layout[mask]),
                                dtype=torch.float64)
    sliced = Slice(keep=masks)(gm).graph_module
    assert float(MacsModel(gm, a)(keep)) == pytest.approx(fxprune.count_macs(sliced), abs=0.5)


def test_folded_heads_whole_head_removal_keeps_batch_free():
    """Heads folded into the batch dim (FLatten's public layout): removing whole heads turns
    the computed ``B * heads`` reshape size into -1, so other batch sizes still run."""
    model, x = _folded_without_conv()
    gm, a = _prepared(model, x)
    site = a.attention[0]
    qk, v = a.groups[site.qk_group], a.groups[site.v_group]
    assert site.kind == "linear" and site.num_heads == 2
    assert not qk.shared_across_heads and not v.shared_across_heads
    keep_qk, keep_v = np.ones(qk.layout.shape, bool), np.ones(v.layout.shape, bool)
    keep_qk[1] = keep_v[1] = False  # head 1 goes entirely
    gated, sliced = gated_and_sliced(gm, {qk.index: keep_qk, v.index: keep_v})
    assert any(n.target == "reshape" and -1 in n.args[1:] for n in sliced.graph.nodes)
    x3 = torch.randn(3, *x.shape[1:])
    for batch in (x, x3):
        assert rel_err(outputs(sliced, batch), outputs(gated, batch)) < 1e-4


def _folded_without_conv():
    """FLatten's folded layout without the shared conv: heads are independent again."""
    from zoo_linear import _FocusedLinear

    from zoo import _Block, _build, _Mlp, _Net

    return _build(0, lambda: _Net(16, [_Block(16, _FocusedLinear(16, 2, folded=True,
                                                                  conv=False), _Mlp(16, 32))],
                                  class_token=False))


# -- refusals ---------------------------------------------------------------------------------
class _MeanNormLinear(nn.Module):
    """Linear attention whose q is divided by its MEAN over channels. Removing a channel
    would change the mean's divisor; the slicer keeps the original one (the mean is scaled by
    kept / original), so q/k prune exactly."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = F.relu(q) / (F.relu(q).mean(dim=-1, keepdim=True) + 1)
        k = F.relu(k)
        q, k, v = (t.reshape(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        out = q @ (k.transpose(-2, -1) @ v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)) + x


class _ThreeOperandEinsum(_MeanNormLinear):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (F.relu(t).reshape(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        out = torch.einsum("bhnc,bhmc,bhmd->bhnd", q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)) + x


def test_mean_over_channels_keeps_its_divisor_and_qk_prunes_exactly():
    """Was refused (q/k frozen: "mean reduces over channels"); a mean over all of a group's
    channels is now a sink whose divisor the slicer keeps."""
    torch.manual_seed(0)
    model, x = _MeanNormLinear().eval(), torch.randn(2, 5, 16)
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    qk = a.groups[a.attention[0].qk_group]
    assert a.attention[0].kind == "linear"
    assert qk.prunable and "reduce" in {s.kind for s in qk.sinks}
    assert a.groups[a.attention[0].v_group].prunable
    pruned = fxprune.prune(model, x, macs_ratio=0.7, align=1, criterion="l1")
    assert any(n.target is torch.mul and n.args[0].target == "mean"
               for n in pruned.graph.nodes if n.op == "call_function")
    ref = fxprune.zeroed_copy(model, pruned)(x)
    assert torch.allclose(pruned(x), ref, rtol=1e-5, atol=1e-6)


class _SumCentredLinear(_MeanNormLinear):
    """q normalised by hand with sums only: ``q - sum(q) / C``, then divided by the root of
    the sum of squares. The centring gives a removed channel the value ``-sum(q) / C``, which
    the second sum reads: before, both sums were taken for zero-safe sinks and the pruned
    model was 0.2% off the zeroed original, with nothing said."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        centred = q - q.sum(dim=-1, keepdim=True) / C
        q = F.relu(centred * torch.rsqrt((centred * centred).sum(dim=-1, keepdim=True) + 1e-5))
        k = F.relu(k)
        q, k, v = (t.reshape(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        out = q @ (k.transpose(-2, -1) @ v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)) + x


def test_channels_shifted_by_a_broadcast_value_freeze():
    torch.manual_seed(0)
    model, x = _SumCentredLinear().eval(), torch.randn(2, 5, 16)
    a = fxprune.analyze(fxprune.trace(model, x))
    qk = a.groups[a.attention[0].qk_group]
    assert qk.frozen and "shifted by a value broadcast over them" in qk.frozen
    assert a.groups[a.attention[0].v_group].prunable
    pruned = fxprune.prune(model, x, macs_ratio=0.8, align=1, criterion="l1")
    with torch.no_grad():
        ref = zeroed_original(model, pruned.meta["fxprune.plan"])(x)
        assert rel_err(pruned(x), ref) < 1e-5


def test_three_operand_einsum_is_refused_dense():
    gm = fxprune.trace(_ThreeOperandEinsum().eval(), torch.randn(2, 5, 16))
    a = fxprune.analyze(gm)
    assert not any(g.prunable for g in a.groups if g.kind in ("qk", "v"))
    assert any("einsum" in why for _, why in a.opaque)


# -- eq. 5-6 initialization -------------------------------------------------------------------
def test_channel_distance_matches_singular_values_by_hand():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.rand(1, 6, 1, 3, generator=gen), torch.rand(1, 6, 1, 3, generator=gen)
    v = torch.rand(1, 6, 1, 4, generator=gen)
    Q, K, V = q[0, :, 0].double(), k[0, :, 0].double(), v[0, :, 0].double()
    full = torch.linalg.svdvals(Q @ K.T @ V)
    for i in range(3):
        single = torch.linalg.svdvals(Q[:, i:i + 1] @ K[:, i:i + 1].T @ V)
        want = (full - single).norm()
        assert float(channel_distance(q, k, v)[0, 0, i]) == pytest.approx(float(want), rel=1e-6)


def test_linear_init_scores_in_unit_interval_and_search_keeps_everything_at_start():
    model, x = _nano()
    gm, a = _prepared(model, x)
    scores, skipped = linear_attention_scores(gm, a, [x, x.flip(0)])
    linear_qk = {s.qk_group for s in a.attention if s.kind == "linear"}
    assert set(scores) == linear_qk and not skipped
    for gi, s in scores.items():
        assert s.shape == a.groups[gi].layout.shape
        assert s.min() == 0.0 and s.max() == 1.0
    y = torch.randint(0, 10, (2,))
    res = search(model, [(x, y)], x[:1], macs_ratio=0.6, epochs=1, max_steps=1,
                         progress=False, lr=0.0, indicator_lr=0.0)
    from fxprune.passes.insert_indicators import indicator_modules

    inds = indicator_modules(res.graph_module)
    assert res.linear_init == {gi: "scored" for gi in linear_qk}
    for gi in linear_qk:
        ind = inds[gi]
        assert float(ind.m.abs().sum()) > 0       # started from the scores, not zeros
        assert bool((ind.keep() == 1).all())        # ... and still keeps every channel
        # most important channel a full tau below 0 (where every other indicator starts),
        # none above 0: the start protects, it never pushes toward removal
        m_star = (ind.m * ind.w).detach()  # before rank averaging across heads
        assert float(m_star.min()) == pytest.approx(-0.5, abs=1e-6)
        assert float(m_star.max()) == pytest.approx(0.0, abs=1e-6)
    off = search(model, [(x, y)], x[:1], macs_ratio=0.6, epochs=1, max_steps=1,
                         progress=False, lr=0.0, indicator_lr=0.0, linear_init=False)
    assert off.linear_init == {}
    assert all(float(indicator_modules(off.graph_module)[gi].m.abs().sum()) == 0
               for gi in linear_qk)


def test_search_and_refine_on_the_hybrid():
    """AMAP on FLatten-Swin nano: linear and window sites searched together (linear q/k
    indicators start from eq. 5-6), then sliced and refined with reweight modules."""
    from fxprune.amap.search import refine

    model, _ = _nano()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    res = search(model, loader, x[:1], macs_ratio=0.6, epochs=6, indicator_lr=0.2,
                 progress=False)
    assert res.macs_ratio < 0.9 and res.masks
    assert set(res.linear_init.values()) == {"scored"}
    refined, history = refine(res, loader, epochs=1, progress=False)
    assert len(history) == 1
    assert outputs(refined, x[:3]).shape == (3, 10)
    assert fxprune.count_macs(refined) < fxprune.count_macs(fxprune.trace(model, x[:1]))


def test_linear_init_reads_folded_heads_like_unfolded_ones():
    """The same weights written with heads folded into the batch dim (FLatten's public layout)
    and in 4-D give the same eq. 5-6 scores: the folded heads are unfolded, not skipped."""
    scores = []
    for name in ("focused_linear", "focused_linear_folded"):
        model, x, _ = ZOO[name]()
        gm, a = _prepared(model, x)
        got, skipped = linear_attention_scores(gm, a, [x])
        assert not skipped and len(got) == 2
        scores.append([got[g] for g in sorted(got)])
    for s4, sf in zip(*scores):
        np.testing.assert_allclose(sf, s4, atol=1e-6)


class _NormalizedLinear(_MeanNormLinear):
    """q and k L2-normalised over ALL channels (before the head split): a zero-safe norm, so
    q/k stay prunable, gated at the normalize."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.normalize(F.relu(q), dim=-1), F.normalize(F.relu(k), dim=-1)
        q, k, v = (t.reshape(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        out = q @ (k.transpose(-2, -1) @ v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)) + x


def test_normalize_over_all_channels_is_gated_not_frozen():
    model = _NormalizedLinear().eval()
    x = torch.randn(2, 5, 16)
    gm, a = _prepared(model, x)
    qk = a.groups[a.attention[0].qk_group]
    assert qk.prunable and any(s.kind == "reduce" for s in qk.sinks)
    masks = _random_masks(a, np.random.default_rng(0))
    masks[qk.index] = np.ones(qk.layout.shape, bool)
    masks[qk.index][:, :3] = False  # three q/k channels of every head go
    gated, sliced = gated_and_sliced(gm, masks)
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-4
