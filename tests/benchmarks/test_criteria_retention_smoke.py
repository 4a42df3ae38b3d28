"""Smoke test of the one-shot retention benchmark (``benchmarks/criteria_retention.py``) on one
seed and two ratios, with dense models trained for one epoch into a temporary cache (the
accuracies of such models mean nothing). It checks plumbing (rows, fields, JSON, plot, tables)
and what must hold whatever the weights: every variant at its MACs target, accuracies in
[0, 1], KL >= 0 and the dense model at KL 0 and agreement 1, and that the cache is reused.

One torch thread, as in tests/benchmarks/test_digits_smoke.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchutil import load_bench

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_criteria_retention_tiny(tmp_path, one_thread, capsys):
    mod = load_bench("criteria_retention.py")
    out, png, cache = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "cache"
    argv = ["--out", str(out), "--plot", str(png), "--seeds", "1", "--ratios", "0.8", "0.4",
            "--dense-epochs", "1", "--cache", str(cache)]
    # three criteria keep the test short; the second run below covers l1
    returned = mod.main(argv + ["--criteria", "similarity", "random", "toast", "--jobs", "1"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(returned))
    assert saved["meta"]["wall_s"] > 0 and saved["meta"]["threads"] == 1
    assert png.stat().st_size > 10_000
    assert sorted(p.name for p in cache.iterdir()) == ["flatten-seed0-e1.pt", "vit-seed0-e1.pt"]

    rows = saved["rows"]
    # per model: the dense row, then 3 criteria x 2 head modes x 2 ratios
    assert len(rows) == 2 * (1 + 3 * 2 * 2)
    for kind in ("vit", "flatten"):
        rs = [r for r in rows if r["model"] == kind]
        dense = [r for r in rs if r["criterion"] == "dense"]
        assert len(dense) == 1 and dense[0]["kl"] == 0.0 and dense[0]["agree"] == 1.0
        combos = {(r["criterion"], r["heads"], r["target"]) for r in rs if r not in dense}
        assert combos == {(c, h, t) for c in ("similarity", "random", "toast")
                          for h in mod.HEADS for t in (0.8, 0.4)}
        for r in rs:
            for key in ("acc_test", "acc_all", "agree"):
                assert 0.0 <= r[key] <= 1.0
            assert r["kl"] >= 0.0 and math.isfinite(r["kl"])
            # the FLatten nano reaches 0.3-0.4 only to within about 0.02 at align 1
            assert abs(r["macs_ratio"] - r["target"]) <= 0.03, r
    # a pruned model that keeps 40% of the MACs is not the dense model
    assert all(r["kl"] > 0.0 for r in rows if r["target"] == 0.4)

    printed = capsys.readouterr().out
    assert "### vit: 1 seeds" in printed and "### flatten: 1 seeds" in printed
    assert "| similarity/whole-heads |" in printed and "Paired by seed" in printed

    assert "trained vit seed 0" in printed

    # the second run, in two worker processes, loads the cached dense models (no training):
    # the dense rows are the same, and the rows come back in (model, seed) order
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = mod.main(argv + ["--criteria", "l1", "--heads", "channels", "--jobs", "2"])
    assert json.loads(out.read_text())["meta"]["jobs"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    dense_rows = [r for r in again if r["criterion"] == "dense"]
    assert dense_rows == [r for r in rows if r["criterion"] == "dense"]
    assert [r["model"] for r in again] == ["vit"] * 3 + ["flatten"] * 3
    assert {(r["criterion"], r["target"]) for r in again} == {("dense", 1.0), ("l1", 0.8),
                                                             ("l1", 0.4)}
    for r in again:
        assert r["kl"] >= 0.0 and 0.0 <= r["acc_test"] <= 1.0


def test_fidelity_kl_is_zero_only_for_equal_outputs():
    mod = load_bench("criteria_retention.py")
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    dense = torch.log_softmax(m(x), -1)
    same = mod.fidelity(m, x, y, 4, dense)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["agree"] == 1.0
    other = torch.nn.Linear(4, 3)
    diff = mod.fidelity(other, x, y, 4, dense)
    expected = torch.nn.functional.kl_div(torch.log_softmax(other(x), -1), dense,
                                          log_target=True, reduction="batchmean")
    assert diff["kl"] == pytest.approx(float(expected), rel=1e-5) and diff["kl"] > 0
