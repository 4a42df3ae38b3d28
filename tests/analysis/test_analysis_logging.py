"""The analysis says why it decides: debug records of the ``fxprune`` loggers name each rule
that fires, each freeze with its reason, and each site and group found; ``fxprune analyze -v``
prints them."""

import logging

import torch

import fxprune
from fxprune.app.cli import main
from fxprune.models.reference import tiny_vit


def _analyze_tiny():
    torch.manual_seed(0)
    return fxprune.analyze(fxprune.trace(tiny_vit(), torch.randn(1, 3, 32, 32)))


def test_debug_records_say_which_rule_fired_and_why_a_group_is_frozen(caplog):
    with caplog.at_level(logging.DEBUG, logger="fxprune"):
        analysis = _analyze_tiny()
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    rules = [m for name, m in messages if name == "fxprune.analysis.rules.registry"]
    assert any("rule" in m and "blocks_0_attn_qkv" in m for m in rules)
    # the residual stream is frozen by its LayerNorms: the freeze and the group both say so
    (embed,) = [g for g in analysis.groups if g.kind == "embed"]
    assert embed.frozen and "LayerNorm" in embed.frozen
    freezes = [m for name, m in messages if name == "fxprune.analysis.labels"]
    assert any(m.startswith("freeze") and embed.frozen in m for m in freezes)
    groups = [m for name, m in messages if name == "fxprune.analysis.engine"]
    assert f"group {embed.index}: embed, 1 x 48" in "\n".join(groups)
    assert any(f"group {embed.index}:" in m and f"frozen: {embed.frozen}" in m for m in groups)
    prunable = [g for g in analysis.groups if g.prunable]
    assert prunable and all(
        any(m.startswith(f"group {g.index}: {g.kind}") and m.endswith("prunable")
            for m in groups) for g in prunable)
    assert sum(m.startswith("attention site") for m in groups) == len(analysis.attention) == 2


def test_no_records_unless_asked(caplog):
    with caplog.at_level(logging.INFO, logger="fxprune"):
        _analyze_tiny()
    assert not [r for r in caplog.records if r.name.startswith("fxprune")]


def test_cli_analyze_verbose_logs_the_decisions_to_stderr(capsys):
    assert main(["analyze", "fxprune:tiny_vit", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "fxprune.analysis.rules.registry:" in err and "rule" in err
    assert "fxprune.analysis.labels: freeze" in err and "LayerNorm" in err
    assert "fxprune.analysis.engine: group" in err
    assert "fxprune.analysis" not in out           # the report itself stays on stdout
    # without -v nothing is logged, and -v left no handler or level behind
    assert main(["analyze", "fxprune:tiny_vit"]) == 0
    assert capsys.readouterr().err == ""
    assert logging.getLogger("fxprune").level == logging.NOTSET
    assert not logging.getLogger("fxprune").handlers
