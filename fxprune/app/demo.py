"""``make demo`` / ``fxprune demo``: the main job on an embedded default.

Part 1: traces timm DeiT-S (random weights: nothing is downloaded), prints its analysis,
prunes it one-shot to 70% of its MACs, prints the per-layer table, checks the pruned model
against the original with the plan's entries zeroed (``docs/guarantees.md``) and
measures the CPU speed-up.

Part 2 (:mod:`fxprune.app.amap_demo`): the AMAP job on real data: a small ViT trained on
scikit-learn's digits, searched to 50% MACs, refined and sliced, with accuracy, MACs, kept
channels per layer and head (plot) and speed before and after.

Example (takes about a minute)::

    python -m fxprune demo --out runs/demo
"""

from __future__ import annotations

import json
import os
import time

import torch

from fxprune.meta import MACS_RATIO_KEY, SUMMARY_KEY


def _median_ms(fn, x, rounds: int) -> float:
    times = []
    with torch.inference_mode():
        fn(x)
        for _ in range(rounds):
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main(model_name: str = "deit_small_patch16_224", macs_ratio: float = 0.7,
         out_dir: str = "runs/demo", rounds: int = 5, amap: bool = True) -> dict:
    import timm

    import fxprune
    from fxprune.app.report import prune_table

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    print(f"== fxprune demo: {model_name} (random weights), target {macs_ratio:.0%} MACs ==\n")
    t = time.perf_counter()
    gm = fxprune.trace(model, x)
    analysis = fxprune.analyze(gm)
    print(analysis)
    print(f"\ntrace + analyze: {time.perf_counter() - t:.2f} s; "
          f"dense MACs {fxprune.count_macs(gm) / 1e9:.3f} G\n")
    t = time.perf_counter()
    pruned = fxprune.prune(model, x, macs_ratio=macs_ratio, criterion="similarity", align=8)
    print(f"one-shot prune (similarity criterion, align 8): {time.perf_counter() - t:.2f} s\n")
    print(prune_table(pruned))
    zeroed = fxprune.zeroed_copy(model, pruned)
    with torch.no_grad():
        err = float((pruned(x) - zeroed(x)).abs().max() / zeroed(x).abs().max())
    print(f"\npruned == original with the plan's entries zeroed: max rel. error {err:.2e}")
    xb = torch.randn(8, 3, 224, 224)
    dense_ms = _median_ms(model, xb, rounds)
    pruned_ms = _median_ms(pruned, xb, rounds)
    print(f"CPU batch 8, {torch.get_num_threads()} threads: dense {dense_ms:.0f} ms, pruned "
          f"{pruned_ms:.0f} ms -> {dense_ms / pruned_ms:.2f}x "
          f"(ideal {1 / pruned.meta['fxprune.macs_ratio']:.2f}x)")
    os.makedirs(out_dir, exist_ok=True)
    fxprune.save(pruned, os.path.join(out_dir, "pruned"), x)
    result = {"model": model_name, "macs_ratio": pruned.meta[MACS_RATIO_KEY],
              "rel_error_vs_zeroed": err, "dense_ms": dense_ms, "pruned_ms": pruned_ms,
              "summary": pruned.meta[SUMMARY_KEY]}
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {out_dir}/pruned/ (safetensors weights, plan.json, program.pt2; reload with "
          f"fxprune.load('{out_dir}/pruned')) and result.json")
    if amap:
        from fxprune.app import amap_demo

        print("\n== AMAP search + refine on scikit-learn digits ==\n")
        result["amap"] = amap_demo.main(out_dir=out_dir)
    return result
