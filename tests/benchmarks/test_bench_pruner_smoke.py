"""Smoke test of benchmarks/bench_pruner.py on the smallest timm ViT, two targets, one
round: both ways give identical pruned models and the JSON holds the fields RESULTS.md
quotes."""

from __future__ import annotations

import json

import pytest
from benchutil import load_bench

pytest.importorskip("timm")


def test_bench_pruner_tiny(tmp_path, one_thread):
    mod = load_bench("bench_pruner.py")
    out = tmp_path / "pruner.json"
    assert mod.main(["--models", "vit_tiny_patch16_224", "--ratios", "0.8", "0.5",
                     "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    [row] = doc["results"]
    assert doc["benchmark"] == "pruner_sweep" and row["identical"] is True
    assert row["ratios"] == [0.8, 0.5] and row["rounds"] == 1
    assert 0 < row["pruner_build_s"] < row["pruner_s"]
    assert row["speedup"] == pytest.approx(row["prune_each_s"] / row["pruner_s"])
