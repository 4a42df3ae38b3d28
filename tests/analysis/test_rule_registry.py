"""The rule registry: a user teaches fxprune an op with ``register_rule``; an op with no rule
freezes what reaches it; registering a name twice needs ``replace=True``."""

import pytest
import torch
import torch.fx
import torch.nn as nn

import fxprune
from fxprune.analysis.rules import pointwise, register_rule
from fxprune.analysis.rules.registry import FUNCTION_RULES


def squash(x):
    return x * torch.sigmoid(1.702 * x)


torch.fx.wrap("squash")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(squash(self.fc1(x)))


def _mlp_groups(model):
    analysis = fxprune.analyze(fxprune.trace(model, torch.randn(2, 5, 8)))
    return [g for g in analysis.groups if g.size == 32]


def test_unknown_op_freezes_then_registered_rule_prunes():
    model = Mlp().eval()
    assert not _mlp_groups(model)  # squash is opaque: its channels are not prunable
    register_rule(squash, pointwise)
    try:
        after = _mlp_groups(model)
        assert after and all(g.frozen is None for g in after)
        x = torch.randn(2, 5, 8)
        pruned = fxprune.prune(model, x, macs_ratio=0.6, align=1)
        assert pruned.fc1.weight.shape[0] < 32
        assert fxprune.count_macs(pruned, x) < fxprune.count_macs(model, x)
    finally:
        FUNCTION_RULES.pop(squash, None)


def test_registering_a_known_op_needs_replace():
    with pytest.raises(fxprune.FxPruneError, match="already has a rule"):
        register_rule("linear", pointwise)
    with pytest.raises(fxprune.FxPruneError, match="neither an op name"):
        register_rule(3, pointwise)
