"""What ``prune`` could not prune: ``pruned.meta["fxprune.report"]``, the groups frozen before
planning because the slicer cannot slice them, rule failures, and the CLI's ``--strict``."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.analysis.rules import register_rule
from fxprune.analysis.rules.registry import FUNCTION_RULES
from fxprune.app.cli import EXIT_TARGET_MISSED, main
from fxprune.meta import REPORT_KEY
from fxprune.planning.freeze import freeze_unsliceable, slice_failure, trial_masks
from fxprune.planning.report import format_report

FACTORY = '''
import torch
from torch import nn

def normed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.Linear(24, 8),
                          nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    return model.eval(), torch.randn(2, 8)
'''


def normed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.Linear(24, 8),
                          nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    return model.eval(), torch.randn(2, 8)


def test_report_names_the_frozen_group_that_blocks_the_target():
    model, x = normed()
    with pytest.warns(UserWarning, match="LayerNorm normalizes"):
        pruned = fxprune.prune(model, x, macs_ratio=0.3, criterion="l1")
    report = pruned.meta[REPORT_KEY]
    assert report["target_met"] is False and report["reached"] > 0.32
    assert report["attention"] == "no dot-product attention"
    (blocker,) = report["blocked_by"]
    assert blocker["kind"] == "mlp" and blocker["channels"] == 24
    assert "LayerNorm" in blocker["reason"]
    text = format_report(report)
    assert "MISSED" in text and "LayerNorm" in text


def test_report_when_the_target_is_met():
    model, x = normed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = fxprune.prune(model, x, macs_ratio=0.8, criterion="l1")
    report = pruned.meta[REPORT_KEY]
    assert report["target_met"] is True and report["blocked_by"] == []
    assert [g["kind"] for g in report["frozen"]] == ["mlp"]   # the LayerNorm'd one, listed


def shift_channels(h):
    return torch.roll(h, 1, -1)


torch.fx.wrap("shift_channels")


class Shifted(nn.Module):
    """fc1's channels are rolled by one before fc2: taught to the analysis with a rule that
    lies (elementwise), the only way slicing fc1/fc2 can go wrong -- the trial slice must
    catch it and freeze that group, and only that one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        h = shift_channels(h)
        return self.fc4(torch.relu(self.fc3(self.fc2(h))))


def test_a_group_whose_slice_is_not_exact_is_frozen_before_planning():
    torch.manual_seed(0)
    model, x = Shifted().eval(), torch.randn(2, 8)
    from fxprune.analysis.rules import pointwise
    register_rule(shift_channels, pointwise)   # wrong on purpose: it moves channels
    try:
        gm = fxprune.trace(model, x)
        a = fxprune.analyze(gm)
        ids = [g.index for g in a.groups if g.prunable]
        assert len(ids) == 3   # fc1 -> fc2, fc2 -> fc3, fc3 -> fc4
        masks = trial_masks(a, ids)
        assert slice_failure(gm, {ids[0]: masks[ids[0]]}, (x,)) is not None
        assert all(slice_failure(gm, {i: masks[i]}, (x,)) is None for i in ids[1:])
        frozen = freeze_unsliceable(gm, a, ids, (x,))
        assert list(frozen) == [ids[0]] and "does not compute" in frozen[ids[0]]
        assert a.groups[ids[0]].frozen == frozen[ids[0]]
        pruned = fxprune.prune(model, x, macs_ratio=0.9, criterion="l1")
    finally:
        del FUNCTION_RULES[shift_channels]
    assert pruned.meta["fxprune.plan"] and "fc1.weight" not in pruned.meta["fxprune.plan"]
    assert "does not compute" in pruned.meta[REPORT_KEY]["frozen"][0]["reason"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, pruned.meta["fxprune.plan"])(x))


def _zeroed(model, plan):
    import copy
    out = copy.deepcopy(model)
    for name, dims in plan.items():
        p = out.get_parameter(name)
        for dim, kept in dims.items():
            drop = np.setdiff1d(np.arange(p.shape[dim]), kept.numpy())
            with torch.no_grad():
                p.index_fill_(dim, torch.as_tensor(drop), 0.0)
    return out


def test_a_rule_that_raises_freezes_its_inputs_instead_of_crashing():
    def broken(p, node):
        raise RuntimeError("rule bug")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
            self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc4(torch.relu(self.fc3(self.fc2(h + torch.tanh(h)))))

    saved = FUNCTION_RULES["tanh"]
    register_rule("tanh", broken, replace=True)
    try:
        a = fxprune.analyze(fxprune.trace(M().eval(), torch.randn(2, 8)))
    finally:
        register_rule("tanh", saved, replace=True)
    frozen = [g.frozen for g in a.groups if g.frozen]
    assert frozen == ["the rule of tanh raised RuntimeError: rule bug at tanh"]
    assert [(n, w) for n, w in a.opaque] == [("tanh", frozen[0].removesuffix(" at tanh"))]
    assert sum(g.prunable for g in a.groups) == 2   # fc2 -> fc3 and fc3 -> fc4


def test_cli_prints_the_report_and_strict_fails_a_missed_target(tmp_path, capsys):
    f = tmp_path / "models.py"
    f.write_text(FACTORY)
    spec = f"{f}:normed"
    rc = main(["prune", spec, "--macs-ratio", "0.3", "--criterion", "l1"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "target missed; blocked by: group" in out and "LayerNorm" in out
    out_dir = tmp_path / "pruned"
    rc = main(["prune", spec, "--macs-ratio", "0.3", "--criterion", "l1", "--strict",
               "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert rc == EXIT_TARGET_MISSED == 3 and "MACs target 0.3 missed" in err
    # a failed strict run ships nothing
    assert f"nothing written to {out_dir}" in err and not out_dir.exists()
    rc = main(["prune", spec, "--macs-ratio", "0.8", "--criterion", "l1", "--strict",
               "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0 and json.loads(out)["report"]["target_met"] is True


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with two outputs per input channel (groups = in = out / 2), as
    between PiT's stages, next to a pruned group: slicing must leave it as it is."""

    def __init__(self):
        super().__init__()
        self.pw, self.pw2 = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.out(self.dw(self.pw2(torch.relu(self.pw(x)))))


def test_depthwise_conv_with_a_channel_multiplier_survives_slicing():
    torch.manual_seed(0)
    model, x = DepthwiseMultiplier().eval(), torch.randn(1, 8, 6, 6)
    pruned = fxprune.prune(model, x, macs_ratio=0.7, criterion="l1", align=4)
    assert set(pruned.meta["fxprune.plan"]) == {"pw.weight", "pw.bias", "pw2.weight"}
    dw = pruned.get_submodule("dw")
    assert (dw.groups, dw.in_channels, dw.out_channels) == (8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, pruned.meta["fxprune.plan"])(x))


def test_groups_that_fail_at_slicing_are_found_without_running_the_model():
    """tiny_vit's fused qkv is not split first: its q/k and v groups cannot be sliced apart
    (slicing says so at once). The search finds them by slicing alone; the model runs in one
    trial only (sliced copy and gated model, once each), for the groups that are left. The
    result is what trying each group alone gives."""
    from fxprune.models.reference import tiny_vit

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = fxprune.trace(tiny_vit().eval(), x)
    a = fxprune.analyze(gm)
    ids = [g.index for g in a.groups if g.prunable]
    masks = trial_masks(a, ids)
    alone = {i: slice_failure(gm, {i: masks[i]}, (x,)) for i in ids}
    assert 0 < sum(why is not None for why in alone.values()) < len(ids)
    runs = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: runs.append(m) if isinstance(m, torch.fx.GraphModule) else None)
    try:
        frozen = freeze_unsliceable(gm, a, ids, (x,))
    finally:
        hook.remove()
    assert frozen == {i: why for i, why in alone.items() if why is not None}
    assert len(runs) == 2


def test_trial_slices_leave_the_models_buffers_alone():
    """The trials run copies that share the model's parameters, not its buffers: a batch norm
    in training mode updates its statistics in place on every run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8),
                          nn.GELU(), nn.Linear(8, 4)).train()
    x = torch.randn(6, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.trace(model, x)
    a = fxprune.analyze(gm)
    ids = [g.index for g in a.groups if g.prunable]
    assert ids and freeze_unsliceable(gm, a, ids, (x,)) == {}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
