"""Wall time of fxprune's pipeline on real-size timm ViTs (CPU, random weights).

Two figures, each the median of ``--repeats`` (default 3) runs after one untimed warm-up run
(so imports and first-call costs are excluded):

* ``trace+analyze`` on ``--analyze-model`` (default ``vit_large_patch16_224``):
  ``fxprune.analyze(fxprune.trace(model, x))``; target < 1 s on a 2-core CPU;
* ``trace+analyze+prune`` on ``--prune-model`` (default ``vit_base_patch16_224``): the same
  two calls followed by ``fxprune.prune(model, x, macs_ratio=0.7)`` (which runs its own trace,
  preparation passes and analysis, then scores, allocates and slices); target < 3 s.

Stage times are reported too (trace, analyze, the preparation passes,
``fxprune.planning.oneshot.plan``
and the whole of ``prune``) so a missed target points at its stage. When ``torch_pruning`` is
importable, ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)`` on the
ViT-L model is timed in the same run, the same way.

``--profile FILE`` also writes a cProfile of one more ``trace+analyze+prune`` run (after the
timed ones; top 60 entries by cumulative time) to ``FILE``.

Usage::

    python benchmarks/bench_pipeline.py --out benchmarks/results/pipeline.json
    python benchmarks/bench_pipeline.py --profile /tmp/prune.prof.txt
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
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline.json"
TARGETS = {"trace+analyze": 1.0, "trace+analyze+prune": 3.0}


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_name, dist_version, git_revision  # noqa: E402
from bench_speed import OtherLoad  # noqa: E402  (sibling script)

LOAD = OtherLoad()


def timed(fn: Callable, repeats: int) -> dict:
    """One untimed warm-up call, then ``repeats`` timed calls: median and all runs of the wall
    time (s), the median of this process's CPU time (user + system, all threads), and the CPU
    share other processes took meanwhile (on a machine shared with other work these show how
    much of the wall time was waiting)."""
    fn()
    runs, cpu, other = [], [], []
    for _ in range(repeats):
        snap = LOAD.start()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        share = LOAD.share(snap)
        other.append(None if share is None else round(share, 3))
    return {"median": statistics.median(runs), "runs": runs,
            "cpu_median": statistics.median(cpu), "other_load": other}


def _model(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, torch.randn(1, *size)


def bench_analyze(name: str, repeats: int, tp) -> dict:
    import fxprune

    model, x = _model(name)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    row["trace+analyze_s"] = timed(lambda: fxprune.analyze(fxprune.trace(model, x)), repeats)
    row["trace_s"] = timed(lambda: fxprune.trace(model, x), repeats)
    gm = fxprune.trace(model, x)
    row["graph_nodes"] = len(gm.graph.nodes)
    row["analyze_s"] = timed(lambda: fxprune.analyze(gm), repeats)
    analysis = fxprune.analyze(gm)
    row["sites"] = len(analysis.attention)
    row["groups"] = len(analysis.groups)
    if tp is not None:
        def build():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tp.DependencyGraph().build_dependency(model, example_inputs=x)
        try:
            row["torch_pruning_build_dependency_s"] = timed(build, repeats)
        except Exception as exc:  # record, do not hide, a failure of the anchor
            row["torch_pruning_error"] = f"{type(exc).__name__}: {exc}"
    return row


def bench_prune(name: str, repeats: int, ratio: float, align: int,
                profile: str | None = None) -> dict:
    import fxprune
    from fxprune.passbase import copy_graph_module
    from fxprune.pipeline import prepare
    from fxprune.planning.oneshot import plan

    model, x = _model(name)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "macs_ratio": ratio, "align": align}

    def full():
        gm = fxprune.trace(model, x)
        fxprune.analyze(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fxprune.prune(model, x, macs_ratio=ratio, align=align)

    row["trace+analyze+prune_s"] = timed(full, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["prune_s"] = timed(lambda: fxprune.prune(model, x, macs_ratio=ratio, align=align),
                               repeats)
        row["plan_s"] = timed(lambda: plan(model, x, macs_ratio=ratio, align=align), repeats)
    gm = fxprune.trace(model, x)
    row["trace_s"] = timed(lambda: fxprune.trace(model, x), repeats)
    row["analyze_s"] = timed(lambda: fxprune.analyze(gm), repeats)
    # preparation passes on a fresh copy each time (the copy is timed separately)
    row["copy_s"] = timed(lambda: copy_graph_module(gm), repeats)
    row["copy+prepare_s"] = timed(lambda: prepare(copy_graph_module(gm)), repeats)
    pruned = full()
    row["macs_ratio_reached"] = pruned.meta["fxprune.macs_ratio"]
    if profile:
        row["profile"] = write_profile(full, profile)
    return row


def write_profile(fn: Callable, path: str) -> str:
    """cProfile of one ``fn()`` call, top 60 entries by cumulative time, written to ``path``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
    Path(path).write_text(text.getvalue())
    return path


def _loads(t: dict) -> str:
    vals = [v for v in t.get("other_load", []) if v is not None]
    return ", ".join(f"{v:.0%}" for v in vals) if vals else "-"


def markdown(doc: dict) -> str:
    def med(d, key):
        v = d.get(key)
        return f"{v['median']:.3f}" if isinstance(v, dict) else "-"

    a, p = doc["analyze"], doc["prune"]
    env = doc["environment"]
    lines = [f"CPU {env['cpu']} ({env['cpu_count']} cores), {env['threads']} torch threads, "
             f"batch-1 example input; median of {doc['repeats']} runs after one warm-up.", "",
             "| figure | model | median wall (s) | runs (s) | process CPU (s) "
             "| other load | target (s) | met |",
             "|---|---|---:|---|---:|---|---:|---|"]
    for key, row in (("trace+analyze", a), ("trace+analyze+prune", p)):
        t = row[f"{key}_s"]
        lines.append(f"| {key} | {row['model']} | {t['median']:.3f} "
                     f"| {', '.join(f'{r:.2f}' for r in t['runs'])} | {t['cpu_median']:.3f} "
                     f"| {_loads(t)} | {TARGETS[key]:.1f} "
                     f"| {'yes' if t['median'] < TARGETS[key] else 'NO'} |")
    if "torch_pruning_build_dependency_s" in a:
        t = a["torch_pruning_build_dependency_s"]
        lines.append(f"| Torch-Pruning build_dependency | {a['model']} | {t['median']:.3f} "
                     f"| {', '.join(f'{r:.2f}' for r in t['runs'])} | {t['cpu_median']:.3f} "
                     f"| {_loads(t)} | - | - |")
    elif "torch_pruning_error" in a:
        lines.append(f"| Torch-Pruning build_dependency | {a['model']} | failed | "
                     f"{a['torch_pruning_error']} | - | - | - | - |")
    lines += ["", "Stages (median s):", "",
              "| model | trace | analyze (traced graph) | copy+prepare | plan | prune |",
              "|---|---:|---:|---:|---:|---:|",
              f"| {a['model']} | {med(a, 'trace_s')} | {med(a, 'analyze_s')} | - | - | - |",
              f"| {p['model']} | {med(p, 'trace_s')} | {med(p, 'analyze_s')} "
              f"| {med(p, 'copy+prepare_s')} | {med(p, 'plan_s')} | {med(p, 'prune_s')} |"]
    lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--analyze-model", default="vit_large_patch16_224")
    parser.add_argument("--prune-model", default="vit_base_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.7, help="macs_ratio for prune")
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also write a cProfile of one trace+analyze+prune run to FILE")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import timm

    import fxprune  # noqa: F401  (imported before timing)

    notes = []
    tp = tp_version = None
    if not args.no_torch_pruning:
        try:
            import torch_pruning as tp
            tp_version = dist_version("torch-pruning") or getattr(tp, "__version__", None)
            notes.append(f"Torch-Pruning {tp_version}: DependencyGraph().build_dependency(model, "
                         "example_inputs=x) on the same ViT-L model and input, same run.")
        except Exception as exc:
            notes.append(f"Torch-Pruning skipped: not importable ({type(exc).__name__}: {exc}).")
    try:
        load_before = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_before = None
    print(f"timing trace+analyze on {args.analyze_model} ...", file=sys.stderr, flush=True)
    a = bench_analyze(args.analyze_model, args.repeats, tp)
    print(f"timing trace+analyze+prune on {args.prune_model} ...", file=sys.stderr, flush=True)
    p = bench_prune(args.prune_model, args.repeats, args.ratio, args.align, args.profile)
    if args.profile:
        notes.append(f"cProfile of one more trace+analyze+prune run: {args.profile}")
    try:
        load_after = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_after = None
    notes.append(f"load average before/after: {load_before} / {load_after} (shared machine); "
                 "other load = CPU share other processes used during each timed run "
                 "(/proc/stat minus this process).")
    doc = {
        "benchmark": "pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None
                                                          else sys.argv[1:])),
        "environment": {
            "fxprune_git": git_revision(), "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__, "fxprune": dist_version("fxprune"),
            "torch_pruning": tp_version, "cpu": cpu_name(), "threads": args.threads,
            "cpu_count": os.cpu_count(), "device": "cpu",
        },
        "repeats": args.repeats,
        "targets_s": TARGETS,
        "analyze": a,
        "prune": p,
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
