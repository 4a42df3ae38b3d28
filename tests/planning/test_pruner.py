"""``fxprune.Pruner``: one trace, preparation, analysis and freeze step for many prunings.
Every call must give what ``fxprune.prune`` gives for the same arguments (same plan, same
weights, same meta), and no pruned model may share memory with the model or another one."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxprune
from exactness import outputs, rel_err, zeroed_original
from fxprune.models.reference import tiny_vit
from zoo import ZOO

CALLS = [dict(macs_ratio=0.8, criterion="similarity", align=4),
         dict(macs_ratio=0.5, criterion="l1", align=1),
         dict(macs_ratio=0.6, criterion="toast", align=2, heads="whole"),
         dict(macs_ratio=0.7, criterion="random", align=1, seed=3, match_qk_v=False)]


def _same(a, b):
    assert a.code == b.code
    assert {k: v.tolist() for k, dims in a.meta["fxprune.plan"].items() for k, v in
            dims.items()} == {k: v.tolist() for k, dims in b.meta["fxprune.plan"].items()
                              for k, v in dims.items()}
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for key in ("fxprune.macs_ratio", "fxprune.dense_macs", "fxprune.summary",
                "fxprune.report"):
        assert a.meta[key] == b.meta[key], key


def _storages(module):
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values() if t.numel()}


@pytest.mark.parametrize("name", ["tiny_vit", "focused_linear", "rel_pos_bias"])
def test_every_call_equals_fxprune_prune(name):
    torch.manual_seed(0)
    if name == "tiny_vit":
        model, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    else:
        model, x, _ = ZOO[name]()
        model.eval()
    pruner = fxprune.Pruner(model, x)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kwargs in CALLS:
            got, want = pruner.prune(**kwargs), fxprune.prune(model, x, **kwargs)
            _same(got, want)
            ref = outputs(zeroed_original(model, got), x)
            assert rel_err(outputs(got, x), ref) < 1e-5
            results.append(got)
    # nothing shared: not with the model, not between two results of the same Pruner
    model_mem = _storages(model)
    for i, a in enumerate(results):
        assert not _storages(a) & model_mem
        for b in results[i + 1:]:
            assert not _storages(a) & _storages(b)
    # training one result leaves the others and the model as they were
    before = [r.state_dict()[k].clone() for r in results[1:2] for k in r.state_dict()]
    with torch.no_grad():
        for p in results[0].parameters():
            p.add_(1.0)
    after = [r.state_dict()[k] for r in results[1:2] for k in r.state_dict()]
    assert all(torch.equal(u, v) for u, v in zip(before, after))


def test_plan_owns_its_tensors_and_options_apply_to_every_call():
    torch.manual_seed(0)
    model, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    pruner = fxprune.Pruner(model, x, dense_sites=(0,), keep_dense=("blocks.1.mlp.*",))
    decided = pruner.plan(0.7, criterion="l1", align=1)
    assert not _storages(decided.graph_module) & _storages(model)
    pruned = pruner.prune(0.7, criterion="l1", align=1)
    plan = pruned.meta["fxprune.plan"]
    assert not any(k.startswith(("blocks.0.attn.", "blocks.1.mlp.")) for k in plan)
    _same(pruned, fxprune.prune(model, x, 0.7, criterion="l1", align=1, dense_sites=(0,),
                                keep_dense=("blocks.1.mlp.*",)))


def test_refused_bad_arguments_name_the_call():
    pruner = fxprune.Pruner(tiny_vit().eval(), torch.randn(1, 3, 32, 32))
    with pytest.raises(fxprune.InputError, match="macs_ratio must be in"):
        pruner.prune(1.5)
    with pytest.raises(fxprune.InputError, match="unknown criterion"):
        pruner.plan(0.5, criterion="magic")
    with pytest.raises(fxprune.InputError, match="heads must be"):
        pruner.prune(0.5, heads="some")
    # a refused call leaves the pruner usable
    assert pruner.prune(0.6, align=1).meta["fxprune.macs_ratio"] <= 0.62
