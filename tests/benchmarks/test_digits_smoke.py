"""Smoke tests of the digits jobs: the AMAP ablation benchmark (``--quick``) and the AMAP demo
with a tiny schedule. They check plumbing (rows, fields, files), not accuracy.

Both use one torch thread: on a loaded 2-core machine, two threads per process make these
small-op workloads many times slower (intra-op threads wait on each other).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from benchutil import load_bench

import fxprune

pytest.importorskip("sklearn")


def test_digits_ablation_quick(tmp_path, one_thread, capsys):
    mod = load_bench("digits_ablation.py")
    out = tmp_path / "ablation.json"
    returned = mod.main(["--out", str(out), "--quick", "--threads", "1"])
    rows = json.loads(out.read_text())
    assert rows == json.loads(json.dumps(returned))
    variants = [r["variant"] for r in rows]
    assert sorted(variants) == sorted(["dense"] + mod.VARIANTS)   # 1 seed: one row each
    for r in rows:
        assert {"variant", "seed", "macs_ratio", "accuracy"} <= set(r)
        assert r["seed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 < r["macs_ratio"] <= 1.0 and math.isfinite(r["macs_ratio"])
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["macs_ratio"] == 1.0
    for v in ("l1-oneshot", "random-oneshot"):       # align=1: the one-shot lands on target
        assert abs(by[v]["macs_ratio"] - 0.5) < 0.03
    # amap and amap-no-reweight share one search: same structure; count_macs includes the
    # reweight modules, so the two differ by exactly their MACs
    assert by["amap"]["kept_per_head"] == by["amap-no-reweight"]["kept_per_head"]
    assert by["amap"]["reweight_macs_ratio"] > 0
    assert by["amap-no-reweight"]["reweight_macs_ratio"] == 0
    assert by["amap"]["macs_ratio"] == pytest.approx(
        by["amap-no-reweight"]["macs_ratio"] + by["amap"]["reweight_macs_ratio"])
    assert by["amap-no-sync"]["macs_from"].startswith("search")
    table = capsys.readouterr().out
    assert "| variant |" in table and "| amap-no-sync |" in table


def test_amap_demo_tiny(tmp_path, one_thread):
    from fxprune.app.amap_demo import main

    r = main(out_dir=str(tmp_path), seed=0, dense_epochs=2, epochs=3, rounds=3, verbose=False)
    png = tmp_path / "kept_channels.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.is_file() and png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_path = tmp_path / "amap_pruned"
    assert (model_path / "plan.json").is_file() and (model_path / "model.safetensors").is_file()
    assert (tmp_path / "amap_summary.json").is_file()
    assert len(r["kept"]) == 4 and all(len(row["qk_kept"]) == 4 for row in r["kept"])
    for row in r["kept"]:   # head synchronisation: every head keeps the same count
        assert len(set(row["qk_kept"])) == 1 and len(set(row["v_kept"])) == 1
    assert r["pruned_macs"] < r["dense_macs"] and r["speedup"] > 0
    pruned = fxprune.load(model_path)    # no pickle: the saved program and weights
    x = torch.rand(5, 1, 8, 8)
    assert pruned(x).shape == (5, 10)
