"""Trace + analyze + prune of a timm ViT in two checkouts of fxprune, interleaved.

Each round runs every checkout once, in turn (A, B, A, B, ...), each in a fresh process with
that checkout's own ``.venv`` and its own ``benchmarks/bench_pipeline.py`` helpers: the timed
call is ``bench_pipeline``'s trace+analyze+prune (``fxprune.trace``, ``fxprune.analyze``, then
``fxprune.prune(model, x, macs_ratio=0.7, align=8)``; ``--prune-only``: the prune call alone),
one warm-up then ``--repeats`` runs, one torch thread. Interleaving spreads the load of other
processes over both checkouts alike.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/compare_checkouts.py /path/to/before /path/to/after
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

CODE = """
import json, sys, warnings
sys.path.insert(0, "benchmarks")
import torch
torch.set_num_threads(1)
import bench_pipeline as b
import fxprune
model, x = b._model({model!r})
def full():
    if not {prune_only!r}:
        gm = fxprune.trace(model, x)
        fxprune.analyze(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.prune(model, x, macs_ratio=0.7, align=8)
t = b.timed(full, {repeats})
print(json.dumps({{"runs": t["runs"], "cpu": t["cpu_median"], "other_load": t["other_load"]}}))
"""


def run(checkout: Path, model: str, repeats: int, prune_only: bool = False) -> dict:
    out = subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-c",
                          CODE.format(model=model, repeats=repeats, prune_only=prune_only)],
                         cwd=checkout, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs=2, type=Path)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prune-only", action="store_true",
                        help="time fxprune.prune alone (no separate trace and analyze)")
    parser.add_argument("--out", type=Path, help="also write the runs and medians as JSON")
    args = parser.parse_args()
    results: dict[Path, list[dict]] = {c: [] for c in args.checkouts}
    for r in range(args.rounds):
        for c in args.checkouts:
            res = run(c.resolve(), args.model, args.repeats, args.prune_only)
            results[c].append(res)
            print(json.dumps({"round": r, "checkout": str(c), **res}), flush=True)
    summary = []
    for c, rows in results.items():
        runs = [t for row in rows for t in row["runs"]]
        wall, cpu = statistics.median(runs), statistics.median(row["cpu"] for row in rows)
        print(f"{c}: median wall {wall:.3f} s over {len(runs)} runs, "
              f"median process CPU {cpu:.3f} s")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=c,
                                capture_output=True, text=True).stdout.strip()
        summary.append({"checkout": str(c), "commit": commit, "median_wall_s": round(wall, 3),
                        "median_cpu_s": round(cpu, 3), "rounds": rows})
    if args.out:
        timed = "fxprune.prune" if args.prune_only else "trace+analyze+prune"
        args.out.write_text(json.dumps({"model": args.model, "timed": timed,
                                        "repeats": args.repeats, "checkouts": summary},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
