"""Head dims of size 1: a q/k or v head of one channel is still a head.

Size-1 dims never carry channel labels (one label along them says nothing), so before the fix
``q`` of shape ``(B, h, N, 1)`` carried its ``h`` channels on the head dim only and the q.k
contraction read that dim as a batch dim: no site, the v channels taken for plain MLP
channels, and a width-1 ``k`` contracted against an unlabeled ``q`` left prunable. Shrunk
from ``tests/models/test_properties.py`` once the generator drew head dims of 1 (it drew 2
or more before).

Each case shows the graph's analysis before any pass and the model after ``prune``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from genmodels import BlockSpec, ViTSpec, build

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original

ATTN = ("sdpa", "explicit_pre", "explicit_div", "einsum")


def _spec(heads, qk, v, attn, proj="separate", **kw) -> ViTSpec:
    return ViTSpec(embed=12, blocks=(BlockSpec(num_heads=heads, qk_head_dim=qk, v_head_dim=v,
                                               proj=proj, attn=attn, **kw),), seed=3)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("qk, v", [(1, 1), (1, 3), (3, 1)])
def test_head_dim_one_is_a_site(attn, qk, v):
    model, x, _ = build(_spec(3, qk, v, attn))
    a = fxprune.analyze(fxprune.trace(model, x))
    assert [(s.num_heads, s.qk_head_dim, s.v_head_dim, s.kind) for s in a.attention] == [
        (3, qk, v, "softmax")]
    site = a.attention[0]
    qk_group, v_group = a.groups[site.qk_group], a.groups[site.v_group]
    assert (qk_group.kind, qk_group.layout.shape, qk_group.frozen) == ("qk", (3, qk), None)
    assert (v_group.kind, v_group.layout.shape, v_group.frozen) == ("v", (3, v), None)
    # no group is left over as "plain" channels of the attention
    assert sorted(g.kind for g in a.groups) == ["embed", "heads", "mlp", "qk", "v"]


@pytest.mark.parametrize("attn", ATTN)
def test_head_dim_one_prunes_whole_heads_exactly(attn):
    """Before: 3 heads of q/k dim 1 and v dim 1; after: fewer heads, equal to the original
    with the removed heads' q/k/v rows and proj columns zeroed."""
    model, x, _ = build(_spec(3, 1, 1, attn))
    pruned = fxprune.prune(model, x, macs_ratio=0.8, criterion="l1", align=1, heads="whole")
    (row,) = [r for r in pruned.meta["fxprune.summary"] if "site" in r]
    assert (row["heads"], row["qk_dim"], row["v_dim"]) == (3, 1, 1)
    heads_after = row["heads_after"]
    assert 1 <= heads_after < 3
    assert pruned.get_submodule("blocks.0.attn.q").out_features == heads_after
    assert pruned.get_submodule("blocks.0.attn.proj").in_features == heads_after
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


@pytest.mark.parametrize("attn", ATTN)
def test_head_dim_one_gated_equals_sliced(attn):
    model, x, _ = build(_spec(3, 1, 2, attn))
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    v = a.groups[a.attention[0].v_group]
    mask = np.zeros(v.layout.shape, dtype=bool)
    mask[:, 1] = True  # one v channel per head
    gated, sliced = gated_and_sliced(gm, {v.index: mask})
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5
    assert sliced.get_submodule("blocks.0.attn.v").out_features == 3


@pytest.mark.parametrize("qk, v", [(1, 2), (2, 1)])
def test_prune_with_unit_head_dims_equals_zeroed_original(qk, v):
    model, x, _ = build(_spec(3, qk, v, "sdpa", proj="fused_qkv"))
    pruned = fxprune.prune(model, x, macs_ratio=0.6, criterion="l1", align=1)
    plan = pruned.meta["fxprune.plan"]
    assert plan, "nothing was pruned: the case is vacuous"
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4


def test_width_one_k_against_unlabeled_q_is_frozen():
    """Refusal: one head, q/k dim 1, q from its own width-1 Linear (no labels: nothing says
    which channel it is) and k split out of a fused kv Linear. k's channel meets q's unlabeled
    one in ``q @ k^T``, so it must stay. Before the fix it was carried through the product into
    the v channel's group and left prunable."""
    model, x, _ = build(_spec(1, 1, 1, "explicit_pre", proj="q_kv"))
    a = fxprune.analyze(fxprune.trace(model, x))
    k_groups = [g for g in a.groups if any(s.kind == "matmul" for s in g.sinks)]
    assert len(k_groups) == 1
    (k,) = k_groups
    assert any(n.op == "call_module" and n.target == "blocks.0.attn.kv" for n, _ in k.members)
    assert not k.prunable and "without channel labels" in k.frozen
    assert [(s.num_heads, s.qk_head_dim) for s in a.attention] == []  # q is invisible


def test_one_channel_per_head_after_slicing_is_still_a_site():
    """The search keeps one q/k channel per head; re-analysing the sliced model must see the
    same site (refine then reweights it, tests/amap/test_search.py)."""
    model, x, _ = build(_spec(3, 4, 4, "explicit_pre", proj="fused_qkv"))
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    qk = a.groups[a.attention[0].qk_group]
    mask = np.zeros(qk.layout.shape, dtype=bool)
    mask[:, 0] = True
    gated, sliced = gated_and_sliced(gm, {qk.index: mask})
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5
    again = fxprune.analyze(fxprune.trace(sliced, torch.randn(2, 3, 8, 8))).attention
    assert [(s.num_heads, s.qk_head_dim, s.v_head_dim) for s in again] == [(3, 1, 4)]
