"""How long fxprune's front end takes on real-size ViTs, next to Torch-Pruning's dependency graph.

For each timm model (random weights, eval mode, one (1, 3, 224, 224) input), on CPU with a
fixed number of torch threads (default 2), this times:

* ``trace``: ``fxprune.trace(model, x)`` (symbolic trace + shape propagation);
* ``prepare``: ``fxprune.pipeline.prepare(gm)`` (decomposition passes), when that module exists;
* ``analyze``: ``fxprune.analyze(gm)`` on the traced (prepared) graph;
* ``torch_pruning``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``
  in the same run, when ``torch_pruning`` is importable (otherwise skipped with a note).

Each step runs once to warm up, then ``--repeats`` times (default 5); the median is reported.
Results go to a JSON file (``--out``, default ``benchmarks/results/analyze.json``) and a
markdown table is printed.

Usage::

    python benchmarks/bench_analyze.py
    python benchmarks/bench_analyze.py --models deit_small_patch16_224 --repeats 3 --out /tmp/a.json
    fxprune bench                      # the same, through the command line
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODELS = ["vit_large_patch16_224", "vit_base_patch16_224", "deit_small_patch16_224"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "analyze.json"


def timed(fn: Callable, repeats: int, setup: Callable | None = None) -> dict:
    """One warm-up call, then ``repeats`` timed calls: median and all runs, in seconds.
    With ``setup``, each call is ``fn(setup())`` and ``setup`` is not timed."""
    def once() -> float:
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        return time.perf_counter() - t0

    once()
    runs = [once() for _ in range(repeats)]
    return {"median": statistics.median(runs), "runs": runs}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_model(name: str, repeats: int, tp_module) -> dict:
    import timm
    import torch

    import fxprune

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {})
    x = torch.randn(1, *cfg.get("input_size", (3, 224, 224)))
    row: dict = {"model": name, "input_shape": list(x.shape),
                 "params": sum(p.numel() for p in model.parameters())}

    row["trace_s"] = timed(lambda: fxprune.trace(model, x), repeats)
    gm = fxprune.trace(model, x)
    row["graph_nodes"] = len(gm.graph.nodes)

    if importlib.util.find_spec("fxprune.pipeline") is not None:
        import copy

        from fxprune.pipeline import prepare

        # each run prepares a fresh copy of the traced graph; the copy is not timed
        row["prepare_s"] = timed(prepare, repeats, setup=lambda: copy.deepcopy(gm))
        out = prepare(gm)
        if isinstance(out, tuple):  # (graph_module, log)
            gm = out[0]
        elif out is not None:
            gm = out if isinstance(out, torch.fx.GraphModule) else out.graph_module
    else:
        row["prepare_s"] = None

    row["analyze_s"] = timed(lambda: fxprune.analyze(gm), repeats)
    analysis = fxprune.analyze(gm)
    row["sites"] = len(analysis.attention)
    row["groups"] = len(analysis.groups)
    row["fxprune_total_s"] = (row["trace_s"]["median"] + row["analyze_s"]["median"]
                              + (row["prepare_s"]["median"] if row["prepare_s"] else 0.0))

    if tp_module is not None:
        def build():
            return tp_module.DependencyGraph().build_dependency(model, example_inputs=x)

        try:
            with warnings.catch_warnings():  # "unwrapped parameters" notes, once per build
                warnings.simplefilter("ignore")
                row["torch_pruning_s"] = timed(build, repeats)
        except Exception as exc:  # record, do not hide, a failure of the anchor
            row["torch_pruning_s"] = None
            row["torch_pruning_error"] = f"{type(exc).__name__}: {exc}"
    else:
        row["torch_pruning_s"] = None
    return row


def markdown(results: list[dict], notes: list[str]) -> str:
    def med(r, key):
        v = r.get(key)
        return f"{v['median']:.3f}" if v else "-"

    lines = ["| model | params (M) | graph nodes | sites | trace (s) | prepare (s) | analyze (s) "
             "| fxprune total (s) | Torch-Pruning build_dependency (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tp = med(r, "torch_pruning_s") if "torch_pruning_error" not in r else "failed"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['graph_nodes']} "
                     f"| {r['sites']} | {med(r, 'trace_s')} | {med(r, 'prepare_s')} "
                     f"| {med(r, 'analyze_s')} | {r['fxprune_total_s']:.3f} | {tp} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
                        help="timm model names")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per step (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier parallel op; harmless
        pass
    import timm

    import fxprune

    notes = [f"CPU ({cpu_name()}), {args.threads} torch threads, batch 1; median of "
             f"{args.repeats} runs after one warm-up; random weights."]
    try:
        import torch_pruning as tp
        tp_version = _dist_version("torch-pruning") or getattr(tp, "__version__", "unknown")
        notes.append(f"Torch-Pruning {tp_version}: DependencyGraph().build_dependency(model, "
                     "example_inputs) on the same model and input, in the same run.")
    except Exception as exc:
        tp, tp_version = None, None
        notes.append(f"Torch-Pruning skipped: torch_pruning is not importable "
                     f"({type(exc).__name__}: {exc}).")
    if importlib.util.find_spec("fxprune.pipeline") is None:
        notes.append("prepare skipped: fxprune.pipeline is not available; analyze ran on the "
                     "graph as traced.")

    results = []
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args.repeats, tp))
    for r in results:
        if "torch_pruning_error" in r:
            notes.append(f"Torch-Pruning failed on {r['model']}: {r['torch_pruning_error']}")

    doc = {
        "benchmark": "analyze",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "fxprune": getattr(fxprune, "__version__", None) or
            _dist_version("fxprune"), "torch_pruning": tp_version, "cpu": cpu_name(),
            "threads": args.threads, "cpu_count": os.cpu_count(), "device": "cpu",
        },
        "repeats": args.repeats,
        "results": results,
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(results, notes))
    print(f"\nwrote {out}")
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
