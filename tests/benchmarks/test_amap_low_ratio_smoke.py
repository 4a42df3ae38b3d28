"""Smoke test of the low-ratio AMAP benchmark (``benchmarks/amap_low_ratio.py``) on one seed and
two ratios with tiny budgets: 128 training images (2 steps per epoch), dense models trained for
one epoch, 3 search + 1 refine epochs at indicator lr 0.3 (enough for the searches to prune).
The accuracies mean nothing; it checks plumbing (rows, fields, JSON, tables, ``--summarize``)
and what holds whatever the weights: every variant of each model at each ratio, one-shot
models at their MACs target, the equal training budget recorded, metrics in range, and that a
masked-only model's deployable MACs are never below its masked MACs while a sliced model's
are its measured MACs.

One torch thread, as in tests/benchmarks/test_digits_smoke.py.
"""

from __future__ import annotations

import json
import math

import pytest
from benchutil import load_bench

pytest.importorskip("sklearn")


def test_amap_low_ratio_tiny(tmp_path, one_thread, capsys):
    mod = load_bench("amap_low_ratio.py")
    out = tmp_path / "a.json"
    returned = mod.main(["--out", str(out), "--seeds", "1", "--ratios", "0.3", "0.2",
                         "--dense-epochs", "1", "--search-epochs", "3", "--refine-epochs", "1",
                         "--indicator-lr", "0.3", "--train-images", "128"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(returned))
    meta = saved["meta"]
    assert (meta["search_epochs"], meta["refine_epochs"], meta["oneshot_finetune_epochs"]) == \
        (3, 1, 4)
    assert meta["steps_per_epoch"] == 2 and meta["indicator_lr"] == 0.3

    rows = saved["rows"]
    for kind in ("vit", "flatten"):
        rs = [r for r in rows if r["model"] == kind]
        assert [r["variant"] for r in rs if r["ratio"] == 1.0] == ["dense"]
        for ratio in (0.3, 0.2):
            names = [r["variant"] for r in rs if r["ratio"] == ratio]
            assert names == mod.variants(kind, ("similarity",))
        assert ("amap-no-init" in mod.variants(kind, ())) == (kind == "flatten")
        for r in rs:
            assert r["seed"] == 0
            assert 0.0 <= r["acc_test"] <= 1.0 and 0.0 <= r["agree"] <= 1.0
            assert r["nll_test"] >= 0.0 and r["kl"] >= 0.0 and math.isfinite(r["kl"])
            assert 0.0 < r["macs_ratio"] <= 1.0 + 0.05   # reweight modules add a little
            assert r["deployable_macs_ratio"] >= r["macs_ratio"] - 1e-9
            if r["variant"] != "amap-no-sync":
                assert r["deployable_macs_ratio"] == r["macs_ratio"]
            if r["variant"].startswith("oneshot-"):
                assert abs(r["macs_ratio"] - r["ratio"]) <= 0.03, r
                assert 0.0 <= r["acc_test_before_finetune"] <= 1.0
            if r["variant"].startswith("amap"):
                assert 0.0 < r["search_macs_ratio"] <= 1.0
                # kept channels per head of every group the search pruned
                assert all(len(k) >= 1 for k in r["kept_per_head"].values())
        # 6 steps at indicator lr 0.3 move indicators across tau: the searches prune
        assert min(r["search_macs_ratio"] for r in rs if r["variant"] == "amap") < 1.0
        dense = next(r for r in rs if r["variant"] == "dense")
        assert dense["kl"] == 0.0 and dense["macs_ratio"] == 1.0

    printed = capsys.readouterr().out
    assert "### vit: 1 seeds" in printed and "MACs ratio 0.2:" in printed
    assert "| amap-no-init |" in printed and "| oneshot-similarity |" in printed

    again = mod.main(["--summarize", str(out)])
    assert again == saved["rows"]
    assert "| amap-no-sync |" in capsys.readouterr().out
