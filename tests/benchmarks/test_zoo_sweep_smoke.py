"""Smoke test of benchmarks/zoo_sweep.py on five small families (the full sweep is run by
hand: see README): every family gets a result from its own process, no result is an untyped
crash or a wrong model, and no fxprune call changed the model."""

import json

import pytest
from benchutil import load_bench

FAMILIES = ["hf_vit", "hf_swin", "hf_dinov2", "hf_levit", "vision_transformer_relpos"]


def test_zoo_sweep_five_families(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    sweep = load_bench("zoo_sweep.py")
    out = tmp_path / "zoo.json"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Zoo sweep\n\nold table\n\n## Other\n\nkept\n")
    sweep.HERE = tmp_path  # RESULTS.md in tmp_path: the repository's file stays as it is
    assert sweep.main(["--families", ",".join(FAMILIES), "--jobs", "1", "--out", str(out),
                       "--results-md", "--timeout", "240"]) == 0
    doc = json.loads(out.read_text())
    results = {r["family"]: r for r in doc["results"]}
    assert list(results) == FAMILIES
    for fam, r in results.items():
        assert r["status"] in ("exact", "below", "partial", "refused", "missed",
                               "no-dpa"), \
            (fam, r.get("error"))
        assert r["unchanged"], (fam, r["changed_by"])
        if r["status"] in ("exact", "below", "partial"):
            assert r["exact"] and r["rel_err"] < 1e-4
            assert r["sites"] >= 1 and 0 < r["macs_ratio"] <= 1
        if r["status"] == "refused":
            assert r["error"]["typed"]
    # a plain ViT and a window-attention Swin prune to the target exactly
    for fam in ("hf_vit", "hf_swin"):
        assert results[fam]["status"] == "exact"
        assert abs(results[fam]["macs_ratio"] - 0.7) <= 0.02
    assert doc["summary"] and doc["wall_s"] > 0
    text = md.read_text()
    assert "old table" not in text and "## Other\n\nkept" in text
    assert "| hf_vit |" in text and "wall time" in text


def test_status_rules():
    sweep = load_bench("zoo_sweep.py")
    base = {"unchanged": True, "exact": True, "sites": 3, "macs_ratio": 0.70}
    assert sweep.status_of(base) == "exact"
    assert sweep.status_of(dict(base, macs_ratio=0.85)) == "partial"
    assert sweep.status_of(dict(base, macs_ratio=0.5)) == "below"
    assert sweep.status_of(dict(base, macs_ratio=0.69)) == "exact"
    assert sweep.status_of(dict(base, exact=False)) == "wrong"
    assert sweep.status_of(dict(base, sites=0)) == "missed"
    assert sweep.status_of(dict(base, unchanged=False)) == "modified"
    assert sweep.status_of({"error": {"typed": True}}) == "refused"
    assert sweep.status_of({"error": {"typed": False}}) == "crashed"
    # a family without dot-product attention counts when the report says so and it hits the
    # target; off target it is partial/below like any other; a family with one is "missed"
    told = {"attention": "no dot-product attention"}
    nodpa = dict(base, sites=0, family="swiftformer", report=told)
    assert sweep.status_of(nodpa) == "no-dpa"
    assert sweep.status_of(dict(nodpa, report={"attention": "2 sites"})) == "missed"
    assert sweep.status_of(dict(nodpa, macs_ratio=0.86)) == "partial"
    assert sweep.status_of(dict(nodpa, family="mvitv2")) == "missed"
    rows = [{"status": "exact"}] * 7 + [{"status": "no-dpa"}, {"status": "missed"},
                                        {"status": "partial"}]
    assert sweep.bar_line(rows).startswith("Exact within 0.02 of the target: 8 of 10 (80%")
    assert "7 of 9 (78%)" in sweep.bar_line(rows)
