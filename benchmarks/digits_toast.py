"""ToaSt against AMAP on scikit-learn's digits, at the same MACs, same seeds, same dense models.

The set-up is the AMAP ablation's (``benchmarks/digits_ablation.py``, whose functions this
script imports: data split, dense training, AMAP search and refine, one-shot fine-tuning). For
every seed the dense ``digits_vit`` is trained exactly as there (same seed, same model), and
every variant is pruned from that one dense model to ``macs_ratio`` 0.5 of its MACs
(``fxprune.count_macs``, batch 1) and retrained:

``amap``               AMAP search then refine with reweight modules (the ablation's ``amap``)
``toast``              ``fxprune.prune(dense, x, macs_ratio=0.5, criterion="toast", align=1,
                       dense_sites=(0,), match_qk_v=False)`` then fine-tuned
``toast-whole-heads``  the same with ``heads="whole"`` (whole heads removed, head dim kept)
``toast+tcs``          ToaSt pruning to a higher ratio ``r``, fine-tuned, then the Token
                       Channel Selection pass (``keep_ratio`` 0.5, ``sample`` 4), so that the
                       final model WITH TCS costs 0.5 of the dense MACs

Choices, all fixed before any run (nothing was tuned on the results):

* ToaSt options: block 0's attention is left dense as in ToaSt's configs (``dense_sites=(0,)``;
  its MLP is still pruned); ``align=1`` as the ablation's one-shot variants; ``match_qk_v=False``
  because ToaSt's Q/K and V masks are independent (the library pairs them by default only for
  the speed of SDPA kernels, which does not matter for accuracy).
* Fine-tuning: every ToaSt variant is fine-tuned for the epochs of AMAP's refine (30) with the
  refine's optimizer and schedule (``digits_ablation.oneshot_finetune``). As in the ablation,
  AMAP sees search + refine epochs (60) after the dense model, ToaSt 30.
* ``toast+tcs``, how the ratio is chosen: TCS keeps half of each MLP's (already pruned) hidden
  units per forward and scores them on the class token plus 4 random patch tokens (a quarter of
  the 16). With the pass's default ``sample=16`` every token would be scored here, which costs
  as much as fc1 itself and, at keep 0.5, saves nothing. The MACs of TCS depend only on the
  pruned widths, not on the weights, so ``r`` is chosen on the dense model before fine-tuning:
  a bracketing search (false position) on ``r`` until ``count_macs(TCS(prune(dense, r))) /
  count_macs(dense)`` is within 0.002 of the target, 4 to 6 prunings (``r`` came out at 0.58;
  the row records it as ``prune_macs_ratio`` and every try in ``ratio_search``).
* ``toast+tcs``, order: prune -> fine-tune (without TCS) -> TCS on the fine-tuned model.
  ToaSt's TCS is training-free, applied at inference; the pass's module gathers weight rows
  differentiably, so fine-tuning after TCS would also run, but it is not what is done here.
  TCS selects channels per BATCH (one gather for the batch); accuracy is measured with the
  benchmark's test batches of 256 (``fxprune.app.digits.accuracy``), so one selection serves 256
  images. The row also records ``accuracy_per_image`` (batch 1: a selection per image) and the
  fine-tuned model before TCS (``accuracy_before_tcs``, ``macs_ratio_before_tcs``).

``--epochs-scale F`` multiplies the ablation's schedule (dense 100, search / refine /
fine-tune 30 epochs; each at least 1); ``--dense-epochs`` and ``--epochs`` set them directly.
With very few epochs the AMAP search cannot move its indicators across tau at the default
indicator lr (see the ablation's ``--quick``): pass ``--indicator-lr 0.1`` there. One search
epoch (22 steps) lands anywhere from 0.15 to 0.59 of the MACs; three land within about 0.03.

Time: the default 3-seed run took 673 s wall (382 s CPU, one thread) on the 2-core dev VM
while other jobs shared it (benchmarks/RESULTS.md); a seed is about 2 minutes of CPU.

Usage::

    python benchmarks/digits_toast.py --out benchmarks/results/digits_toast.json     # 3 seeds
    python benchmarks/digits_toast.py --out /tmp/t.json --seeds 1 --dense-epochs 2 \\
        --epochs 3 --indicator-lr 0.1                                               # smoke

Rows: ``{"variant", "seed", "macs_ratio", "accuracy", ...}`` (``dense`` included; accuracy in
[0, 1] on the 450 test images; extra keys: ``seconds``, ``macs_from``, ``kept_per_head``,
``reweight_macs_ratio`` (amap), ``summary`` (ToaSt: kept dims and widths per site / MLP), and
for ``toast+tcs`` ``prune_macs_ratio``, ``ratio_search``, ``macs_ratio_before_tcs``,
``accuracy_before_tcs``, ``accuracy_per_image``, ``tcs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # a plain checkout; digits_ablation beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

import digits_ablation as abl  # noqa: E402

import fxprune  # noqa: E402
from fxprune.amap.search import evaluate  # noqa: E402
from fxprune.app.digits import accuracy, batches, load_digits_split  # noqa: E402
from fxprune.passes.token_channel_selection import TokenChannelSelection  # noqa: E402

VARIANTS = ["amap", "toast", "toast-whole-heads", "toast+tcs"]
DENSE_EPOCHS, EPOCHS = 100, 30            # digits_ablation.py's defaults
TOAST = dict(criterion="toast", align=1, dense_sites=(0,), match_qk_v=False)


def toast_prune(dense, x1, macs_ratio: float, seed: int, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxprune.prune(dense, x1, macs_ratio=macs_ratio, seed=seed, **TOAST, **options)


def apply_tcs(model, x1, keep_ratio: float, sample: int, seed: int):
    """The Token Channel Selection pass on a (pruned) model: a new GraphModule."""
    gm = fxprune.trace(model, x1)
    fxprune.analyze(gm)
    result = TokenChannelSelection(keep_ratio=keep_ratio, sample=sample, seed=seed)(gm)
    if not result.info["rewritten"]:
        raise RuntimeError(f"TCS rewrote no MLP: {result.info['refused']}")
    return result.graph_module


def tcs_prune_ratio(dense, x1, target: float, dense_macs: int, keep_ratio: float,
                    sample: int, seed: int, tol: float = 0.002, max_evals: int = 16):
    """The ToaSt pruning ratio ``r`` for which the model WITH TCS lands at ``target``:
    false position on ``r`` in [target, 1] (the Illinois variant; the final MACs rise with
    ``r`` in small steps, one MLP unit or head channel at a time, so the closest evaluation is
    kept when ``tol`` cannot be met). Returns (r, evaluations)."""
    evals = []

    def final_ratio(r):
        pruned = toast_prune(dense, x1, r, seed)
        f = fxprune.count_macs(apply_tcs(pruned, x1, keep_ratio, sample, seed), x1) / dense_macs
        evals.append({"prune_macs_ratio": r, "macs_ratio": f})
        return f

    lo, hi = target, 1.0
    g_lo, g_hi = final_ratio(lo) - target, final_ratio(hi) - target
    if g_hi <= 0:  # TCS alone reaches the target
        return hi, evals
    best = min(evals, key=lambda e: abs(e["macs_ratio"] - target))
    side = 0
    while len(evals) < max_evals and abs(best["macs_ratio"] - target) > tol \
            and hi - lo > 1e-4:
        r = lo - g_lo * (hi - lo) / (g_hi - g_lo) if g_hi > g_lo else (lo + hi) / 2
        g = final_ratio(r) - target
        best = min(best, evals[-1], key=lambda e: abs(e["macs_ratio"] - target))
        if g < 0:
            lo, g_lo = r, g
            if side == -1:
                g_hi /= 2
            side = -1
        else:
            hi, g_hi = r, g
            if side == 1:
                g_lo /= 2
            side = 1
    return best["prune_macs_ratio"], evals


def run_seed(data, seed: int, args, log) -> list[dict]:
    rows = []
    x1 = data.x_train[:1]
    t0 = time.perf_counter()
    dense = abl.train_dense(data, seed, args.dense_epochs)
    dense_macs = fxprune.count_macs(dense, x1)
    rows.append({"variant": "dense", "seed": seed, "macs_ratio": 1.0,
                 "accuracy": accuracy(dense, data), "seconds": time.perf_counter() - t0,
                 "macs_from": "count_macs"})
    log(rows[-1])

    def row(variant, model, t_start, **extra):
        r = {"variant": variant, "seed": seed, "accuracy": accuracy(model, data),
             "macs_ratio": fxprune.count_macs(model, x1) / dense_macs,
             "macs_from": "count_macs"}
        r.update(extra)
        r["seconds"] = time.perf_counter() - t_start
        rows.append(r)
        log(r)

    # AMAP, as in the ablation
    t = time.perf_counter()
    res = abl.amap_search(dense, data, x1, seed, abl.search_config(args, seed))
    log(f"  search amap: {time.perf_counter() - t:.1f} s, masked macs_ratio "
        f"{res.macs_ratio:.3f}")
    model = abl.amap_refine(res, data, seed, args.epochs, reweight=True)
    row("amap", model, t, kept_per_head=abl.kept_per_head(res),
        reweight_macs_ratio=abl.reweight_macs(model) / dense_macs)

    # ToaSt one-shot (channels inside heads, whole heads), fine-tuned
    for variant, options in (("toast", {}), ("toast-whole-heads", {"heads": "whole"})):
        t = time.perf_counter()
        pruned = toast_prune(dense, x1, args.macs_ratio, seed, **options)
        abl.oneshot_finetune(pruned, data, seed, args.epochs)
        row(variant, pruned, t, summary=pruned.meta["fxprune.summary"])

    # ToaSt + TCS: prune to r, fine-tune, then TCS; r puts the final model at the target
    t = time.perf_counter()
    r, evals = tcs_prune_ratio(dense, x1, args.macs_ratio, dense_macs, args.tcs_keep,
                               args.tcs_sample, seed)
    log(f"  toast+tcs: prune to {r:.4f} ({len(evals)} evaluations), then TCS keep "
        f"{args.tcs_keep}, sample {args.tcs_sample}")
    pruned = toast_prune(dense, x1, r, seed)
    abl.oneshot_finetune(pruned, data, seed, args.epochs)
    before = {"macs_ratio_before_tcs": fxprune.count_macs(pruned, x1) / dense_macs,
              "accuracy_before_tcs": accuracy(pruned, data)}
    tcs = apply_tcs(pruned, x1, args.tcs_keep, args.tcs_sample, seed)
    per_image = evaluate(tcs, batches(data.x_test, data.y_test, 1, shuffle=False))
    tcs = apply_tcs(pruned, x1, args.tcs_keep, args.tcs_sample, seed)  # fresh sampler state
    row("toast+tcs", tcs, t, prune_macs_ratio=r, ratio_search=evals, **before,
        accuracy_per_image=per_image, summary=pruned.meta["fxprune.summary"],
        tcs={"keep_ratio": args.tcs_keep, "sample": args.tcs_sample, "seed": seed,
             "eval_batch": 256})
    return rows


def summarize(rows: list[dict]) -> str:
    """Markdown tables: per variant the mean MACs ratio, top-1 mean ± std over seeds and the
    paired difference to ``amap`` of the same seed (same dense model); then per seed."""
    acc = {(r["variant"], r["seed"]): 100 * r["accuracy"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| variant | MACs ratio | top-1 (%) mean ± std | vs amap, paired (pp) | seeds |",
             "|---|---|---|---|---|"]
    for v in ["dense"] + VARIANTS:
        sel = [r for r in rows if r["variant"] == v]
        if not sel:
            continue
        a = [100 * r["accuracy"] for r in sel]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        diffs = [acc[(v, r["seed"])] - acc[("amap", r["seed"])] for r in sel
                 if ("amap", r["seed"]) in acc]
        paired = "-" if v == "amap" else abl._mean_std(diffs)
        mr = statistics.mean(r["macs_ratio"] for r in sel)
        lines.append(f"| {v} | {mr:.3f} | {statistics.mean(a):.2f} ± {sd:.2f} | {paired} | "
                     f"{len(sel)} |")
    lines += ["", "Per seed, top-1 % (MACs ratio):", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    by = {(r["variant"], r["seed"]): r for r in rows}
    for v in ["dense"] + VARIANTS:
        if not any((v, s) in by for s in seeds):
            continue
        cells = [f"{100 * by[(v, s)]['accuracy']:.2f} ({by[(v, s)]['macs_ratio']:.3f})"
                 if (v, s) in by else "-" for s in seeds]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    tcs = [r for r in rows if r["variant"] == "toast+tcs"]
    if tcs:
        lines += ["", "toast+tcs: " + "; ".join(
            f"seed {r['seed']}: pruned to {r['prune_macs_ratio']:.3f}, before TCS "
            f"{100 * r['accuracy_before_tcs']:.2f} ({r['macs_ratio_before_tcs']:.3f}), with TCS "
            f"per image {100 * r['accuracy_per_image']:.2f}" for r in tcs)]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiplies the ablation's schedule (dense 100, others 30 epochs)")
    p.add_argument("--dense-epochs", type=int, default=None,
                   help="dense epochs (overrides the scale; for smoke tests)")
    p.add_argument("--epochs", type=int, default=None,
                   help="search / refine / fine-tune epochs (overrides the scale)")
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: see digits_ablation.py)")
    p.add_argument("--indicator-lr", type=float, default=None,
                   help="AMAP search indicator lr (default: SearchConfig's)")
    p.add_argument("--tcs-keep", type=float, default=0.5, help="TCS keep_ratio")
    p.add_argument("--tcs-sample", type=int, default=4, help="TCS sampled patch tokens")
    args = p.parse_args(argv)
    args.dense_epochs = args.dense_epochs or max(1, round(DENSE_EPOCHS * args.epochs_scale))
    args.epochs = args.epochs or max(1, round(EPOCHS * args.epochs_scale))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    data = load_digits_split()

    def log(item):
        if isinstance(item, dict):
            item = (f"  {item['variant']:<18} seed {item['seed']}  acc {item['accuracy']:.4f}  "
                    f"macs {item['macs_ratio']:.3f}  ({item['seconds']:.1f} s)")
        print(item, flush=True)

    print(f"digits ToaSt vs AMAP: {args.seeds} seed(s), dense {args.dense_epochs} ep, "
          f"search/refine/fine-tune {args.epochs} ep, macs_ratio {args.macs_ratio}, TCS keep "
          f"{args.tcs_keep} sample {args.tcs_sample}, {torch.get_num_threads()} threads",
          flush=True)
    return abl.run_all_seeds(data, args, run_seed, summarize, log)


if __name__ == "__main__":
    main()
