"""Smoke tests of the speed benchmarks: each script runs end to end on a tiny CPU config and
writes a JSON file with the documented structure (the figures themselves are not checked: a
2-image batch on a shared CPU is noise)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchutil import load_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

pytest.importorskip("timm")


def run_script(name: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_timed_row(row: dict) -> None:
    for key in ("macs_ratio", "ideal_speedup", "ms_per_batch", "images_per_s", "speedup",
                "speedup_of_medians", "efficiency"):
        assert key in row, (key, row)
    assert 0 < row["macs_ratio"] <= 1.0
    assert row["ideal_speedup"] == pytest.approx(1.0 / row["macs_ratio"])
    assert row["ms_per_batch"] > 0 and row["images_per_s"] > 0
    assert row["speedup"] > 0 and row["efficiency"] > 0


def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed.json"
    proc = run_script("bench_speed.py", [
        "--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch", "2", "--rounds", "1",
        "--iters", "1", "--warmup", "1", "--ratios", "0.7", "--aligns", "8",
        "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "cpu_speed"
    assert {"date", "command", "environment", "config", "results", "notes"} <= set(doc)
    assert doc["environment"]["threads"] == 2
    assert doc["config"]["batch"] == 2 and doc["config"]["img_size"] == 64
    names = [r["name"] for r in doc["results"]]
    assert names == ["dense", "dense-fx", "pruned-0.7-a8"]
    for row in doc["results"]:
        check_timed_row(row)
        assert len(row["round_s"]) == len(row["other_load"]) == 1
        assert row["speedup_of_best"] > 0 and "speedup_quiet" in row
    dense = doc["results"][0]
    assert dense["speedup"] == pytest.approx(1.0)
    for row in doc["results"][2:]:
        assert abs(row["macs_ratio"] - 0.7) <= 0.02
        w = row["widths"]
        assert len(w["qk_head_dims"]) == len(w["v_head_dims"]) == w["sites"] == 12
        assert all(d % 8 == 0 for d in w["qk_head_dims"] + w["v_head_dims"])  # align 8
    assert "| pruned-0.7-a8 |" in proc.stdout  # the markdown table



def test_bench_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_script("bench_gpu.py", ["--device", "cpu", "--tiny", "--ratios", "0.7",
                                       "--aligns", "8", "--toast-gmacs", "0.06",
                                       "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpu_throughput"
    assert {"date", "command", "environment", "config", "results", "notes"} <= set(doc)
    cfg = doc["config"]
    assert cfg["tiny"] and cfg["batch"] == 4 and cfg["img_size"] == 64
    assert cfg["dtype"] == "fp32" and cfg["compile"] == "off" and cfg["rounds"] == 2
    assert doc["environment"]["device"] == "cpu" and doc["environment"]["device_name"]
    rows = {r["variant"]: r for r in doc["results"]}
    assert {"dense", "fxprune-1-a8", "fxprune-0.7-a8"} <= set(rows)
    for name in ("dense", "fxprune-1-a8", "fxprune-0.7-a8"):
        row = rows[name]
        assert "error" not in row, row
        assert row["model"] == "vit_tiny_patch16_224" and row["compile"] is False
        check_timed_row(row)
        assert len(row["round_s"]) == 2
    assert rows["dense"]["speedup"] == pytest.approx(1.0)
    assert rows["fxprune-1-a8"]["macs_ratio"] == pytest.approx(1.0)
    assert abs(rows["fxprune-0.7-a8"]["macs_ratio"] - 0.7) <= 0.02
    # ToaSt at a target in MACs: the ratio comes from count_macs of the dense model
    toast = rows["toast-0.06G-a8"]
    assert "error" not in toast, toast
    assert toast["method"] == "toast" and toast["paper"] is None and cfg["toast"]
    check_timed_row(toast)
    assert toast["target"] == pytest.approx(0.06 / toast["dense_gmacs"])
    assert 0.3 < toast["target"] < 0.9 and abs(toast["macs_ratio"] - toast["target"]) <= 0.02
    assert toast["widths"]["qk_head_dims"][0] == 64  # block 0's attention left dense
    assert "| toast-0.06G-a8 |" in proc.stdout
    if importlib.util.find_spec("torch_pruning") is not None:
        tp = rows["tp-0.7-r8"]  # present, and either measured or its failure recorded
        if "error" not in tp:
            check_timed_row(tp)
            assert tp["torch_pruning"]["search"]
    else:
        assert not any(r["variant"].startswith("tp-") for r in doc["results"])
    assert "Device: CPU" in proc.stdout and "| fxprune-0.7-a8 |" in proc.stdout


def test_bench_gpu_toast_paper_selection():
    """``--toast-paper`` selects DeiT-S and DeiT-B at the paper's MACs, batch 128, bf16, eager
    and compiled, with no other pruned rows; ``--toast`` adds rows only where a target is
    known."""
    mod = load_bench("bench_gpu.py")
    args = mod.parse_args(["--toast-paper"])
    assert args.models == ["deit_small_patch16_224", "deit_base_patch16_224"]
    assert args.batch == 128 and args.dtype == "bf16" and args.compile_modes == [False, True]
    assert args.toast and args.ratios == [] and args.aligns == [8]
    assert mod.toast_gmacs("deit_small_patch16_224", args) == 2.9
    assert mod.toast_gmacs("deit_base_patch16_224", args) == 10.4
    assert mod.TOAST_PAPER["deit_small_patch16_224"]["speedup"] == 1.95
    assert mod.TOAST_PAPER["deit_base_patch16_224"]["speedup"] == 1.52
    assert mod.toast_gmacs("swin_base_patch4_window7_224", args) is None
    plain = mod.parse_args([])
    assert not plain.toast and plain.ratios == [0.7, 0.5] and plain.batch == 256
    assert mod.toast_gmacs("deit_small_patch16_224", plain) is None
    assert mod.toast_gmacs("deit_small_patch16_224",
                           mod.parse_args(["--toast", "--img-size", "160"])) is None
    assert mod.toast_gmacs("any", mod.parse_args(["--toast-gmacs", "1.5"])) == 1.5


def test_bench_gpu_without_cuda_says_so(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--out",
                           str(tmp_path / "g.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_bench_gpu_flatten_on_cpu(tmp_path):
    """The ``--flatten-paper`` path (an fxprune model spec, 0.9 and 0.7, align 8) on CPU with
    the tiny FLatten-Swin instead of FLatten-Swin-T: builds, prunes, times, writes JSON."""
    out = tmp_path / "gpu_flatten.json"
    proc = run_script("bench_gpu.py", [
        "--device", "cpu", "--flatten-paper", "--models", "fxprune:flatten.flatten_swin_nano",
        "--batch", "2", "--dtype", "fp32", "--compile", "off", "--rounds", "2", "--iters", "1",
        "--warmup", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    cfg = doc["config"]
    assert cfg["flatten_paper"] and cfg["ratios"] == [0.9, 0.7] and cfg["aligns"] == [8]
    assert cfg["models"] == ["fxprune:flatten.flatten_swin_nano"]
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"dense", "fxprune-1-a8", "fxprune-0.9-a8", "fxprune-0.7-a8"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["model"] == "fxprune:flatten.flatten_swin_nano" and row["compile"] is False
        check_timed_row(row)
        assert len(row["round_s"]) == 2
        assert "paper" not in row  # the paper's figures are for FLatten-Swin-T/S/B at 224 px
    for ratio in (0.9, 0.7):
        row = rows[f"fxprune-{ratio:g}-a8"]
        assert abs(row["macs_ratio"] - ratio) <= 0.03, row["macs_ratio"]
        assert all(d % 8 == 0 for d in row["widths"]["qk_head_dims"])  # align 8
        assert len(row["widths"]["qk_head_dims"]) == 4  # 2 linear + 2 window sites
    assert rows["fxprune-0.7-a8"]["params"] < rows["dense"]["params"]
    assert not any(r["variant"].startswith("tp-") for r in doc["results"])
    assert "| fxprune-0.7-a8 |" in proc.stdout


def test_bench_gpu_flatten_paper_selection():
    """``--flatten-paper`` selects FLatten-Swin-T at 0.9 and 0.7, batch 128, bf16, eager and
    compiled, and attaches the paper's speed-ups to FLatten-Swin rows at 224 px only."""
    mod = load_bench("bench_gpu.py")
    args = mod.parse_args(["--flatten-paper"])
    assert args.models == ["fxprune:flatten.flatten_swin_tiny"]
    assert args.ratios == [0.9, 0.7] and args.aligns == [8] and not args.toast
    assert args.batch == 128 and args.dtype == "bf16" and args.compile_modes == [False, True]
    tiny = "fxprune:flatten.flatten_swin_tiny"
    assert mod.flatten_paper(tiny, 0.9, None)["speedup"] == "1.1x"
    assert mod.flatten_paper(tiny, 0.7, 224)["speedup"] == "1.3-1.4x"
    assert mod.flatten_paper(tiny, 0.5, None) is None
    assert mod.flatten_paper(tiny, 0.7, 160) is None
    assert mod.flatten_paper("fxprune:flatten.flatten_swin_nano", 0.7, None) is None
    assert mod.flatten_paper("deit_small_patch16_224", 0.7, None) is None
    assert mod.paper_cell(mod.FLATTEN_PAPER[0.7]) == "1.3-1.4x (RTX A6000)"
    assert mod.paper_cell(mod.TOAST_PAPER["deit_small_patch16_224"]) == "1.95x (H100, b128)"
    assert mod.is_spec(tiny) and not mod.is_spec("deit_small_patch16_224")
    with pytest.raises(SystemExit):
        mod.parse_args(["--flatten-paper", "--toast-paper"])
