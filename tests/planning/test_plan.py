"""Plans are data: ``fxprune.Plan`` survives JSON, and ``fxprune.apply_plan`` re-creates the
same pruned GraphModule from a fresh model (same code, same kept indices; exact against the
fresh model with the plan's entries zeroed, whatever its initialisation). A model that does
not match the plan is a PlanError naming the first mismatching parameter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from genmodels import budget, build, vit_specs
from hypothesis import event, given, settings

import fxprune
from exactness import outputs, rel_err, zeroed_original
from fxprune.errors import FxPruneError, PlanError
from fxprune.meta import PLAN_DATA_KEY, PLAN_KEY
from fxprune.models.reference import tiny_vit


@pytest.fixture(scope="module")
def pruned_tiny():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return fxprune.prune(_fresh(0), x, macs_ratio=0.6, align=4), x


def _fresh(seed: int, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tiny_vit(**kw).eval()


def test_plan_is_plain_json(pruned_tiny):
    pruned, x = pruned_tiny
    plan = pruned.meta[PLAN_DATA_KEY]
    data = json.loads(plan.to_json())
    assert set(data) >= {"params", "param_shapes", "groups", "sites", "inputs", "versions"}
    assert data["versions"]["torch"] == torch.__version__
    assert data["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    # kept indices per parameter and dim are the ones in meta["fxprune.plan"]
    for name, dims in pruned.meta[PLAN_KEY].items():
        assert {int(d): k for d, k in data["params"][name].items()} == {
            d: kept.tolist() for d, kept in dims.items()}
    assert [s["num_heads"] for s in data["sites"]] == [3, 3]
    pruned_groups = [g for g in data["groups"] if "keep" in g]
    assert pruned_groups and all(len(g["keep"]) == g["layout"][0] for g in pruned_groups)
    again = fxprune.Plan.from_json(plan.to_json())
    assert again == plan


@pytest.mark.parametrize("seed", [0, 7])
def test_apply_plan_recreates_the_pruned_model(pruned_tiny, seed):
    pruned, x = pruned_tiny
    plan = fxprune.Plan.from_json(pruned.meta[PLAN_DATA_KEY].to_json())
    fresh = _fresh(seed)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    again = fxprune.apply_plan(fresh, plan, x)
    assert again.code == pruned.code
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    zeroed = zeroed_original(fresh, plan.torch_plan())
    assert rel_err(outputs(again, x), outputs(zeroed, x)) < 1e-5
    if seed == 0:  # the same weights: the same pruned model, bit for bit
        assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in
                   again.state_dict().items())


def test_apply_plan_default_inputs_from_the_plan(pruned_tiny):
    pruned, x = pruned_tiny
    again = fxprune.apply_plan(_fresh(0), pruned.meta[PLAN_DATA_KEY])
    assert again.code == pruned.code


def test_mismatching_model_names_the_first_parameter(pruned_tiny):
    pruned, _ = pruned_tiny
    plan = pruned.meta[PLAN_DATA_KEY]
    with pytest.raises(PlanError, match=r"parameter 'blocks\.0\.mlp\.fc1\.weight' has shape "
                       r"\(96, 48\) in the model and \(192, 48\) in the plan"):
        fxprune.apply_plan(_fresh(0, mlp_ratio=2.0), plan)
    with pytest.raises(PlanError, match=r"no parameter or buffer 'blocks\.1\."):
        fxprune.apply_plan(_fresh(0, depth=1), plan)


def test_tampered_plan_names_the_parameter(pruned_tiny):
    pruned, x = pruned_tiny
    plan = pruned.meta[PLAN_DATA_KEY]
    name = sorted(plan.params)[0]
    dims = {d: k[:-1] for d, k in plan.params[name].items()}
    bad = dataclasses.replace(plan, params={**plan.params, name: dims})
    with pytest.raises(PlanError, match=rf"parameter '{name}' is sliced differently"):
        fxprune.apply_plan(_fresh(0), bad, x)
    with pytest.raises(PlanError, match="not valid JSON"):
        fxprune.Plan.from_json("{")


@settings(max_examples=budget(25), deadline=None)
@given(vit_specs(max_depth=2))
def test_apply_plan_on_generated_models(spec):
    model, x, _ = build(spec)
    try:
        pruned = fxprune.prune(model, x, macs_ratio=0.6, criterion="l1", align=1)
    except FxPruneError:
        event("refused")
        return
    plan = fxprune.Plan.from_json(pruned.meta[PLAN_DATA_KEY].to_json())
    other, _, _ = build(dataclasses.replace(spec, seed=spec.seed + 1))
    again = fxprune.apply_plan(other, plan, x)
    assert again.code == pruned.code
    assert rel_err(outputs(again, x), outputs(zeroed_original(other, plan.torch_plan()), x)) \
        < 1e-4
