"""CPU inference speed of a model pruned by ``fxprune.prune`` next to its dense original.

For a timm model (random weights, eval mode, fp32) this builds the dense model and, for every
``--ratios`` x ``--aligns`` pair, ``fxprune.prune(model, x, macs_ratio=r, align=a)``; then it
times all of them on one batch under ``torch.inference_mode`` with a fixed number of torch
threads (default 2). Measurements are INTERLEAVED: every round runs each variant ``--iters``
times, variants in a rotated order, so a burst of load from another process hits every variant
alike. Reported per variant:

* ``ms_per_batch``: median over rounds of the per-round median;
* ``ideal_speedup``: ``1 / macs_ratio`` (the MACs ratio the pruned model actually reached,
  ``pruned.meta["fxprune.macs_ratio"]``);
* ``speedup``: the median over rounds of ``dense_round_time / variant_round_time`` (each ratio
  taken from measurements seconds apart), and ``speedup_of_medians`` for comparison;
* ``efficiency``: ``speedup / ideal_speedup``.

A ``dense-fx`` variant (``fxprune.prune(model, x, macs_ratio=1.0)``: the model traced and
run through the preparation passes, nothing removed) separates the cost of the graph rewrite
(fx GraphModule, decomposed attention, split q/k/v) from the effect of pruning. ``--profile``
adds, per variant, the operators with the largest self CPU time (torch.profiler), and the JSON
always records the attention widths after pruning (head dims of Q/K and of V per site, MLP
widths).

Usage::

    python benchmarks/bench_speed.py                       # DeiT-S, batch 8, 0.7, align 8 and 1
    python benchmarks/bench_speed.py --model vit_tiny_patch16_224 --img-size 64 --batch 2 \\
        --rounds 1 --out /tmp/speed.json                   # a smoke run (seconds)
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

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_speed.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def widths(pruned) -> dict:
    """Attention head dims and MLP widths after pruning, from ``pruned.meta``."""
    rows = pruned.meta.get("fxprune.summary", [])
    sites = [r for r in rows if "site" in r]
    mlps = [r for r in rows if r.get("kind") == "mlp"]
    return {
        "qk_head_dims": [r["qk_dim_after"] for r in sites],
        "v_head_dims": [r["v_dim_after"] for r in sites],
        "mlp_widths": [r["width_after"] for r in mlps],
        # q/k head dim != v head dim: PyTorch's fused SDPA kernels (flash on CPU and CUDA)
        # need equal head dims and fall back to the unfused math path for such sites
        "sites_qk_ne_v": sum(r["qk_dim_after"] != r["v_dim_after"] for r in sites),
        "sites": len(sites),
    }


def build_variants(args) -> tuple[list[dict], object]:
    import timm
    import torch

    import fxprune

    torch.manual_seed(args.seed)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x1 = torch.randn(1, 3, size, size)
    dense_macs = fxprune.count_macs(model, x1)
    variants = [{"name": "dense", "module": model, "align": None, "target": 1.0,
                 "macs_ratio": 1.0, "macs": dense_macs}]
    if not args.no_fx_dense:
        # macs_ratio=1.0: traced and prepared (decomposition passes) but nothing removed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fxprune.prune(model, x1, macs_ratio=1.0, criterion=args.criterion)
        variants.append({"name": "dense-fx", "module": gm, "align": None, "target": 1.0,
                         "macs_ratio": float(gm.meta["fxprune.macs_ratio"]), "macs": dense_macs})
    for ratio in args.ratios:
        for align in args.aligns:
            print(f"pruning {args.model} to {ratio} at align={align} ...", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = fxprune.prune(model, x1, macs_ratio=ratio, criterion=args.criterion,
                                       align=align, seed=args.seed)
            prune_s = time.perf_counter() - t0
            reached = float(pruned.meta["fxprune.macs_ratio"])
            variants.append({"name": f"pruned-{ratio:g}-a{align}", "module": pruned,
                             "align": align, "target": ratio, "macs_ratio": reached,
                             "macs": int(round(reached * dense_macs)), "prune_s": prune_s,
                             "widths": widths(pruned)})
    for v in variants:
        v["params"] = sum(p.numel() for p in v["module"].parameters())
    x = torch.randn(args.batch, 3, size, size)
    return variants, x


def measure(variants: list[dict], x, rounds: int, iters: int, warmup: int) -> None:
    """Interleaved timing; fills ``v["round_s"]`` (per-round median seconds per batch)."""
    import torch

    with torch.inference_mode():
        ref = variants[0]["module"](x)
        for v in variants:
            out = None
            for _ in range(warmup):
                out = v["module"](x)
            if out is not None and tuple(out.shape) != tuple(ref.shape):
                raise RuntimeError(f"{v['name']}: output shape {tuple(out.shape)} != dense "
                                   f"{tuple(ref.shape)}")
            v["round_s"] = []
        n = len(variants)
        for r in range(rounds):
            order = [variants[(r + i) % n] for i in range(n)]
            for v in order:
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    v["module"](x)
                    times.append(time.perf_counter() - t0)
                v["round_s"].append(statistics.median(times))


def summarize(variants: list[dict], batch: int) -> None:
    dense = variants[0]["round_s"]
    d_med = statistics.median(dense)
    for v in variants:
        med = statistics.median(v["round_s"])
        v["ms_per_batch"] = med * 1e3
        v["images_per_s"] = batch / med
        v["ideal_speedup"] = 1.0 / v["macs_ratio"]
        paired = [d / t for d, t in zip(dense, v["round_s"])]
        v["speedup_per_round"] = paired
        v["speedup"] = statistics.median(paired)
        v["speedup_of_medians"] = d_med / med
        v["efficiency"] = v["speedup"] / v["ideal_speedup"]


def profile(variants: list[dict], x, iters: int, top: int = 8) -> None:
    """Top operators by self CPU time per forward (torch.profiler), per variant."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.inference_mode():
        for v in variants:
            v["module"](x)
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    v["module"](x)
            rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in rows) or 1.0
            v["profile_top_ops"] = [
                {"op": e.key, "self_ms_per_forward": e.self_cpu_time_total / 1e3 / iters,
                 "share": e.self_cpu_time_total / total, "calls_per_forward": e.count / iters}
                for e in rows[:top]]


def markdown(doc: dict) -> str:
    env = doc["environment"]
    cfg = doc["config"]
    lines = [f"{cfg['model']}, batch {cfg['batch']}, {cfg['img_size']}px, fp32, "
             f"{env['threads']} threads on {env['cpu']} ({env['cpu_count']} cores); "
             f"{cfg['rounds']} interleaved rounds x {cfg['iters']} iters, medians.", "",
             "| variant | align | MACs ratio | ideal speedup | ms / batch | img/s "
             "| speedup (paired median) | speedup (of medians) | realized / ideal "
             "| q/k != v head-dim sites |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in doc["results"]:
        w = v.get("widths")
        ne = f"{w['sites_qk_ne_v']}/{w['sites']}" if w else "-"
        lines.append(
            f"| {v['name']} | {v['align'] or '-'} | {v['macs_ratio']:.3f} "
            f"| {v['ideal_speedup']:.2f}x | {v['ms_per_batch']:.1f} | {v['images_per_s']:.1f} "
            f"| {v['speedup']:.2f}x | {v['speedup_of_medians']:.2f}x "
            f"| {v['efficiency']:.0%} | {ne} |")
    if any("profile_top_ops" in v for v in doc["results"]):
        lines += ["", "Top operators (torch.profiler; its overhead inflates absolute times, "
                  "so shares are shown):"]
    for v in doc["results"]:
        if "profile_top_ops" in v:
            ops = ", ".join(f"{o['op'].removeprefix('aten::')} {o['share']:.0%}"
                            for o in v["profile_top_ops"][:8])
            lines.append(f"- self-CPU-time shares, {v['name']}: {ops}")
    lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (passed to timm.create_model); default: model's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7], help="macs_ratio")
    parser.add_argument("--aligns", type=int, nargs="+", default=[8, 1], help="align values")
    parser.add_argument("--criterion", default="similarity")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--iters", type=int, default=3, help="forward calls per variant/round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fx-dense", action="store_true",
                        help="skip the dense-fx variant (prune at macs_ratio=1.0)")
    parser.add_argument("--profile", action="store_true",
                        help="also record the top operators of every variant (torch.profiler)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import timm

    load_before = loadavg()
    variants, x = build_variants(args)
    print(f"timing {len(variants)} variants, {args.rounds} rounds ...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    measure(variants, x, args.rounds, args.iters, args.warmup)
    wall = time.perf_counter() - t0
    summarize(variants, args.batch)
    if args.profile:
        profile(variants, x, max(1, args.iters))

    notes = [
        "ideal speedup = 1 / MACs ratio reached (fxprune.count_macs: matmul MACs only; "
        "norms, softmax, GELU, adds and copies are not in the MACs model).",
        "speedup = median over rounds of dense/variant time measured in the same round.",
        f"load average before/after timing: {load_before} / {loadavg()} (shared machine).",
    ]
    doc = {
        "benchmark": "cpu_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None
                                                          else sys.argv[1:])),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "fxprune": _dist_version("fxprune"), "cpu": cpu_name(),
            "threads": args.threads, "cpu_count": os.cpu_count(), "device": "cpu",
        },
        "config": {"model": args.model, "batch": args.batch, "img_size": x.shape[-1],
                   "dtype": "float32", "ratios": args.ratios, "aligns": args.aligns,
                   "criterion": args.criterion, "rounds": args.rounds, "iters": args.iters,
                   "warmup": args.warmup, "timing_wall_s": wall},
        "results": [{k: v for k, v in var.items() if k != "module"} for var in variants],
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
