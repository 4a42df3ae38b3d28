"""AMAP on a tiny FLatten-Swin on scikit-learn's digits, with and without the linear-attention
indicator initialization (the paper's Table 3b, on a problem this machine trains in minutes).

The set-up is the AMAP ablation's (``benchmarks/digits_ablation.py``, whose functions this
script imports: data split, dense training, AMAP search and refine, one-shot fine-tuning), with
the model swapped for FLatten-Swin. For every seed one dense model is trained from scratch and
every variant is pruned from that same model to ``macs_ratio`` 0.5 of its MACs
(``fxprune.count_macs``, batch 1) and retrained:

``amap``          AMAP search (``SearchConfig`` defaults, ``linear_init=True``: the q/k
                  indicators of the linear-attention sites start from eq. 5-6), then refine
                  with reweight modules (the ablation's ``amap``)
``amap-no-init``  the same search with ``linear_init=False`` (every indicator starts at zero),
                  everything else equal (same seed, data order, refine): the paper's dagger
``l1-oneshot``    ``fxprune.prune(dense, x, macs_ratio=0.5, criterion="l1", align=1)``, then
                  fine-tuned for the refine's epochs with the refine's optimizer

Model (chosen before any pruning run, on dense accuracy and time only):
``flatten_swin_nano(img_size=8, in_chans=1, patch_size=1)``, the library's tiny configuration
unchanged: embed 16, one block per stage, heads 2-2-4-4, window 4; stages 1-2 are focused
linear attention over the whole 8x8 and 4x4 maps (head dims 8 and 16), stages 3-4 window
attention on 2x2 and 1x1 maps. 312 k parameters, 0.96 M MACs per image (``count_macs``; the
ablation's ``digits_vit``: 136 k, 2.38 M). Trained for the ablation's 100 dense epochs it
reached 98.4% on seeds 0 and 1 (the ViT: 94.8% mean) in 58 s of CPU per seed with one thread
(the ViT: 48 s); a width-24 variant (``embed_dim=24``, 2.1 M MACs, near the ViT's) took 43%
more CPU time (83 s) and was not more accurate (98.0 and 98.2%).

Schedule: the ablation's defaults (dense 100 epochs, search 30, refine and one-shot fine-tune
30, batch 64, ``SearchConfig`` defaults); nothing was tuned on the results. As there, AMAP
variants see search + refine epochs (60) after the dense model, ``l1-oneshot`` 30.

Linear-attention channels: per variant and linear site, the q/k and v channels kept (summed
over heads) and their sum over the linear sites, because the paper's point (Fig. 5b) is that
without the initialization the search removes linear attention's q/k channels severely. They
are counted on the structure that was pruned (AMAP: the search's keep masks over its analysis;
``l1-oneshot``: ``fxprune.prune``'s summary), not by re-analysing the final model: a sliced
linear site left with one q/k channel per head is no longer recognised as attention. Rows also
carry every site's and MLP's kept counts (``structure``), and, for AMAP, ``kept_per_head`` of
the search masks and the search's ``linear_init`` report (which groups eq. 5-6 scored).

Time: the default 3-seed run took 445 s wall (413 s CPU, one thread) on the 2-core dev VM: per
seed dense 52-59 s, each AMAP search 21-31 s plus 13-23 s of refine and evaluation, the L1
prune and fine-tune 13-18 s (benchmarks/RESULTS.md).

Usage::

    python benchmarks/digits_flatten.py --out benchmarks/results/digits_flatten.json   # 3 seeds
    python benchmarks/digits_flatten.py --out /tmp/f.json --seeds 1 --dense-epochs 2 \\
        --epochs 3 --indicator-lr 0.1                                                 # smoke

(With very few epochs the search cannot move its indicators across tau at the default
indicator lr; see the ablation's ``--quick``.)

Rows: ``{"variant", "seed", "macs_ratio", "accuracy", ...}`` (``dense`` included; accuracy in
[0, 1] on the 450 test images; extra keys: ``seconds``, ``macs_from``, ``linear_kept`` (per
linear site ``qk``/``v`` kept and of how many, and the sums ``qk_total``, ``v_total``,
``qk_total_of``, ``v_total_of``), ``structure`` (every site's kind, heads, ``qk``/``v`` kept
and of how many; every MLP's ``kept``/``of``), for AMAP rows ``kept_per_head``,
``search_macs_ratio``, ``linear_init`` and ``reweight_macs_ratio``).
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
from fxprune.app.digits import accuracy, load_digits_split  # noqa: E402

VARIANTS = ["amap", "amap-no-init", "l1-oneshot"]
DENSE_EPOCHS, EPOCHS = 100, 30            # digits_ablation.py's defaults
# the paper's Table 3b, AMAP-T (FLatten-Swin-T pruned to 1.3 GFLOPs, ImageNet-1K top-1)
PAPER = {"amap": 76.53, "amap-no-init": 71.04}


def flatten_digits():
    """The benchmark's model: the library's tiny FLatten-Swin for 8x8 grey digits."""
    from fxprune.models.flatten import flatten_swin_nano

    return flatten_swin_nano(img_size=8, in_chans=1, patch_size=1, num_classes=10)


def structure(analysis, masks: dict | None = None) -> dict:
    """Channels kept per attention site (q/k and v, summed over heads) and per MLP, from an
    analysis and keep masks over its groups (a group without a mask keeps everything).

    Counted on the analysis of the model that was searched, not on the refined model: a sliced
    site with one q/k channel per head is no longer recognised as attention by the analysis."""
    masks = masks or {}

    def kept(gi):
        layout = analysis.groups[gi].layout
        return int(masks[gi].sum()) if gi in masks else int(layout.size), int(layout.size)

    sites = []
    for s in analysis.attention:
        (qk, qk_of), (v, v_of) = kept(s.qk_group), kept(s.v_group)
        sites.append({"site": s.index, "kind": s.kind, "heads": s.num_heads, "qk": qk,
                      "qk_of": qk_of, "v": v, "v_of": v_of})
    mlp = [dict(zip(("kept", "of"), kept(g.index))) for g in analysis.groups
           if g.kind == "mlp"]
    return {"sites": sites, "mlp": mlp}


def structure_from_summary(summary: list[dict]) -> dict:
    """:func:`structure` of a ``fxprune.prune`` result, from its ``fxprune.summary``."""
    sites = [{"site": r["site"], "kind": r["kind"], "heads": r["heads"],
              "qk": r["heads_after"] * r["qk_dim_after"], "qk_of": r["heads"] * r["qk_dim"],
              "v": r["heads_after"] * r["v_dim_after"], "v_of": r["heads"] * r["v_dim"]}
             for r in summary if "site" in r]
    mlp = [{"kept": r["width_after"], "of": r["width"]} for r in summary
           if r.get("kind") == "mlp"]
    return {"sites": sites, "mlp": mlp}


def linear_kept(st: dict) -> dict:
    """Per linear-attention site the q/k and v channels kept (all heads), and the sums."""
    sites = [{k: s[k] for k in ("site", "qk", "qk_of", "v", "v_of")}
             for s in st["sites"] if s["kind"] == "linear"]
    return {"sites": sites, **{f"{k}_total": sum(s[k] for s in sites) for k in ("qk", "v")},
            **{f"{k}_total_of": sum(s[f"{k}_of"] for s in sites) for k in ("qk", "v")}}


def run_seed(data, seed: int, args, log) -> list[dict]:
    rows = []
    x1 = data.x_train[:1]
    t0 = time.perf_counter()
    log(f"  dense: training {args.dense_epochs} epochs ...")
    dense = abl.train_dense(data, seed, args.dense_epochs, factory=flatten_digits)
    dense_macs = fxprune.count_macs(dense, x1)

    def row(variant, model, t_start, st, **extra):
        r = {"variant": variant, "seed": seed, "accuracy": accuracy(model, data),
             "macs_ratio": fxprune.count_macs(model, x1) / dense_macs,
             "macs_from": "count_macs", "linear_kept": linear_kept(st), "structure": st}
        r.update(extra)
        r["seconds"] = time.perf_counter() - t_start
        rows.append(r)
        log(r)

    row("dense", dense, t0, structure(fxprune.analyze(fxprune.trace(dense, x1))),
        dense_macs=dense_macs)

    cfg = abl.search_config(args, seed)
    for variant, linear_init in (("amap", True), ("amap-no-init", False)):
        t = time.perf_counter()
        log(f"  {variant}: search {args.epochs} epochs (linear_init={linear_init}) ...")
        res = abl.amap_search(dense, data, x1, seed, cfg, linear_init=linear_init)
        log(f"  {variant}: search {time.perf_counter() - t:.1f} s, masked macs_ratio "
            f"{res.macs_ratio:.3f}; refine {args.epochs} epochs ...")
        model = abl.amap_refine(res, data, seed, args.epochs, reweight=True)
        row(variant, model, t, structure(res.analysis, res.masks),
            kept_per_head=abl.kept_per_head(res), search_macs_ratio=res.macs_ratio,
            linear_init={str(g): why for g, why in sorted(res.linear_init.items())},
            reweight_macs_ratio=abl.reweight_macs(model) / dense_macs)

    t = time.perf_counter()
    log(f"  l1-oneshot: prune, fine-tune {args.epochs} epochs ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned = fxprune.prune(dense, x1, macs_ratio=args.macs_ratio, criterion="l1", align=1,
                               seed=seed)
    abl.oneshot_finetune(pruned, data, seed, args.epochs)
    row("l1-oneshot", pruned, t, structure_from_summary(pruned.meta["fxprune.summary"]))
    return rows


def _kept(r: dict) -> str:
    k = r["linear_kept"]
    return f"{k['qk_total']}/{k['qk_total_of']} · {k['v_total']}/{k['v_total_of']}"


def summarize(rows: list[dict]) -> str:
    """Markdown tables: per variant the mean MACs ratio, top-1 mean ± std over seeds, the
    paired difference to ``amap`` of the same seed (same dense model) and the linear-attention
    channels kept; then per seed."""
    acc = {(r["variant"], r["seed"]): 100 * r["accuracy"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| variant | MACs ratio | top-1 (%) mean ± std | vs amap, paired (pp) | seeds "
             "| linear q/k kept (sum of sites, mean) | linear v kept | MLP widths kept "
             "| paper Table 3b (AMAP-T) |", "|---|---|---|---|---|---|---|---|---|"]
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
        lk = [r["linear_kept"] for r in sel]
        qk = statistics.mean(k["qk_total"] for k in lk)
        vv = statistics.mean(k["v_total"] for k in lk)
        mlp = statistics.mean(sum(m["kept"] for m in r["structure"]["mlp"])
                              / sum(m["of"] for m in r["structure"]["mlp"]) for r in sel)
        paper = f"{PAPER[v]:.2f}" if v in PAPER else "-"
        lines.append(f"| {v} | {mr:.3f} | {statistics.mean(a):.2f} ± {sd:.2f} | {paired} | "
                     f"{len(sel)} | {qk:.1f} / {lk[0]['qk_total_of']} | {vv:.1f} / "
                     f"{lk[0]['v_total_of']} | {mlp:.0%} | {paper} |")
    by = {(r["variant"], r["seed"]): r for r in rows}
    lines += ["", "Per seed, top-1 % (MACs ratio) [linear q/k kept · v kept, summed over the "
              "linear sites]:", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for v in ["dense"] + VARIANTS:
        if not any((v, s) in by for s in seeds):
            continue
        cells = [f"{100 * by[(v, s)]['accuracy']:.2f} ({by[(v, s)]['macs_ratio']:.3f}) "
                 f"[{_kept(by[(v, s)])}]" if (v, s) in by else "-" for s in seeds]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Per linear site, q/k · v channels kept (seed " + ", ".join(map(str, seeds))
              + "):", ""]
    for v in VARIANTS:
        parts = []
        for s in seeds:
            if (v, s) in by:
                parts.append(", ".join(f"site {k['site']} {k['qk']}/{k['qk_of']} · "
                                       f"{k['v']}/{k['v_of']}"
                                       for k in by[(v, s)]["linear_kept"]["sites"]))
        if parts:
            lines.append(f"- {v}: " + "; ".join(parts))
    lines += ["", "Window sites q/k · v kept, MLPs kept (sums over sites / MLPs; seed "
              + ", ".join(map(str, seeds)) + "):", ""]
    for v in VARIANTS:
        parts = []
        for s in seeds:
            if (v, s) in by:
                st = by[(v, s)]["structure"]
                win = [x for x in st["sites"] if x["kind"] != "linear"]
                parts.append(f"{sum(x['qk'] for x in win)}/{sum(x['qk_of'] for x in win)} · "
                             f"{sum(x['v'] for x in win)}/{sum(x['v_of'] for x in win)}, MLP "
                             f"{sum(m['kept'] for m in st['mlp'])}/"
                             f"{sum(m['of'] for m in st['mlp'])}")
        if parts:
            lines.append(f"- {v}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-epochs", type=int, default=DENSE_EPOCHS)
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help="search, refine and one-shot fine-tune epochs (each)")
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: see digits_ablation.py)")
    p.add_argument("--indicator-lr", type=float, default=None,
                   help="AMAP search indicator lr (default: SearchConfig's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    data = load_digits_split()

    def log(item):
        if isinstance(item, dict):
            item = (f"  {item['variant']:<13} seed {item['seed']}  acc {item['accuracy']:.4f}  "
                    f"macs {item['macs_ratio']:.3f}  linear q/k·v kept {_kept(item)}  "
                    f"({item['seconds']:.1f} s)")
        print(item, flush=True)

    print(f"digits FLatten-Swin (AMAP linear init): {args.seeds} seed(s), dense "
          f"{args.dense_epochs} ep, search/refine/fine-tune {args.epochs} ep, macs_ratio "
          f"{args.macs_ratio}, {torch.get_num_threads()} threads", flush=True)
    return abl.run_all_seeds(data, args, run_seed, summarize, log)


if __name__ == "__main__":
    main()
