"""Smoke test of the ToaSt vs AMAP digits benchmark (``benchmarks/digits_toast.py``) on a tiny
schedule: one seed, 2 dense epochs, 3 search / refine / fine-tune epochs. It checks plumbing
(rows, fields, the JSON file, the table) and that every variant lands at the MACs target; the
accuracies of so short a schedule mean nothing.

One torch thread, as in tests/benchmarks/test_digits_smoke.py (small-op workloads on a loaded 2-core
machine are many times slower with two).
"""

from __future__ import annotations

import json
import math

import pytest
from benchutil import load_bench

pytest.importorskip("sklearn")


def test_digits_toast_tiny(tmp_path, one_thread, capsys):
    mod = load_bench("digits_toast.py")
    out = tmp_path / "digits_toast.json"
    # 3 search epochs at indicator lr 0.1: one epoch is too few for the AMAP search to land
    # near its target (see the script's docstring)
    returned = mod.main(["--out", str(out), "--seeds", "1", "--dense-epochs", "2",
                         "--epochs", "3", "--indicator-lr", "0.1", "--threads", "1"])
    rows = json.loads(out.read_text())
    assert rows == json.loads(json.dumps(returned))
    assert sorted(r["variant"] for r in rows) == sorted(
        ["dense", "amap", "toast", "toast-whole-heads", "toast+tcs"]) == sorted(
        ["dense"] + mod.VARIANTS)
    for r in rows:
        assert {"variant", "seed", "macs_ratio", "accuracy"} <= set(r)
        assert r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 < r["macs_ratio"] <= 1.0 and math.isfinite(r["macs_ratio"])
        assert r["macs_from"] == "count_macs"
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["macs_ratio"] == 1.0
    for v in mod.VARIANTS:                        # every variant at the same MACs
        assert abs(by[v]["macs_ratio"] - 0.5) <= 0.05, (v, by[v]["macs_ratio"])

    # ToaSt leaves block 0's attention dense; whole heads keep the head dim
    sites = [s for s in by["toast"]["summary"] if "site" in s]
    assert sites[0]["qk_dim_after"] == sites[0]["qk_dim"]
    whole = [s for s in by["toast-whole-heads"]["summary"] if "site" in s]
    assert all(s["qk_dim_after"] == s["qk_dim"] for s in whole)
    assert any(s["heads_after"] < s["heads"] for s in whole)

    # TCS: pruned less, then TCS brings the final model to the target
    tcs = by["toast+tcs"]
    assert tcs["prune_macs_ratio"] > 0.5
    assert tcs["macs_ratio_before_tcs"] > tcs["macs_ratio"] + 0.05
    assert tcs["ratio_search"] and abs(tcs["macs_ratio"] - 0.5) <= 0.005
    assert 0.0 <= tcs["accuracy_before_tcs"] <= 1.0 and 0.0 <= tcs["accuracy_per_image"] <= 1.0

    printed = capsys.readouterr().out
    assert "| variant |" in printed and "| toast+tcs |" in printed and "vs amap" in printed
