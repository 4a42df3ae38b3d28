"""Smoke test of the FLatten-Swin digits benchmark (``benchmarks/digits_flatten.py``: AMAP with
and without the linear-attention indicator initialization, and an L1 one-shot baseline) on a
tiny schedule: one seed, 1 dense epoch, 3 search / refine / fine-tune epochs at indicator lr
0.1. It checks plumbing (rows, fields, the JSON file, the table), that every variant lands near
the MACs target, and that the linear-attention channel counts are consistent; the accuracies
of so short a schedule mean nothing.

One torch thread, as in tests/benchmarks/test_digits_smoke.py (small-op workloads on a loaded 2-core
machine are many times slower with two).
"""

from __future__ import annotations

import json
import math

import pytest
from benchutil import load_bench

pytest.importorskip("sklearn")


def test_digits_flatten_tiny(tmp_path, one_thread, capsys):
    mod = load_bench("digits_flatten.py")
    out = tmp_path / "digits_flatten.json"
    # 3 search epochs at indicator lr 0.1: one epoch is too few for the AMAP search to land
    # near its target (see digits_ablation.py's --quick)
    returned = mod.main(["--out", str(out), "--seeds", "1", "--dense-epochs", "1",
                         "--epochs", "3", "--indicator-lr", "0.1", "--threads", "1"])
    rows = json.loads(out.read_text())
    assert rows == json.loads(json.dumps(returned))
    assert [r["variant"] for r in rows] == ["dense"] + mod.VARIANTS == [
        "dense", "amap", "amap-no-init", "l1-oneshot"]
    for r in rows:
        assert {"variant", "seed", "macs_ratio", "accuracy"} <= set(r)
        assert r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 < r["macs_ratio"] <= 1.0 and math.isfinite(r["macs_ratio"])
        assert r["macs_from"] == "count_macs"
        lk = r["linear_kept"]
        assert [s["site"] for s in lk["sites"]] == [0, 1]     # stages 1-2: linear attention
        assert (lk["qk_total_of"], lk["v_total_of"]) == (48, 48)  # 2 x 8 and 2 x 16 channels
        assert lk["qk_total"] == sum(s["qk"] for s in lk["sites"])
        for s in lk["sites"]:
            assert 1 <= s["qk"] <= s["qk_of"] and 1 <= s["v"] <= s["v_of"]
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["macs_ratio"] == 1.0
    assert by["dense"]["linear_kept"]["qk_total"] == 48
    # every variant at the same MACs; the reweight modules add about 2% to AMAP's models
    for v in mod.VARIANTS:
        assert abs(by[v]["macs_ratio"] - 0.5) <= 0.05, (v, by[v]["macs_ratio"])
    for v in ("amap", "amap-no-init"):
        assert abs(by[v]["search_macs_ratio"] - 0.5) <= 0.05
        assert by[v]["macs_ratio"] == pytest.approx(
            by[v]["search_macs_ratio"] + by[v]["reweight_macs_ratio"], abs=2e-3)
    # eq. 5-6 scored both linear q/k groups with the init on; nothing without it
    assert set(by["amap"]["linear_init"].values()) == {"scored"}
    assert len(by["amap"]["linear_init"]) == 2
    assert by["amap-no-init"]["linear_init"] == {}

    printed = capsys.readouterr().out
    assert "| variant |" in printed and "| amap-no-init |" in printed and "vs amap" in printed
    assert "linear q/k kept" in printed
