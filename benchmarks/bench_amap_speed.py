"""CPU speed of the AMAP demo's model: dense vs searched + refined at 0.5 MACs, with the
search's masks as searched (``align=1``, q/k and v head dims independent: the behaviour before
search honoured ``align``) and as deployed by default (``align=8``, q/k and v paired where SDPA
runs). One dense model (``digits_vit`` trained on scikit-learn's digits), both searches from
it with the same seed; the three models are timed side by side in one run, alternately, at
batch 256 (median of ``--rounds``).

    python benchmarks/bench_amap_speed.py --out benchmarks/results/amap_speed.json

Prints one row per model (MACs ratio, kept widths, ms, speed-up over dense, top-1) and writes
the JSON with the machine and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import cpu_name, git_revision  # noqa: E402

import fxprune  # noqa: E402
from fxprune.amap.search import refine, search  # noqa: E402
from fxprune.app.amap_demo import interleaved_ms  # noqa: E402
from fxprune.app.digits import accuracy, load_digits_split, train  # noqa: E402
from fxprune.models.reference import digits_vit  # noqa: E402

VARIANTS = {"searched (align 1, q/k != v)": {"align": 1, "match_qk_v": False},
            "deployed (align 8, q/k = v for SDPA)": {}}


def widths(result) -> str:
    """Per site ``qk/v`` head dims, then MLP widths, from the search's masks."""
    a, masks = result.analysis, result.masks

    def kept(g):
        return int(masks[g].sum(axis=1).max()) if g in masks else a.groups[g].size

    sites = " ".join(f"{kept(s.qk_group)}/{kept(s.v_group)}" for s in a.attention)
    mlps = " ".join(str(int(masks[g.index].sum()) if g.index in masks else g.width)
                    for g in a.groups if g.kind == "mlp")
    return f"qk/v {sites}; mlp {mlps}"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    x1 = data.x_train[:1]
    torch.manual_seed(args.seed)
    dense = train(digits_vit(), data, epochs=args.dense_epochs, seed=args.seed).eval()
    dense_macs = fxprune.count_macs(dense, x1)
    models, rows = {"dense": dense}, {"dense": {"macs_ratio": 1.0, "widths": "-",
                                                "accuracy": accuracy(dense, data)}}
    for name, overrides in VARIANTS.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            res = search(dense, data.train_loader(seed=args.seed), x1, macs_ratio=0.5,
                         epochs=args.epochs, seed=args.seed, progress=False, **overrides)
            pruned, _ = refine(res, data.train_loader(seed=args.seed), epochs=args.epochs)
        models[name] = pruned.eval()
        rows[name] = {"macs_ratio": fxprune.count_macs(pruned, x1) / dense_macs,
                      "widths": widths(res), "accuracy": accuracy(pruned, data)}
    xb = data.x_test[:256]
    xb = torch.cat([xb] * (256 // len(xb) + 1))[:256]
    ms = interleaved_ms(models, xb, args.rounds)
    for name, row in rows.items():
        row["ms"] = ms[name]
        row["speedup"] = ms["dense"] / ms[name]
    return {"rows": rows, "batch": 256, "threads": args.threads, "rounds": args.rounds,
            "dense_epochs": args.dense_epochs, "epochs": args.epochs, "seed": args.seed,
            "cpu": cpu_name(), "torch": torch.__version__, "commit": git_revision()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/amap_speed.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-epochs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    t = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t
    print("| model | MACs ratio | kept widths | ms (batch 256) | speed-up | top-1 |")
    print("|---|---|---|---|---|---|")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['macs_ratio']:.3f} | {r['widths']} | {r['ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['accuracy']:.2%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
