"""AMAP search + refine against one-shot pruning + fine-tuning, and AMAP's ablation switches,
at the MACs ratios where one-shot pruning breaks (0.3 and 0.2 of the dense MACs), on
scikit-learn's digits, with equal training budgets and many seeds.

At 0.5 (``digits_ablation.py``, ``digits_toast.py``, ``digits_flatten.py``) every variant lands
within the ~1 pp noise floor of the 450 test images after retraining. This script prunes
further, where ``criteria_retention.py`` shows one-shot pruning losing most of the dense
model's function, and pairs every comparison by seed (the same dense model).

Models and dense training: ``digits_models.py`` (``vit``: ``digits_vit``; ``flatten``:
FLatten-Swin nano; 100 epochs as in the other digits benchmarks, cached per seed under
``runs/digits_models/``). Per model, seed and ratio ``r``, every variant starts from the same
dense model:

``amap``                search (similarity weight, head sync; on FLatten the linear-attention
                        init, eq. 5-6) then refine with reweight modules
``amap-no-reweight``    the same search result, refined without reweight modules
``amap-no-similarity``  search with ``similarity=False``, refine with reweight
``amap-no-sync``        search with ``sync=False``; heads keep different counts, so it cannot be
                        sliced: refined masked (fixed binary gates), evaluated masked
``amap-no-init``        (FLatten only) search with ``linear_init=False``, refine with reweight
``oneshot-<c>``         ``fxprune.prune(dense, x, r, criterion=c, align=1)``, then fine-tuned

Training budget, equal for every variant: ``search_epochs + refine_epochs`` epochs of weight
updates after the dense model (default 8 + 8 = 16 epochs of 22 steps of 64 images). AMAP
variants train weights and indicators together for ``search_epochs`` (``SearchConfig``
defaults: AdamW 5e-4 -> 5e-6, wd 1e-6, indicator lr 2e-2, MACs weight 5, tau 0.5), then refine
for ``refine_epochs`` (same optimizer); one-shot variants are fine-tuned for
``search_epochs + refine_epochs`` epochs with the refine's optimizer and schedule
(``digits_ablation.finetune``). The other digits benchmarks give AMAP 60 epochs and one-shot
30; here the one-shot baseline gets the same number of steps as AMAP.

MACs: ``fxprune.count_macs`` of the final model over the dense model's (reweight modules
included). For ``amap-no-sync`` (masked only) two figures: ``macs_ratio`` is the search's MACs
model of the masks, ``deployable_macs_ratio`` is ``count_macs`` of the smallest model that can
actually be sliced from its masks (every head widened to the count of its fullest head,
``digits_ablation.padded_to_max``). Every other row's ``deployable_macs_ratio`` equals its
``macs_ratio``.

Metrics: ``acc_test`` (top-1 on the 450 test images), ``nll_test`` (mean cross-entropy on them,
a continuous metric), and ``kl`` (``KL(p_dense || p_model)`` averaged over all 1,797 images, as
in ``criteria_retention.py``: how far the retrained model moved from the dense one). Summaries:
mean ± 95% CI over seeds, and every variant's paired difference to ``amap`` (same seed, same
dense model) with its 95% CI; ``*`` marks an interval that excludes 0.

Usage::

    python benchmarks/digits_models.py --seeds 5                      # fill the cache
    python benchmarks/amap_low_ratio.py --models vit --out /tmp/v.json  # one model
    python benchmarks/amap_low_ratio.py --summarize /tmp/v.json /tmp/f.json  # tables only

Time (benchmarks/RESULTS.md): with the defaults (5 seeds, 8 + 8 epochs) 331 s of CPU for the
ViT and 428 s for FLatten; run as two processes side by side on the shared 2-core machine
(load average 7 to 12) they took 38 and 40 minutes of wall.

``--search-epochs`` / ``--refine-epochs`` set the budget (one-shot fine-tune: their sum).
Rows: ``{"model", "seed", "ratio", "variant", "macs_ratio", "deployable_macs_ratio",
"acc_test", "nll_test", "kl", "seconds", ...}`` (AMAP rows add ``search_macs_ratio``,
``kept_per_head``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # a plain checkout; the other benchmarks beside this
    if _p not in sys.path:
        sys.path.insert(0, _p)

import criteria_retention as cr  # noqa: E402
import digits_ablation as abl  # noqa: E402
import digits_models  # noqa: E402

import fxprune  # noqa: E402
from fxprune.amap.search import SearchConfig  # noqa: E402
from fxprune.app.digits import load_digits_split  # noqa: E402
from fxprune.passes.slice import Slice  # noqa: E402

RATIOS = (0.3, 0.2)
MODELS = ("vit", "flatten")
# search overrides per AMAP search; amap-no-reweight reuses the amap search
SEARCHES = {"amap": {}, "amap-no-similarity": {"similarity": False},
            "amap-no-sync": {"sync": False}, "amap-no-init": {"linear_init": False}}


def variants(kind: str, oneshot: tuple[str, ...]) -> list[str]:
    """The variant names run on ``kind`` (``amap-no-init`` only where there is linear
    attention to initialise: FLatten)."""
    names = ["amap", "amap-no-reweight", "amap-no-similarity", "amap-no-sync"]
    if kind == "flatten":
        names.append("amap-no-init")
    return names + [f"oneshot-{c}" for c in oneshot]


@torch.no_grad()
def metrics(model, data, dense_logp) -> dict:
    """Test top-1 and cross-entropy, and KL from the dense model over all 1,797 images."""
    x, y, n_train = cr.all_images(data)
    model.eval()
    logits = model(x).float()
    out = cr.fidelity(model, x, y, n_train, dense_logp)
    out["nll_test"] = float(F.cross_entropy(logits[n_train:], y[n_train:]))
    return {k: out[k] for k in ("acc_test", "nll_test", "kl", "agree")}


def run_ratio(kind, seed, ratio, dense, data, args, log) -> list[dict]:
    """Every variant of ``kind`` at ``ratio`` from the seed's ``dense`` model."""
    x_all, _, _ = cr.all_images(data)
    x1 = data.x_train[:1]
    with torch.no_grad():
        dense_logp = F.log_softmax(dense(x_all).float(), dim=-1)
    dense_macs = fxprune.count_macs(dense, x1)
    names = variants(kind, tuple(args.oneshot))
    rows = []

    def row(variant, model, t0, macs_ratio=None, deployable=None, **extra):
        measured = fxprune.count_macs(model, x1) / dense_macs if macs_ratio is None else None
        r = {"model": kind, "seed": seed, "ratio": ratio, "variant": variant,
             "macs_ratio": measured if macs_ratio is None else float(macs_ratio),
             "deployable_macs_ratio": measured if deployable is None else float(deployable),
             **metrics(model, data, dense_logp), **extra,
             "seconds": time.perf_counter() - t0}
        rows.append(r)
        log(f"  {kind} seed {seed} r {ratio}: {variant:<19} acc {r['acc_test']:.4f}  nll "
            f"{r['nll_test']:.3f}  macs {r['macs_ratio']:.3f} (deployable "
            f"{r['deployable_macs_ratio']:.3f})  {r['seconds']:.0f} s")

    cfg = SearchConfig(macs_ratio=ratio, epochs=args.search_epochs, seed=seed, progress=False)
    if args.indicator_lr:
        cfg = dataclasses.replace(cfg, indicator_lr=args.indicator_lr)
    for search_name, overrides in SEARCHES.items():
        if search_name not in names:
            continue
        t = time.perf_counter()
        res = abl.amap_search(dense, data, x1, seed, cfg, **overrides)
        t_search = time.perf_counter() - t
        refines = [("amap", True), ("amap-no-reweight", False)] if search_name == "amap" \
            else [(search_name, True)]
        for variant, reweight in refines:
            if variant not in names:
                continue
            t0 = time.perf_counter() - t_search  # every variant is charged its search
            model = abl.amap_refine(res, data, seed, args.refine_epochs, reweight=reweight)
            extra = {"search_macs_ratio": res.macs_ratio, "kept_per_head": abl.kept_per_head(res)}
            if model.meta.get("fxprune.sliced", True):
                row(variant, model, t0, **extra)
            else:  # masked only: what its masks cost once made sliceable
                deployable = Slice(keep=abl.padded_to_max(res.masks))(res.graph_module)
                row(variant, model, t0, macs_ratio=res.macs_ratio,
                    deployable=fxprune.count_macs(deployable.graph_module, x1) / dense_macs,
                    **extra)
    for criterion in args.oneshot:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruned = fxprune.prune(dense, x1, macs_ratio=ratio, criterion=criterion, align=1,
                                   seed=seed)
        before = metrics(pruned, data, dense_logp)
        abl.oneshot_finetune(pruned, data, seed, args.search_epochs + args.refine_epochs)
        row(f"oneshot-{criterion}", pruned, t0,
            **{f"{k}_before_finetune": v for k, v in before.items()})
    return rows


def run_model_seed(kind, seed, data, args, log) -> list[dict]:
    dense = digits_models.dense_model(kind, seed, data, args.dense_epochs,
                                      cache=None if args.no_cache else args.cache, log=log)
    x_all, _, _ = cr.all_images(data)
    with torch.no_grad():
        dense_logp = F.log_softmax(dense(x_all).float(), dim=-1)
    rows = [{"model": kind, "seed": seed, "ratio": 1.0, "variant": "dense", "macs_ratio": 1.0,
             "deployable_macs_ratio": 1.0, **metrics(dense, data, dense_logp), "seconds": 0.0}]
    for ratio in args.ratios:
        rows += run_ratio(kind, seed, ratio, dense, data, args, log)
    return rows


def summarize(rows: list[dict]) -> str:
    """Per model and ratio: each variant's MACs, test top-1 and test NLL (mean ± 95% CI over
    seeds) and the paired difference to ``amap`` (``*``: the interval excludes 0)."""
    out = []
    for kind in [m for m in MODELS if any(r["model"] == m for r in rows)]:
        rs = [r for r in rows if r["model"] == kind]
        seeds = sorted({r["seed"] for r in rs})
        dense = [r["acc_test"] for r in rs if r["variant"] == "dense"]
        out += [f"### {kind}: {len(seeds)} seeds, dense test top-1 {cr._fmt(dense, 100)} %", ""]
        for ratio in sorted({r["ratio"] for r in rs if r["variant"] != "dense"}, reverse=True):
            sel = [r for r in rs if r["ratio"] == ratio]
            names = list(dict.fromkeys(r["variant"] for r in sel))
            out += [f"MACs ratio {ratio}:", "",
                    "| variant | MACs (deployable) | top-1 (%) | vs amap (pp) | test NLL "
                    "| vs amap NLL | KL from dense |", "|---|---|---:|---:|---:|---:|---:|"]
            for v in names:
                vr = [r for r in sel if r["variant"] == v]
                macs = statistics.mean(r["macs_ratio"] for r in vr)
                dep = statistics.mean(r["deployable_macs_ratio"] for r in vr)
                cells = [f"{macs:.3f} ({dep:.3f})", cr._fmt([r["acc_test"] for r in vr], 100)]
                for metric, scale, digits in (("acc_test", 100.0, 2), ("nll_test", 1.0, 3)):
                    if v == "amap":
                        cells.append("-")
                    else:
                        d = cr.paired(sel, {"variant": v}, {"variant": "amap"}, metric)
                        m, h = cr.mean_ci([scale * x for x in d])
                        star = "*" if len(d) > 1 and (m - h > 0 or m + h < 0) else ""
                        cells.append(f"{m:+.{digits}f} ± {h:.{digits}f}{star}")
                    if metric == "acc_test":
                        cells.append(cr._fmt([r["nll_test"] for r in vr], 1.0, 3))
                cells.append(cr._fmt([r["kl"] for r in vr], 1.0, 3))
                out.append(f"| {v} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "amap_low_ratio.json"))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--search-epochs", type=int, default=8)
    p.add_argument("--refine-epochs", type=int, default=8)
    p.add_argument("--oneshot", nargs="+", default=["similarity"], choices=cr.CRITERIA,
                   help="one-shot criteria fine-tuned with the same budget")
    p.add_argument("--dense-epochs", type=int, default=digits_models.DENSE_EPOCHS)
    p.add_argument("--cache", default=str(digits_models.CACHE))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--indicator-lr", type=float, default=None,
                   help="search indicator lr (default: SearchConfig's, 2e-2)")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on the first N training images only, dense models trained "
                        "afresh and not cached (smoke tests)")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="only print the tables of these result files (rows concatenated)")
    args = p.parse_args(argv)
    if args.summarize:
        rows = [r for path in args.summarize for r in json.load(open(path))["rows"]]
        print(summarize(rows))
        return rows
    torch.set_num_threads(args.threads)
    # refine() logs float(loss) of a tensor that requires grad (harmless)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    data = load_digits_split()
    if args.train_images:
        data = dataclasses.replace(data, x_train=data.x_train[:args.train_images],
                                   y_train=data.y_train[:args.train_images])
        args.no_cache = True
    print(f"AMAP at low ratios: models {args.models}, seeds {args.first_seed}.."
          f"{args.first_seed + args.seeds - 1}, ratios {args.ratios}, search {args.search_epochs}"
          f" + refine {args.refine_epochs} epochs (one-shot fine-tune "
          f"{args.search_epochs + args.refine_epochs}), {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    start, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    meta = {"threads": args.threads, "load_average_start": load0,
            "search_epochs": args.search_epochs, "refine_epochs": args.refine_epochs,
            "oneshot_finetune_epochs": args.search_epochs + args.refine_epochs,
            "steps_per_epoch": len(abl.EpochLoader(data, 0)),
            "indicator_lr": args.indicator_lr or SearchConfig().indicator_lr,
            "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    try:
        import _env

        meta.update(cpu=_env.cpu_name(), commit=_env.git_revision())
    except ImportError:
        pass
    rows = []
    for kind in args.models:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows += run_model_seed(kind, seed, data, args, lambda s: print(s, flush=True))
            # written after every seed: a run stopped early keeps its finished seeds
            meta.update(wall_s=round(time.perf_counter() - start, 1),
                        cpu_s=round(time.process_time() - cpu0, 1),
                        load_average_end=os.getloadavg()[0])
            write_json(args.out, meta, rows)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print()
    print(summarize(rows))
    print(f"total {elapsed:.0f} s wall, {cpu:.0f} s CPU of this process, load average "
          f"{load0:.1f} at start, {meta['load_average_end']:.1f} at end; rows in {args.out}")
    return rows


if __name__ == "__main__":
    main()
