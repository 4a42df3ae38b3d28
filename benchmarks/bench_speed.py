"""CPU inference speed of a model pruned by ``fxprune.prune`` next to its dense original.

For a timm model (random weights, eval mode, fp32) this builds the dense model and, for every
``--ratios`` x ``--aligns`` pair, ``fxprune.prune(model, x, macs_ratio=r, align=a)``; then it
times all of them on one batch under ``torch.inference_mode`` with a fixed number of torch
threads (default 2). Measurements are INTERLEAVED: every round runs each variant ``--iters``
times, variants in a rotated order, so a burst of load from another process hits every variant
alike. Reported per variant:

* ``ms_per_batch``: median over rounds of the per-round time (the fastest of the round's
  ``--iters`` calls, which drops calls that lost their cores to another process);
* ``ideal_speedup``: ``1 / macs_ratio`` (the MACs ratio the pruned model actually reached,
  ``pruned.meta["fxprune.macs_ratio"]``);
* ``speedup``: the median over rounds of ``dense_round_time / variant_round_time`` (each ratio
  taken from measurements seconds apart), and ``speedup_of_medians`` for comparison;
* ``speedup_of_best``: dense's fastest round / the variant's fastest round (the least disturbed
  measurement of each: the better estimate when many rounds were contended);
* ``efficiency`` / ``efficiency_of_best``: the speedups divided by ``ideal_speedup``;
* ``other_load``: per round, the CPU share other processes used while the variant ran
  (``/proc/stat`` minus this process); ``speedup_quiet``: the paired median over the rounds in
  which both dense and the variant ran with other load < 10% (``quiet_rounds`` of them).

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
    python benchmarks/bench_speed.py --model fxprune:flatten.flatten_swin_tiny \\
        --ratios 0.9 0.7 --out benchmarks/results/cpu_speed_flatten.json   # FLatten-Swin-T
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

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_speed.json"
QUIET = 0.10  # other processes' share of the machine's CPU below which a round is quiet


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """CPU time used by OTHER processes during a measurement, as a share of the machine
    (``/proc/stat`` busy time of all CPUs, steal included, minus this process's own CPU time).
    ``None`` where ``/proc/stat`` is not readable."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1

    def _busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        return (sum(fields[:3]) + sum(fields[5:8])) / self.hz

    def start(self):
        t = os.times()
        return self._busy(), t.user + t.system, time.perf_counter()

    def share(self, snap) -> float | None:
        busy0, own0, wall0 = snap
        busy1 = self._busy()
        if busy0 is None or busy1 is None:
            return None
        t = os.times()
        wall = time.perf_counter() - wall0
        other = (busy1 - busy0) - (t.user + t.system - own0)
        return max(0.0, other) / max(wall * self.ncpu, 1e-9)


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
    if ":" in args.model:  # a model spec: fxprune:flatten.flatten_swin_tiny, torchvision:...
        from fxprune.app.models_registry import load_model

        hw = (args.img_size, args.img_size) if args.img_size else None
        model, x1 = load_model(args.model, hw)
        model = model.eval()
        x1 = x1[:1]
        size = int(x1.shape[-1])
    else:
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
    x = torch.randn(args.batch, *x1.shape[1:])
    return variants, x


def measure(variants: list[dict], x, rounds: int, iters: int, warmup: int,
            until_quiet: int = 0, max_rounds: int = 0) -> int:
    """Interleaved timing; fills ``v["round_s"]`` (per round, the fastest of the ``iters``
    calls: on a machine shared with other work a call that lost its cores to another process
    is an outlier, not a measurement) and ``v["calls_s"]`` (every call). After ``rounds``
    rounds, goes on while fewer than ``until_quiet`` rounds were quiet for every variant (up to
    ``max_rounds``). Returns the number of rounds run."""
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
            v["round_s"], v["calls_s"], v["other_load"] = [], [], []
        n = len(variants)
        load = OtherLoad()
        r = quiet_rounds = 0
        while r < rounds or (quiet_rounds < until_quiet and r < max(rounds, max_rounds)):
            order = [variants[(r + i) % n] for i in range(n)]
            for v in order:
                times = []
                snap = load.start()
                for _ in range(iters):
                    t0 = time.perf_counter()
                    v["module"](x)
                    times.append(time.perf_counter() - t0)
                share = load.share(snap)
                v["round_s"].append(min(times))
                v["calls_s"].append(times)
                v["other_load"].append(None if share is None else round(share, 3))
            shares = [v["other_load"][-1] for v in variants]
            quiet_rounds += all(sh is not None and sh < QUIET for sh in shares)
            r += 1
    return r


def summarize(variants: list[dict], batch: int) -> None:
    dense = variants[0]["round_s"]
    d_med = statistics.median(dense)
    d_best = min(dense)
    for v in variants:
        med = statistics.median(v["round_s"])
        best = min(v["round_s"])
        v["ms_per_batch"] = med * 1e3
        v["best_ms_per_batch"] = best * 1e3
        v["images_per_s"] = batch / med
        v["ideal_speedup"] = 1.0 / v["macs_ratio"]
        paired = [d / t for d, t in zip(dense, v["round_s"])]
        v["speedup_per_round"] = paired
        v["speedup"] = statistics.median(paired)
        v["speedup_of_medians"] = d_med / med
        v["speedup_of_best"] = d_best / best
        v["efficiency"] = v["speedup"] / v["ideal_speedup"]
        v["efficiency_of_best"] = v["speedup_of_best"] / v["ideal_speedup"]
        # a round is quiet when other processes used < QUIET of the machine's CPU while both
        # dense and this variant ran in it (with 2 threads on 2 cores, one busy core stalls
        # every parallel op of ours)
        quiet = [i for i, (a, b) in enumerate(zip(variants[0]["other_load"], v["other_load"]))
                 if a is not None and b is not None and a < QUIET and b < QUIET]
        v["quiet_rounds"] = len(quiet)
        v["speedup_quiet"] = statistics.median(paired[i] for i in quiet) if quiet else None
        v["efficiency_quiet"] = (v["speedup_quiet"] / v["ideal_speedup"]
                                 if quiet else None)
        loads = [s for s in v["other_load"] if s is not None]
        v["other_load_median"] = statistics.median(loads) if loads else None


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
             f"{cfg['rounds']} interleaved rounds x {cfg['iters']} calls (round time: fastest "
             "call; median over rounds).", "",
             "| variant | align | MACs ratio | ideal speedup | ms / batch (median) "
             "| ms / batch (best) | speedup (paired median) | realized / ideal "
             "| speedup (quiet rounds) | speedup (of best) | speedup (of medians) "
             "| other load (median) | q/k != v head-dim sites |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in doc["results"]:
        w = v.get("widths")
        ne = f"{w['sites_qk_ne_v']}/{w['sites']}" if w else "-"
        quiet = (f"{v['speedup_quiet']:.2f}x ({v['quiet_rounds']}/{len(v['round_s'])})"
                 if v["speedup_quiet"] is not None else f"- (0/{len(v['round_s'])})")
        load = f"{v['other_load_median']:.0%}" if v["other_load_median"] is not None else "-"
        lines.append(
            f"| {v['name']} | {v['align'] or '-'} | {v['macs_ratio']:.3f} "
            f"| {v['ideal_speedup']:.2f}x | {v['ms_per_batch']:.1f} "
            f"| {v['best_ms_per_batch']:.1f} | {v['speedup']:.2f}x | {v['efficiency']:.0%} "
            f"| {quiet} | {v['speedup_of_best']:.2f}x | {v['speedup_of_medians']:.2f}x "
            f"| {load} | {ne} |")
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
    parser.add_argument("--model", default="deit_small_patch16_224",
                        help="timm model name, or a model spec such as "
                        "fxprune:flatten.flatten_swin_tiny")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (passed to timm.create_model); default: model's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7], help="macs_ratio")
    parser.add_argument("--aligns", type=int, nargs="+", default=[8, 1], help="align values")
    parser.add_argument("--criterion", default="similarity")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--iters", type=int, default=2, help="forward calls per variant/round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--until-quiet", type=int, default=0, metavar="K",
                        help="after --rounds, keep going until K rounds were quiet for every "
                             "variant (other processes < 10%% CPU), up to --max-rounds")
    parser.add_argument("--max-rounds", type=int, default=80)
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
    rounds = measure(variants, x, args.rounds, args.iters, args.warmup, args.until_quiet,
                     args.max_rounds)
    wall = time.perf_counter() - t0
    summarize(variants, args.batch)
    if args.profile:
        profile(variants, x, max(1, args.iters))

    notes = [
        "ideal speedup = 1 / MACs ratio reached (fxprune.count_macs: matmul MACs only; "
        "norms, softmax, GELU, adds and copies are not in the MACs model).",
        "speedup (paired median) = median over rounds of dense/variant time measured in the "
        "same round (round time = fastest of its calls); speedup (of best) = dense's fastest "
        "round / the variant's fastest round, the least disturbed measurement of each.",
        f"other load: CPU used by other processes while a variant ran, as a share of the "
        f"machine (/proc/stat minus this process); quiet rounds: both dense and the variant "
        f"ran with other load < {QUIET:.0%}. On a machine shared with other work the quiet-round "
        "and best-round figures are the least disturbed estimates.",
        f"load average before/after timing: {load_before} / {loadavg()} (shared machine).",
    ]
    doc = {
        "benchmark": "cpu_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None
                                                          else sys.argv[1:])),
        "environment": {
            "fxprune_git": git_revision(), "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__, "fxprune": dist_version("fxprune"), "cpu": cpu_name(),
            "threads": args.threads, "cpu_count": os.cpu_count(), "device": "cpu",
        },
        "config": {"model": args.model, "batch": args.batch, "img_size": x.shape[-1],
                   "dtype": "float32", "ratios": args.ratios, "aligns": args.aligns,
                   "criterion": args.criterion, "rounds": rounds, "iters": args.iters,
                   "min_rounds": args.rounds, "until_quiet": args.until_quiet,
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
