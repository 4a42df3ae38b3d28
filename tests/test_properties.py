"""Properties over generated ViT-like models (tests/genmodels.py): nothing is silently wrong.

(a) trace + analyze never crashes, and the attention sites, head counts, head dims, scales and
    frozen q/k groups found equal the generator's truth;
(b) ``fxprune.prune`` at a random ``macs_ratio`` either returns a model equal to the zeroed
    original (DESIGN.md section 3) whose MACs are at or below target (unless it warned that the
    unfrozen groups cannot get there), or raises a typed ``FxPruneError``;
(c) gated == sliced for random binary masks with equal per-head counts;
(d) ``fxprune.count_macs`` equals an independent ``FlopCounterMode`` count.

Example budgets: the "ci" hypothesis profile (default, tests/conftest.py) runs ``budget(n)``
= n examples per property, derandomized; ``--hypothesis-profile=slow`` (``make test-slow``)
runs 5 n with fresh randomness. ``pytest --hypothesis-show-statistics`` shows what was refused.

Known analysis bugs are kept as shrunk ``xfail(strict=True)`` tests at the end of the file;
the properties step around them in one place, :func:`_known_issue`, so removing an xfail means
deleting its branch there.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from exactness import gated_and_sliced, outputs, rel_err, zeroed_original
from fxprune.errors import FxPruneError
from fxprune.oneshot import plan as make_plan
from genmodels import BlockSpec, ViTSpec, build, vit_specs

CI_PROFILE_EXAMPLES = 200


def budget(n: int) -> int:
    """``n`` examples under the "ci" profile, scaled with the loaded profile's max_examples."""
    return max(1, n * settings.default.max_examples // CI_PROFILE_EXAMPLES)


def _known_issue(b: BlockSpec) -> set[str]:
    """What the analysis gets wrong today for block ``b`` (see the xfail tests below)."""
    issues = set()
    if b.num_heads == 1 and not b.attn.startswith("sdpa"):
        issues.add("single_head_av")        # test_single_head_explicit_attention_finds_v
    if b.mlp == "swiglu2":
        issues.add("swiglu_two_linears")    # test_swiglu_with_two_linears_is_an_mlp_group
    return issues


def reference_macs(model, x) -> int:
    """Independent count: FlopCounterMode FLOPs / 2, SDPA forced to the math path (the CPU
    flash kernel has no flop formula)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(x)
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


def _linear_name(gm, node) -> str | None:
    if node is not None and node.op == "call_module":
        return str(node.target)
    return None


# --------------------------------------------------------------------------------------------
# (a) analysis == truth


def check_analysis(spec: ViTSpec, model, x, truth) -> None:
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    assert len(a.attention) == len(truth["sites"]), [s.num_heads for s in a.attention]
    for i, (site, want, b) in enumerate(zip(a.attention, truth["sites"], spec.blocks)):
        issues = _known_issue(b)
        assert site.index == i
        assert site.num_heads == want["num_heads"], f"site {i}"
        assert site.qk_head_dim == want["qk_head_dim"], f"site {i}"
        assert site.scale == pytest.approx(want["scale"], rel=1e-6), f"site {i}"
        qk = a.groups[site.qk_group]
        assert qk.kind == "qk" and qk.site == i
        assert qk.layout.shape == (want["num_heads"], want["qk_head_dim"])
        if want["frozen_qk"] is True:
            assert qk.frozen and "normaliz" in qk.frozen.lower(), qk.frozen
        elif want["frozen_qk"] is False:
            assert qk.frozen is None, qk.frozen
        else:  # rotary: frozen with a reason, or each rotated pair is one channel
            if qk.frozen is None:
                half = want["qk_head_dim"] // 2
                assert np.array_equal(qk.layout[:, :half], qk.layout[:, half:]), qk.layout
            else:
                assert qk.frozen.strip()
        if "single_head_av" in issues:
            continue
        assert site.v_head_dim == want["v_head_dim"], f"site {i}"
        assert site.kind == want["kind"], f"site {i}"
        v = a.groups[site.v_group]
        assert v.kind == "v" and v.site == i and v.frozen is None, (v.kind, v.frozen)
        assert v.layout.shape == (want["num_heads"], want["v_head_dim"])
        assert _linear_name(gm, site.proj) == f"blocks.{i}.attn.proj"
    mlp = [g for g in a.groups if g.kind == "mlp"]
    want_mlp = [b.mlp_hidden for b in spec.blocks if "swiglu_two_linears" not in _known_issue(b)]
    assert [g.size for g in mlp] == want_mlp
    assert all(g.frozen is None for g in mlp), [g.frozen for g in mlp]
    embed = [g for g in a.groups if g.kind == "embed"]
    assert embed and all(g.frozen for g in embed)


@settings(max_examples=budget(300), deadline=None)
@given(vit_specs())
def test_analysis_matches_truth(spec):
    model, x, truth = build(spec)
    check_analysis(spec, model, x, truth)


# --------------------------------------------------------------------------------------------
# (b) prune: exact or refused, MACs on target


@settings(max_examples=budget(200), deadline=None)
@given(vit_specs(), st.floats(0.4, 0.95), st.sampled_from(["similarity", "l1", "random"]))
def test_prune_is_exact_or_refused(spec, macs_ratio, criterion):
    model, x, truth = build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruned = fxprune.prune(model, x, macs_ratio=macs_ratio, criterion=criterion,
                                   align=1)
        except FxPruneError as exc:
            event(f"refused: {type(exc).__name__}")
            assert str(exc).strip()
            pruned = None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model changed"
    if pruned is None:
        return
    plan = pruned.meta["fxprune.plan"]
    assert rel_err(outputs(pruned, x), outputs(zeroed_original(model, plan), x)) < 1e-4
    # frozen q/k (LayerNorm over the head dim) stays dense
    for i, b in enumerate(spec.blocks):
        if b.qk_norm:
            assert f"blocks.{i}.attn.q_norm.weight" not in plan
            assert f"blocks.{i}.attn.k_norm.weight" not in plan
    # MACs: the reported ratio is the independent one, and on target unless warned
    dense, now = reference_macs(model, x), reference_macs(pruned, x)
    reached = now / dense
    assert pruned.meta["fxprune.macs_ratio"] == pytest.approx(reached, abs=1e-4)
    assert fxprune.count_macs(pruned) == now
    warned = [w for w in caught if "reached macs_ratio" in str(w.message)]
    if warned:
        event("warned: target unreachable with the unfrozen groups")
        assert f"{reached:.3f}" in str(warned[0].message)
    else:
        event("on target")
        assert reached <= macs_ratio + 0.02


# --------------------------------------------------------------------------------------------
# (c) gated == sliced


def random_masks(analysis, data) -> dict[int, np.ndarray]:
    """Binary keep masks for a random subset of the prunable groups: every head keeps the same
    count; positions sharing a channel id (rotary pairs, channels shared across heads) are kept
    or dropped together; groups shared across heads keep the same channels in every head."""
    masks = {}
    for g in analysis.groups:
        if not g.prunable or not data.draw(st.booleans(), label=f"prune group {g.index}"):
            continue
        layout = g.layout
        if g.shared_across_heads:
            ids = np.unique(layout)
            k = data.draw(st.integers(1, len(ids)), label=f"keep g{g.index}")
            order = data.draw(st.permutations(range(len(ids))), label=f"order g{g.index}")
            mask = np.isin(layout, ids[list(order[:k])])
        else:
            rows = [np.unique(r) for r in layout]
            k = data.draw(st.integers(1, min(len(r) for r in rows)), label=f"keep g{g.index}")
            mask = np.zeros(layout.shape, dtype=bool)
            for h, ids in enumerate(rows):
                order = data.draw(st.permutations(range(len(ids))), label=f"order g{g.index}")
                mask[h] = np.isin(layout[h], ids[list(order[:k])])
        counts = mask.sum(axis=1)
        assert (counts == counts[0]).all(), (g.index, layout)  # equal units per head
        masks[g.index] = mask
    return masks


@settings(max_examples=budget(200), deadline=None)
@given(vit_specs(), st.data())
def test_gated_equals_sliced(spec, data):
    model, x, truth = build(spec)
    decided = make_plan(model, x, macs_ratio=1.0, criterion="random", align=1)
    masks = random_masks(decided.analysis, data)
    event(f"groups pruned: {min(len(masks), 4)}{'+' if len(masks) >= 4 else ''}")
    gated, sliced = gated_and_sliced(decided.graph_module, masks)
    dense = outputs(decided.graph_module, x)
    assert rel_err(outputs(gated, x), dense) >= 0  # the gated model runs
    assert rel_err(outputs(sliced, x), outputs(gated, x)) < 1e-5


# --------------------------------------------------------------------------------------------
# (d) count_macs == FlopCounterMode


@settings(max_examples=budget(300), deadline=None)
@given(vit_specs())
def test_count_macs_matches_flop_counter(spec):
    model, x, _ = build(spec)
    assert fxprune.count_macs(model, x) == reference_macs(model, x)


# --------------------------------------------------------------------------------------------
# Shrunk failing examples (analysis bugs found by the properties), kept until fixed.


@pytest.mark.xfail(strict=True, reason="single-head attention written as q @ k^T / einsum: "
                   "attn @ v is not tied to the site (no head labels when H == 1), so "
                   "v_head_dim is 0, the v group is an 'mlp' group and the kind ignores the "
                   "per-head bias")
def test_single_head_explicit_attention_finds_v():
    spec = ViTSpec(embed=8, blocks=(BlockSpec(1, 4, 2, proj="separate", attn="explicit_post",
                                              mlp="gelu", mlp_hidden=4),), class_token=False)
    model, x, truth = build(spec)
    a = fxprune.analyze(fxprune.trace(model, x))
    site = a.attention[0]
    assert (site.num_heads, site.qk_head_dim, site.v_head_dim) == (1, 4, 2)
    assert site.v_group is not None and a.groups[site.v_group].kind == "v"
    assert site.proj is not None


@pytest.mark.xfail(strict=True, reason="SwiGLU with two Linears (timm SwiGLU fc1_g/fc1_x, "
                   "LLaMA w1/w3): the hidden group has two producers, so the analysis calls it "
                   "the residual stream ('embed') and freezes it")
def test_swiglu_with_two_linears_is_an_mlp_group():
    spec = ViTSpec(embed=8, blocks=(BlockSpec(2, 2, 2, mlp="swiglu2", mlp_hidden=4),),
                   class_token=False)
    model, x, truth = build(spec)
    a = fxprune.analyze(fxprune.trace(model, x))
    mlp = [g for g in a.groups if g.kind == "mlp"]
    assert [(g.size, g.frozen) for g in mlp] == [(4, None)]
