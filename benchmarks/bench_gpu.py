"""Inference throughput of fxprune-pruned ViTs against their dense originals (and, when
installed, against Torch-Pruning at the same MACs), on a GPU.

For each timm model (random weights, eval mode) this builds:

* ``dense``: the timm model;
* ``fxprune-R-aA``: ``fxprune.prune(model, x, macs_ratio=R, align=A)`` for every ``--ratios`` R
  and ``--aligns`` A (pruned on CPU in fp32, then moved and cast); ``fxprune-1-a8`` is
  ``macs_ratio=1.0``: the traced and rewritten graph (decomposed attention, split q/k/v) with
  nothing removed, which isolates what the rewrite itself costs;
* ``tp-R-rA``: when ``torch_pruning`` is importable, the same model pruned by Torch-Pruning's
  ``MetaPruner`` following its documented timm ViT example (``num_heads`` taken from every
  attention module's ``qkv``, head dims pruned, no head removal, ``model.head`` ignored,
  ``GroupMagnitudeImportance(p=2)``), with ``global_pruning=True`` and ``round_to=A``; its
  ``pruning_ratio`` is searched so that ``fxprune.count_macs`` of the result matches R. After
  pruning, ``num_heads``/``head_dim``/``attn_dim`` of timm attention modules are repaired by hand
  as in that example. Swin's patch merging gets a custom Torch-Pruning pruner (its 4C input is
  four copies of the C channels). A failure is recorded as its error string;
* ``toast-<G>G-aA`` (``--toast``): ``fxprune.prune(model, x, macs_ratio=G / dense MACs,
  criterion="toast", align=A, dense_sites=(0,))``: ToaSt's coupled head-wise pruning (block 0's
  attention left dense, as in ToaSt's configs) to G GMACs, the ratio computed from
  ``fxprune.count_macs`` of the dense model at its input size. G is the paper's figure for
  DeiT-S (2.9) and DeiT-B (10.4) (``TOAST_PAPER``; reported on H100, batch 128, with
  speed-ups 1.95x and 1.52x, printed beside ours), or ``--toast-gmacs`` for any model. Token
  Channel Selection is not part of these rows.

``--models`` also takes fxprune model specs (``fxprune:flatten.flatten_swin_tiny``, as
``bench_speed.py`` and the CLI: :func:`fxprune.app.models_registry.load_model`; the input's channels
and size come from the spec's example input). Torch-Pruning is not run on them (its timm recipe
knows neither FLatten's focused linear attention nor this Swin's modules).

``--flatten-paper``: FLatten-Swin-T (``fxprune:flatten.flatten_swin_tiny``, 224 px, random
weights) dense, ``fxprune-1-a8`` and ``fxprune.prune`` (``--criterion``, default similarity) at
``macs_ratio`` 0.9 and 0.7, align 8, bf16, batch 128, eager and compiled. The table prints
AMAP's reported speed-ups (paper Table 2, RTX A6000, ``FLATTEN_PAPER``) beside ours: 1.1x at
0.9 (AMAP-S: FLatten-Swin-T 4.5 -> 4.2 GFLOPs, 0.93 of the MACs) and 1.3-1.4x at 0.7 (AMAP-B
and AMAP-L: FLatten-Swin-S 8.7 -> 6.2 G and -B 15.4 -> 11.1 G, 0.71 and 0.72; the paper has
no FLatten-Swin-T model at 0.7, its other -T model, AMAP-T at 1.3 G (0.29), ran 1.5x). The
paper's models are AMAP-searched and trained, ours one-shot pruned with random weights: the
widths differ, so only the order of magnitude is comparable.

Every variant is timed eager and (``--compile``) under ``torch.compile``, interleaved: each
round runs every variant ``--iters`` times in a rotated order, timed with CUDA events after a
synchronize; ``--warmup`` untimed calls first. Per variant: median seconds per batch over
rounds, images/s, ``speedup`` = median over rounds of dense/variant time in the same round (same
compile setting), ideal speedup ``1 / macs_ratio`` and realized / ideal.

Usage (H100/H200, torch 2.11+ with timm, from a plain checkout)::

    PYTHONPATH=. python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --tiny --out /tmp/gpu_tiny.json

    PYTHONPATH=. python benchmarks/bench_gpu.py --toast-paper \\
        --out benchmarks/results/gpu_toast.json
    PYTHONPATH=. python benchmarks/bench_gpu.py --flatten-paper \\
        --out benchmarks/results/gpu_flatten.json

From a plain checkout (``PYTHONPATH=.``, nothing installed) ``fxprune.passes`` and
``fxprune.models`` (the folders ``passes/`` and ``models/``, mapped by ``setup.cfg`` at install
time) are not importable by name; this script maps them itself when they are missing
(:func:`plain_checkout_packages`), so it also runs without ``pip install -e .``.

``--tiny``: ``vit_tiny_patch16_224`` at 64 px, batch 4, fp32, no compile, 2 rounds (a smoke
test that runs on a CPU). ``--toast-paper``: the ToaSt comparison alone: DeiT-S and DeiT-B
(``--models`` overrides), batch 128, dense, ``fxprune-1-a8`` and ``toast-*-a8`` rows (no
``--ratios`` rows unless given, hence no Torch-Pruning rows), bf16, eager and compiled.
``--flatten-paper``: see above (``--models`` overrides, e.g. with
``fxprune:flatten.flatten_swin_small fxprune:flatten.flatten_swin_base`` for the paper's
0.7 rows' own models).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

from _env import cpu_name, dist_version, git_revision  # noqa: E402
from tp_anchor import tp_prune_to_macs  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu.json"
DEFAULT_MODELS = ["deit_base_patch16_224", "swin_base_patch4_window7_224"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# ToaSt's reported DeiT results (the ToaSt paper): MACs, top-1, speed-up on H100, batch 128
TOAST_PAPER = {
    "deit_small_patch16_224": {"gmacs": 2.9, "top1": 80.77, "speedup": 1.95},
    "deit_base_patch16_224": {"gmacs": 10.4, "top1": 82.87, "speedup": 1.52},
}
TOAST_MODELS = list(TOAST_PAPER)
# AMAP's reported FLatten-Swin speed-ups (paper Table 2, RTX A6000; batch not stated), by the
# nominal MACs ratio the issue asks for: 0.9 is AMAP-S (FLatten-Swin-T 4.5 -> 4.2 GFLOPs),
# 0.7 is AMAP-B / AMAP-L (FLatten-Swin-S 8.7 -> 6.2 G: 1.3x, -B 15.4 -> 11.1 G: 1.4x)
FLATTEN_MODELS = ["fxprune:flatten.flatten_swin_tiny"]
FLATTEN_PAPER = {
    0.9: {"speedup": "1.1x", "device": "RTX A6000",
          "source": "AMAP-S: FLatten-Swin-T 4.5 -> 4.2 GFLOPs (0.93), 805 -> 921 img/s"},
    0.7: {"speedup": "1.3-1.4x", "device": "RTX A6000",
          "source": "AMAP-B: FLatten-Swin-S 8.7 -> 6.2 G (0.71), 1.3x; AMAP-L: FLatten-Swin-B "
                    "15.4 -> 11.1 G (0.72), 1.4x; no FLatten-Swin-T model at 0.7 in the paper"},
}


# -- helpers ----------------------------------------------------------------------------------

def _err(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


def plain_checkout_packages() -> list[str]:
    """Make ``fxprune.passes`` and ``fxprune.models`` importable from a plain checkout.

    ``setup.cfg`` installs the folders ``passes/`` and ``models/`` as these packages; with only
    ``PYTHONPATH=.`` they have no name. Where one is missing, it is loaded from its folder beside
    ``fxprune/`` (nothing happens when fxprune is installed). Returns the names it mapped."""
    import importlib.util

    import fxprune

    root = Path(fxprune.__file__).resolve().parent.parent
    mapped = []
    for name, folder in (("passes", "passes"), ("models", "models")):
        full = f"fxprune.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue
        init = root / folder / "__init__.py"
        if not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(
            full, init, submodule_search_locations=[str(root / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(fxprune, name, module)
        mapped.append(full)
    return mapped


def is_spec(name: str) -> bool:
    """A model spec (``fxprune:...``, ``timm:...``, ``file.py:factory``), not a timm name."""
    return ":" in name


def flatten_paper(name: str, target: float, img_size: int | None) -> dict | None:
    """AMAP's reported speed-up for a FLatten-Swin model pruned to ``target`` (0.9 or 0.7) at
    224 px, or None (another model, ratio or input size)."""
    if not name.removeprefix("fxprune:").startswith("flatten.flatten_swin_") or \
            name.endswith("_nano") or img_size not in (None, 224):
        return None
    return FLATTEN_PAPER.get(round(target, 6))


def fxprune_widths(pruned) -> dict:
    rows = pruned.meta.get("fxprune.summary", [])
    sites = [r for r in rows if "site" in r]
    return {"qk_head_dims": [r["qk_dim_after"] for r in sites],
            "v_head_dims": [r["v_dim_after"] for r in sites],
            "mlp_widths": [r["width_after"] for r in rows if r.get("kind") == "mlp"]}


def module_widths(model) -> dict:
    """Head dims and MLP widths of a timm model (used for Torch-Pruning results)."""
    import torch

    qk, mlp = [], []
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        heads = getattr(m, "num_heads", None)
        if qkv is not None and isinstance(heads, int) and hasattr(qkv, "out_features"):
            qk.append(qkv.out_features // (3 * heads))
        fc1 = getattr(m, "fc1", None)
        if fc1 is not None and hasattr(fc1, "out_features"):
            mlp.append(fc1.out_features)
    embed = None
    for m in model.modules():  # the patch embedding's output width: the residual stream
        if isinstance(m, torch.nn.Conv2d):
            embed = m.out_channels
            break
    return {"qk_head_dims": qk, "v_head_dims": qk, "mlp_widths": mlp, "embed_dim": embed}


# -- timing -----------------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def __call__(self, fn, x, iters: int) -> float:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - t0) / iters


def measure(entries: list[dict], x, timer: Timer, rounds: int, iters: int, warmup: int) -> None:
    """Interleaved timing of ``entries`` (each with a callable ``fn``); fills ``round_s``."""
    import torch

    with torch.inference_mode():
        live = []
        for e in entries:
            try:
                t0 = time.perf_counter()
                for _ in range(max(1, warmup)):
                    e["fn"](x)
                if timer.cuda:
                    torch.cuda.synchronize()
                e["warmup_s"] = time.perf_counter() - t0
                e["round_s"] = []
                live.append(e)
            except Exception as exc:  # e.g. a compile failure: record it, time the others
                e["error"] = _err(exc)
        n = len(live)
        for r in range(rounds):
            for i in range(n):
                e = live[(r + i) % n]
                e["round_s"].append(timer(e["fn"], x, iters))


# -- main -------------------------------------------------------------------------------------

def toast_gmacs(name: str, args) -> float | None:
    """The ToaSt target of ``name`` in GMACs: ``--toast-gmacs``, else the paper's figure;
    None without ``--toast`` or for a model the paper does not report."""
    if not args.toast:
        return None
    if args.toast_gmacs is not None:
        return args.toast_gmacs
    if name in TOAST_PAPER and args.img_size in (None, 224):
        return TOAST_PAPER[name]["gmacs"]
    print(f"[{name}] no ToaSt target (the paper reports {', '.join(TOAST_PAPER)} at 224 px; "
          "--toast-gmacs sets one): no toast rows", file=sys.stderr, flush=True)
    return None


def bench_model(name: str, args, device, dtype, tp) -> list[dict]:
    import timm
    import torch

    import fxprune

    torch.manual_seed(args.seed)
    if is_spec(name):  # fxprune:flatten.flatten_swin_tiny, timm:..., file.py:factory
        from fxprune.app.models_registry import load_model

        model, x1 = load_model(name, (args.img_size, args.img_size) if args.img_size else None)
        model = model.eval()
        x1 = x1[:1]
        chans, size = int(x1.shape[1]), int(x1.shape[-1])
    else:
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        chans = 3
        x1 = torch.randn(1, chans, size, size)
    dense_macs = fxprune.count_macs(model, x1)
    variants = [{"model": name, "variant": "dense", "method": "dense", "target": 1.0,
                 "align": None, "macs_ratio": 1.0, "module": model,
                 "widths": module_widths(model)}]
    fx_configs = [(r, a) for r in args.ratios for a in args.aligns]
    if not args.no_unpruned_fx:
        fx_configs.insert(0, (1.0, args.aligns[0]))

    def fx_variant(v: dict, **options) -> dict:
        print(f"[{name}] fxprune.prune macs_ratio={v['target']:.4f} align={v['align']} "
              f"{options}", file=sys.stderr, flush=True)
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = fxprune.prune(model, x1, macs_ratio=v["target"], align=v["align"],
                                       seed=args.seed, **options)
            v["prune_s"] = time.perf_counter() - t0
            v["macs_ratio"] = float(pruned.meta["fxprune.macs_ratio"])
            v["widths"] = fxprune_widths(pruned)
            v["module"] = pruned
        except Exception as exc:
            v["error"] = _err(exc)
        return v

    for ratio, align in fx_configs:
        v = {"model": name, "variant": f"fxprune-{ratio:g}-a{align}", "method": "fxprune",
             "target": ratio, "align": align}
        paper = flatten_paper(name, ratio, args.img_size) if ratio < 1.0 else None
        if paper is not None:
            v["paper"] = paper
        variants.append(fx_variant(v, criterion=args.criterion))
    gmacs = toast_gmacs(name, args)
    for align in (args.aligns if gmacs is not None else []):
        v = {"model": name, "variant": f"toast-{gmacs:g}G-a{align}", "method": "toast",
             "target": gmacs * 1e9 / dense_macs, "target_gmacs": gmacs, "align": align,
             "dense_gmacs": dense_macs / 1e9, "paper": TOAST_PAPER.get(name)
             if gmacs == TOAST_PAPER.get(name, {}).get("gmacs") else None}
        if v["target"] >= 1.0:
            v["error"] = (f"target {gmacs:g} GMACs is not below the dense model's "
                          f"{dense_macs / 1e9:.3g} GMACs")
            variants.append(v)
            continue
        variants.append(fx_variant(v, criterion="toast", dense_sites=(0,)))
    if tp is not None and is_spec(name):
        print(f"[{name}] Torch-Pruning skipped: its recipe is for timm models",
              file=sys.stderr, flush=True)
    if tp is not None and not is_spec(name):
        for ratio in args.ratios:
            for align in args.aligns:
                v = {"model": name, "variant": f"tp-{ratio:g}-r{align}", "method": "torch_pruning",
                     "target": ratio, "align": align}
                print(f"[{name}] Torch-Pruning to macs_ratio={ratio} round_to={align}",
                      file=sys.stderr, flush=True)
                try:
                    t0 = time.perf_counter()
                    pruned, info = tp_prune_to_macs(tp, model, x1, ratio, align, dense_macs,
                                                    tol=args.tp_tol,
                                                    max_evals=args.tp_max_evals)
                    v["prune_s"] = time.perf_counter() - t0
                    v["macs_ratio"] = info["macs_ratio"]
                    v["torch_pruning"] = info
                    v["widths"] = module_widths(pruned)
                    v["module"] = pruned
                except Exception as exc:
                    v["error"] = _err(exc)
                variants.append(v)
    for v in variants:
        if "module" in v:
            v["params"] = sum(p.numel() for p in v["module"].parameters())
            v["module"] = v["module"].to(device=device, dtype=dtype).eval()

    x = torch.randn(args.batch, chans, size, size, device=device, dtype=dtype)
    timer = Timer(device)
    results = []
    for compiled in args.compile_modes:
        if compiled:
            torch._dynamo.reset()
        entries = []
        for v in variants:
            if "module" not in v:
                continue
            fn = v["module"]
            if compiled:
                fn = torch.compile(fn, mode=args.compile_mode)
            entries.append({"v": v, "fn": fn})
        print(f"[{name}] timing {len(entries)} variants, compile={compiled}", file=sys.stderr,
              flush=True)
        measure(entries, x, timer, args.rounds, args.iters, args.warmup)
        dense = next((e for e in entries if e["v"]["variant"] == "dense"), None)
        for e in entries:
            v = e["v"]
            row = {k: val for k, val in v.items() if k != "module"}
            row["compile"] = compiled
            if "error" in e:
                row["error"] = e["error"]
                results.append(row)
                continue
            med = statistics.median(e["round_s"])
            row.update({"ms_per_batch": med * 1e3, "images_per_s": args.batch / med,
                        "round_s": e["round_s"], "warmup_s": e["warmup_s"],
                        "ideal_speedup": 1.0 / v["macs_ratio"]})
            if dense is not None and "round_s" in dense and dense["round_s"]:
                paired = [d / t for d, t in zip(dense["round_s"], e["round_s"])]
                row["speedup"] = statistics.median(paired)
                row["speedup_of_medians"] = statistics.median(dense["round_s"]) / med
                row["efficiency"] = row["speedup"] / row["ideal_speedup"]
            results.append(row)
        del entries
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for v in variants:
        if "module" not in v:  # pruning failed: keep the error in the results
            results.append({k: val for k, val in v.items()})
    return results


def paper_cell(paper: dict | None) -> str:
    """The paper column: ToaSt's figures (H100, batch 128) or AMAP's (RTX A6000)."""
    if not paper:
        return "-"
    if isinstance(paper.get("speedup"), str):  # AMAP on FLatten-Swin: "1.3-1.4x"
        return f"{paper['speedup']} ({paper['device']})"
    return f"{paper['speedup']:.2f}x (H100, b128)"


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = [f"Device: {doc['environment']['device_name']}; batch {cfg['batch']}, "
             f"{cfg['dtype']}, {cfg['img_size'] or 'default'} px, {cfg['rounds']} interleaved "
             f"rounds x {cfg['iters']} iters, medians; torch {doc['environment']['torch']}.", "",
             "| model | variant | compile | MACs ratio | ideal | img/s | speedup | realized/ideal "
             "| paper speedup | head dims q/k (min-max) | MLP widths (min-max) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]

    def rng(vals):
        return f"{min(vals)}-{max(vals)}" if vals else "-"

    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r.get('compile', '-')} | - | - | - "
                         f"| failed | - | - | {r['error'][:120]} | |")
            continue
        w = r.get("widths", {})
        paper = paper_cell(r.get("paper"))
        lines.append(
            f"| {r['model']} | {r['variant']} | {'yes' if r['compile'] else 'no'} "
            f"| {r['macs_ratio']:.3f} | {r['ideal_speedup']:.2f}x | {r['images_per_s']:.1f} "
            f"| {r.get('speedup', float('nan')):.2f}x | {r.get('efficiency', float('nan')):.0%} "
            f"| {paper} | {rng(w.get('qk_head_dims', []))} | {rng(w.get('mlp_widths', []))} |")
    lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with the presets' defaults filled in (``--tiny``, ``--toast-paper``,
    ``--flatten-paper``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke config: vit_tiny_patch16_224 at 64 px, batch 4, fp32, "
                             "no compile, 2 rounds")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="fxprune (--criterion) and Torch-Pruning targets (default 0.7 0.5; "
                             "toast-paper: none; flatten-paper: 0.9 0.7)")
    parser.add_argument("--aligns", type=int, nargs="+", default=None,
                        help="default 8 1 (toast-paper, flatten-paper: 8)")
    parser.add_argument("--toast", action="store_true",
                        help="add ToaSt rows (criterion='toast') at the paper's MACs for DeiT-S "
                             "and DeiT-B, or at --toast-gmacs for any model")
    parser.add_argument("--toast-gmacs", type=float, default=None,
                        help="ToaSt target in GMACs for every model (implies --toast)")
    parser.add_argument("--toast-paper", action="store_true",
                        help="the ToaSt comparison: DeiT-S and DeiT-B, batch 128, dense, "
                             "fxprune-1-a8 and toast rows, align 8")
    parser.add_argument("--flatten-paper", action="store_true",
                        help="AMAP's FLatten comparison: FLatten-Swin-T dense, fxprune-1-a8 and "
                             "fxprune at 0.9 and 0.7 (align 8), batch 128, bf16, eager and "
                             "compiled; the paper's speed-ups printed beside")
    parser.add_argument("--criterion", default="similarity")
    parser.add_argument("--batch", type=int, default=None,
                        help="default 256 (tiny: 4; toast-paper, flatten-paper: 128)")
    parser.add_argument("--img-size", type=int, default=None, help="default: model's (tiny: 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 (tiny: fp32)")
    parser.add_argument("--compile", choices=["both", "on", "off"], default=None,
                        help="eager and/or torch.compile (default both; tiny: off)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode")
    parser.add_argument("--rounds", type=int, default=None, help="default 10 (tiny: 2)")
    parser.add_argument("--iters", type=int, default=None, help="default 10 (tiny: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (tiny: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-unpruned-fx", action="store_true",
                        help="skip fxprune-1-aA (macs_ratio=1.0: the rewritten graph, nothing "
                             "removed; isolates the cost of the graph rewrite)")
    parser.add_argument("--no-torch-pruning", action="store_true",
                        help="skip the Torch-Pruning variants even when it is installed")
    parser.add_argument("--tp-tol", type=float, default=None,
                        help="Torch-Pruning MACs-ratio tolerance (default 0.005; tiny: 0.03)")
    parser.add_argument("--tp-max-evals", type=int, default=None,
                        help="Torch-Pruning prunings tried per target (default 9; tiny: 3)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    args = parser.parse_args(argv)

    tiny, paper, flat = args.tiny, args.toast_paper, args.flatten_paper
    if paper and flat:
        parser.error("--toast-paper and --flatten-paper are separate runs; pick one")
    args.toast = args.toast or paper or args.toast_gmacs is not None
    args.models = args.models or (["vit_tiny_patch16_224"] if tiny else
                                  TOAST_MODELS if paper else FLATTEN_MODELS if flat else
                                  DEFAULT_MODELS)
    args.ratios = args.ratios if args.ratios is not None else (
        [] if paper else [0.9, 0.7] if flat else [0.7, 0.5])
    args.aligns = args.aligns or ([8] if paper or flat else [8, 1])
    args.batch = args.batch or (4 if tiny else 128 if paper or flat else 256)
    args.img_size = args.img_size or (64 if tiny else None)
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    args.compile = args.compile or ("off" if tiny else "both")
    args.rounds = args.rounds or (2 if tiny else 10)
    args.iters = args.iters or (1 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    args.tp_tol = args.tp_tol if args.tp_tol is not None else (0.03 if tiny else 0.005)
    args.tp_max_evals = args.tp_max_evals or (3 if tiny else 9)
    args.compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiny, paper = args.tiny, args.toast_paper

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; run on a GPU machine or pass --device cpu "
              "(e.g. --device cpu --tiny)", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} "\
                      "torch threads)"
    for key in ("recompile_limit", "cache_size_limit"):  # many models share timm's forwards
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    import timm

    import fxprune  # noqa: F401

    mapped = plain_checkout_packages()
    notes = [
        "ideal = 1 / MACs ratio reached (fxprune.count_macs: matmul MACs; Torch-Pruning "
        "variants measured with the same MACs model).",
        "speedup = median over rounds of dense/variant time in the same round, same compile "
        "setting.",
        "Pruned on CPU in fp32, then moved to the device and cast; random weights.",
    ]
    if args.toast:
        notes.append("toast rows: fxprune.prune(criterion='toast', dense_sites=(0,)) to the "
                     "target GMACs / dense GMACs (fxprune.count_macs, batch 1); paper speed-ups "
                     "(ToaSt, H100, batch 128): " + ", ".join(
                         f"{m} {p['gmacs']:g} G {p['speedup']:.2f}x"
                         for m, p in TOAST_PAPER.items()) + "; no Token Channel Selection.")
    if mapped:
        notes.append(f"Plain checkout: {', '.join(mapped)} loaded from the folders beside "
                     "fxprune/ (not installed).")
    if any(flatten_paper(m, r, args.img_size) for m in args.models for r in args.ratios):
        notes.append("paper speed-ups for FLatten-Swin (AMAP Table 2, RTX A6000, AMAP-searched "
                     "and trained models): " + "; ".join(
                         f"{r:g}: {p['speedup']} ({p['source']})"
                         for r, p in FLATTEN_PAPER.items())
                     + ". Ours: fxprune.prune one-shot, random weights.")
    tp = tp_version = None
    if not args.no_torch_pruning:
        try:
            import torch_pruning as tp
            tp_version = dist_version("torch-pruning") or getattr(tp, "__version__", None)
            notes.append(f"Torch-Pruning {tp_version}: MetaPruner, GroupMagnitudeImportance(p=2)"
                         ", global_pruning=True, num_heads from each qkv, head dims pruned, "
                         "round_to = align, pruning_ratio searched to the same MACs (timm "
                         "models only, not model specs).")
        except Exception as exc:
            notes.append(f"Torch-Pruning skipped: not importable ({_err(exc)}).")

    results = []
    for name in args.models:
        try:
            results.extend(bench_model(name, args, device, dtype, tp))
        except Exception as exc:  # a model that fails entirely is recorded, not fatal
            results.append({"model": name, "variant": "all", "error": _err(exc)})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    doc = {
        "benchmark": "gpu_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None
                                                          else sys.argv[1:])),
        "environment": {
            "fxprune_git": git_revision(), "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__, "fxprune": dist_version("fxprune"),
            "torch_pruning": tp_version, "device": str(device), "device_name": device_name,
            "cuda": torch.version.cuda, "host_cpu": cpu_name(), "cpu_count": os.cpu_count(),
        },
        "config": {"models": args.models, "ratios": args.ratios, "aligns": args.aligns,
                   "criterion": args.criterion, "batch": args.batch, "img_size": args.img_size,
                   "dtype": args.dtype, "compile": args.compile,
                   "compile_mode": args.compile_mode, "rounds": args.rounds,
                   "iters": args.iters, "warmup": args.warmup, "tiny": tiny,
                   "tp_tol": args.tp_tol, "tp_max_evals": args.tp_max_evals,
                   "toast": args.toast, "toast_gmacs": args.toast_gmacs,
                   "toast_paper": paper, "flatten_paper": args.flatten_paper},
        "results": results,
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(markdown(doc))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
