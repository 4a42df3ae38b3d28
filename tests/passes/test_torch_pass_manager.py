"""fxprune passes are torch passes: ``FxPass`` is a ``torch.fx`` ``PassBase`` and its
``PassResult`` is torch's, so ``torch.fx.passes.infra.pass_manager.PassManager`` composes
them with passes a user writes against torch's API alone.

The pipeline composed here: preparation passes -> analysis -> insert-gates -> a user pass
(gate values from its own scores) -> sync-head-ranks -> slice."""

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.meta import PLAN_KEY
from fxprune.models.reference import tiny_vit
from fxprune.passbase import FxPass, PassResult
from fxprune.passes.insert_gates import InsertGates, gate_modules
from fxprune.passes.slice import Slice
from fxprune.passes.sync_head_ranks import SyncHeadRanks
from fxprune.pipeline import default_passes


def analyze_pass(gm):
    """The analysis as a torch function pass: read-only, it records itself in gm.meta."""
    fxprune.analyze(gm)
    return TorchPassResult(gm, False)


class ScoreGates(PassBase):
    """A user's pass, written against torch's PassBase only: gate values in [0, 1) from its
    own (here: seeded random) scores, for sync-head-ranks to turn into synchronised masks."""

    def call(self, gm):
        for group, gate in gate_modules(gm).items():
            gen = torch.Generator().manual_seed(group)
            with torch.no_grad():
                gate.values.copy_(torch.rand(gate.values.shape, generator=gen))
        return TorchPassResult(gm, True)


def _model():
    torch.manual_seed(0)
    return tiny_vit().eval(), torch.randn(2, 3, 32, 32)


def _by_pass_manager(model, x):
    passes = [*default_passes(), analyze_pass, InsertGates(), ScoreGates(), SyncHeadRanks(),
              Slice()]
    return PassManager(passes)(fxprune.trace(model, x))


def _by_fxprune(model, x):
    gm, _ = fxprune.prepare(fxprune.trace(model, x))
    fxprune.analyze(gm)
    gated = InsertGates()(gm).graph_module
    ScoreGates()(gated)
    gated = SyncHeadRanks()(gated).graph_module
    return gated, Slice()(gated).graph_module


def test_fxprune_passes_are_torch_passes():
    for p in [*default_passes(), InsertGates(), SyncHeadRanks(), Slice()]:
        assert isinstance(p, FxPass) and isinstance(p, PassBase)
        assert p.name and p.name == p.name.lower() and " " not in p.name


def test_pass_manager_pipeline_equals_the_fxprune_pipeline():
    model, x = _model()
    managed = _by_pass_manager(model, x)
    gated, sliced = _by_fxprune(model, x)
    assert isinstance(managed, TorchPassResult) and managed.modified
    out = managed.graph_module
    # the same graph, the same plan, the same weights ...
    assert out.code == sliced.code
    plan, ref_plan = out.meta[PLAN_KEY], sliced.meta[PLAN_KEY]
    assert plan and plan.keys() == ref_plan.keys()
    for name, dims in ref_plan.items():
        assert plan[name].keys() == dims.keys()
        assert all(torch.equal(plan[name][d], kept) for d, kept in dims.items())
    ref_state = sliced.state_dict()
    assert out.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(t, ref_state[k]) for k, t in out.state_dict().items())
    # ... smaller than the dense model, and equal to the gated one (binary gates)
    assert fxprune.count_macs(out, x) < fxprune.count_macs(model, x)
    with torch.no_grad():
        assert torch.equal(out(x), sliced(x))
        torch.testing.assert_close(out(x), gated(x), rtol=1e-4, atol=1e-5)


def test_fxprune_result_is_torchs_pass_result():
    gm = fxprune.trace(*_model())
    fxprune.analyze(gm)
    result = InsertGates()(gm)
    assert isinstance(result, TorchPassResult) and isinstance(result, PassResult)
    graph_module, modified = result               # torch's named tuple ...
    assert graph_module is result.graph_module and modified is True
    assert result.info["gates"] and result.changes  # ... with what fxprune adds


def test_pass_manager_reports_a_pass_run_out_of_order():
    """Slice without gates or a plan is refused; PassManager names the pass and keeps the
    fxprune error as the cause."""
    model, x = _model()
    with pytest.raises(Exception, match="'Slice' pass") as info:
        PassManager([*default_passes(), analyze_pass, Slice()])(fxprune.trace(model, x))
    assert isinstance(info.value.__cause__, fxprune.PlanError)
    assert "no gates and no keep plan" in str(info.value.__cause__)
