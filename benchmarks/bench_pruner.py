"""A sweep of one-shot prunings of one model: ``fxprune.prune`` per target against one
``fxprune.Pruner`` (trace, preparation, analysis and freeze step once), on the CPU.

For each ``--models`` entry (timm names, random weights, eval mode, batch 1 at the default
size) both ways prune at every ``--ratios`` target (criterion ``l1``, align 8), and the
results are checked to be identical (plan and weights). The two ways run alternately
``--repeats`` times and each figure is the median: ``prune_each_s`` (a ``fxprune.prune`` call
per target), ``pruner_s`` (``Pruner(model, x)`` plus a ``pruner.prune`` per target),
``pruner_build_s`` (the constructor alone) and the ratio ``prune_each_s / pruner_s``, measured
side by side in one run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_pruner.py --out benchmarks/results/pruner.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _env import cpu_name, git_revision  # noqa: E402

DEFAULT_OUT = HERE / "results" / "pruner.json"


def _same(a, b) -> bool:
    pa, pb = a.meta["fxprune.plan"], b.meta["fxprune.plan"]
    if {k: {d: v.tolist() for d, v in dims.items()} for k, dims in pa.items()} != \
            {k: {d: v.tolist() for d, v in dims.items()} for k, dims in pb.items()}:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].equal(sb[k]) for k in sa)


def bench_model(name: str, ratios: list[float], repeats: int, log=print) -> dict:
    """Median wall times of the two ways on ``name`` (see the module docstring)."""
    import timm
    import torch

    import fxprune

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    each, pruned_with, build = [], [], []
    identical = True
    for r in range(repeats):
        t = time.perf_counter()
        first = [fxprune.prune(model, x, macs_ratio=q, criterion="l1") for q in ratios]
        each.append(time.perf_counter() - t)
        t = time.perf_counter()
        pruner = fxprune.Pruner(model, x)
        build.append(time.perf_counter() - t)
        second = [pruner.prune(q, criterion="l1") for q in ratios]
        pruned_with.append(time.perf_counter() - t)
        identical &= all(_same(a, b) for a, b in zip(first, second))
        log(f"  {name} round {r}: prune each {each[-1]:.1f} s, Pruner {pruned_with[-1]:.1f} s "
            f"(build {build[-1]:.1f} s)")
    row = {"model": name, "ratios": ratios, "prune_each_s": statistics.median(each),
           "pruner_s": statistics.median(pruned_with),
           "pruner_build_s": statistics.median(build), "rounds": repeats,
           "identical": identical, "prune_each_runs": each, "pruner_runs": pruned_with}
    row["speedup"] = row["prune_each_s"] / row["pruner_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.7, 0.5, 0.3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    import torch

    warnings.simplefilter("ignore", UserWarning)
    rows = [bench_model(m, args.ratios, args.repeats) for m in args.models]
    doc = {"benchmark": "pruner_sweep", "command": " ".join(["python"] + sys.argv),
           "cpu": cpu_name(), "commit": git_revision(), "threads": torch.get_num_threads(),
           "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    for r in rows:
        print(f"{r['model']}: {len(r['ratios'])} targets, prune each {r['prune_each_s']:.1f} s, "
              f"Pruner {r['pruner_s']:.1f} s (build {r['pruner_build_s']:.1f} s): "
              f"{r['speedup']:.2f}x, identical results: {r['identical']}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
