"""How much of a trained model's function each one-shot criterion keeps, WITHOUT fine-tuning:
retention curves on scikit-learn's digits, over MACs ratios and many seeds.

The digits benchmarks that retrain after pruning (``digits_ablation.py``, ``digits_toast.py``)
cannot tell methods apart: 30 to 60 epochs of retraining bring every variant back to the noise
floor of the 450 test images. Here nothing is retrained, and besides top-1 the script measures a
continuous fidelity metric that does not saturate: the KL divergence of the pruned model's
output distribution from the dense model's, ``KL(p_dense || p_pruned)``, averaged over all
1,797 digits images (train and test: no training happens, the dense model is the reference).

For every model (``vit``: ``digits_vit``; ``flatten``: FLatten-Swin nano, as in
``digits_flatten.py``) and seed, the dense model is trained as in the other digits benchmarks
(100 epochs; cached per seed under ``runs/digits_models/`` by ``digits_models.py``, so a rerun
only does inference), then pruned one-shot by ``fxprune.prune(dense, x, macs_ratio=r,
criterion=c, heads=h, align=1, seed=seed)`` for every criterion ``c`` in similarity, l1, random,
toast, every ``h`` in ``channels`` (channels inside heads) and ``whole`` (whole heads; where a
site cannot lose whole heads, e.g. FLatten's linear sites whose v channels are shared across
heads by the depthwise conv, it is pruned by channels), and every ratio ``r`` in 0.9 ... 0.3.
Every other option is the library default (no dense sites, Q/K and V paired where the graph
calls SDPA); ``align=1`` because head dims of 8 and 16 leave align 8 almost no choice. The MACs
ratio reached (``count_macs``) is recorded: it can miss ``r`` by a few thousandths (ViT) or up
to 0.02 (FLatten at 0.3).

Recorded per row: ``acc_test`` (top-1 on the 450 test images, the other benchmarks' metric),
``acc_all`` (top-1 on all 1,797), ``agree`` (share of the 1,797 images where the pruned model's
top-1 equals the dense model's), ``kl`` (mean over the 1,797 images, nats). Summaries: mean and
95% confidence interval over seeds (Student t); comparisons between criteria are paired by seed
(the same dense model): mean difference and its 95% CI.

Each dense model is traced, prepared and analysed once (``fxprune.Pruner``, whose every
``prune`` call equals the ``fxprune.prune`` call with the same arguments), and the (model,
seed) pairs run in ``--jobs`` worker processes (default: one per core).

Time: inference only once the cache is filled: the default run (2 models x 10 seeds x 7 ratios
x 8 variants = 1,120 prunings) takes about 3.5 min of wall on the 2-core dev VM with
``--jobs 2`` and one thread per process (benchmarks/RESULTS.md has the figure of the recorded
run). Filling the cache trains 20 models, one to two minutes of CPU each.

Usage::

    python benchmarks/digits_models.py --seeds 10                  # fill the cache (~25 min)
    python benchmarks/criteria_retention.py                        # JSON + PNG + tables (~4 min)

Rows: ``{"model", "seed", "criterion", "heads", "target", "macs_ratio", "acc_test", "acc_all",
"agree", "kl", "seconds"}``; the dense model of each seed is a row with ``criterion`` "dense".
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # a plain checkout; the other benchmarks beside this
    if _p not in sys.path:
        sys.path.insert(0, _p)

import digits_models  # noqa: E402

import fxprune  # noqa: E402
from fxprune.app.digits import load_digits_split  # noqa: E402

CRITERIA = ("similarity", "l1", "random", "toast")
HEADS = ("channels", "whole")
RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MODELS = ("vit", "flatten")


def all_images(data) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The 1,797 images (train then test), their labels, and how many are training images."""
    return (torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]),
            len(data.x_train))


@torch.no_grad()
def fidelity(model, x, y, n_train: int, dense_logp: torch.Tensor | None) -> dict:
    """Top-1 on the test part and on all images, agreement with the dense model's top-1 and
    ``KL(p_dense || p_model)`` averaged over the images (0 for the dense model itself).

    Example:
        >>> m = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> r = fidelity(m, x, y, 3, torch.log_softmax(m(x), -1))
        >>> r["kl"] == 0.0 and r["agree"] == 1.0
        True
    """
    model.eval()
    logp = F.log_softmax(model(x).float(), dim=-1)
    pred = logp.argmax(-1)
    out = {"acc_test": float((pred[n_train:] == y[n_train:]).float().mean()),
           "acc_all": float((pred == y).float().mean())}
    if dense_logp is None:
        out.update(agree=1.0, kl=0.0)
    else:
        kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)
        out.update(agree=float((pred == dense_logp.argmax(-1)).float().mean()),
                   kl=max(0.0, float(kl.mean())))  # rounding can give -1e-9 for equal outputs
    return out


def _log(message: str) -> None:
    print(message, flush=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", UserWarning)


def _run_task(task) -> list[dict]:
    """:func:`run_model_seed` in a worker process (``--jobs``), which loads the data itself."""
    kind, seed, args = task
    return run_model_seed(kind, seed, load_digits_split(), args, _log)


def run_model_seed(kind: str, seed: int, data, args, log) -> list[dict]:
    """Every criterion, head mode and ratio on the seed's dense ``kind`` model."""
    x, y, n_train = all_images(data)
    x1 = data.x_train[:1]
    dense = digits_models.dense_model(kind, seed, data, args.dense_epochs,
                                      cache=None if args.no_cache else args.cache, log=log)
    with torch.no_grad():
        dense_logp = F.log_softmax(dense(x).float(), dim=-1)
    dense_macs = fxprune.count_macs(dense, x1)
    rows = [{"model": kind, "seed": seed, "criterion": "dense", "heads": "-", "target": 1.0,
             "macs_ratio": 1.0, **fidelity(dense, x, y, n_train, None), "seconds": 0.0}]
    t = time.perf_counter()
    # traced, prepared and analysed once for every pruning of this dense model: each
    # pruner.prune(...) equals fxprune.prune(dense, x1, ...) (tests/planning/test_pruner.py)
    pruner = fxprune.Pruner(dense, x1)
    built = time.perf_counter() - t
    for criterion in args.criteria:
        for heads in args.heads:
            for ratio in args.ratios:
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    pruned = pruner.prune(macs_ratio=ratio, criterion=criterion, heads=heads,
                                          align=1, seed=seed)
                row = {"model": kind, "seed": seed, "criterion": criterion, "heads": heads,
                       "target": ratio, "macs_ratio": fxprune.count_macs(pruned, x1) / dense_macs,
                       **fidelity(pruned, x, y, n_train, dense_logp)}
                row["seconds"] = time.perf_counter() - t
                rows.append(row)
    log(f"  {kind} seed {seed}: dense acc_test {rows[0]['acc_test']:.4f}, "
        f"{len(rows) - 1} prunings in {sum(r['seconds'] for r in rows):.0f} s (after "
        f"{built:.1f} s of fxprune.Pruner)")
    return rows


# ---- statistics -------------------------------------------------------------------------------

def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value).

    Example:
        >>> m, h = mean_ci([1.0, 2.0, 3.0])
        >>> m, round(h, 3)
        (2.0, 2.484)
    """
    n = len(values)
    m = statistics.mean(values)
    if n < 2:
        return m, 0.0
    from scipy.stats import t

    return m, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def paired(rows: list[dict], a: dict, b: dict, metric: str) -> list[float]:
    """Per seed ``metric`` of the rows matching ``a`` minus that of the rows matching ``b``
    (seeds present in both)."""
    def pick(sel):
        return {r["seed"]: r[metric] for r in rows if all(r[k] == v for k, v in sel.items())}

    pa, pb = pick(a), pick(b)
    return [pa[s] - pb[s] for s in sorted(pa) if s in pb]


def variant_name(criterion: str, heads: str) -> str:
    return criterion if heads == "channels" else f"{criterion}/whole-heads"


def _fmt(values, scale=1.0, digits=2) -> str:
    m, h = mean_ci([scale * v for v in values])
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def summarize(rows: list[dict]) -> str:
    """Markdown tables per model: KL and test top-1 (mean ± 95% CI half-width) per variant and
    ratio; then, per ratio, each variant's paired difference in KL to the variant with the
    lowest mean KL (``*``: the interval excludes 0)."""
    out = []
    for kind in [m for m in MODELS if any(r["model"] == m for r in rows)]:
        rs = [r for r in rows if r["model"] == kind]
        seeds = sorted({r["seed"] for r in rs})
        dense = [r["acc_test"] for r in rs if r["criterion"] == "dense"]
        ratios = sorted({r["target"] for r in rs if r["criterion"] != "dense"}, reverse=True)
        variants = [(c, h) for c in CRITERIA for h in HEADS
                    if any(r["criterion"] == c and r["heads"] == h for r in rs)]
        out += [f"### {kind}: {len(seeds)} seeds, dense test top-1 {_fmt(dense, 100)} %", ""]
        for metric, title, scale, digits in (("kl", "KL(dense || pruned), nats", 1.0, 4),
                                             ("acc_test", "test top-1 (%)", 100.0, 1)):
            out += [f"{title}, mean ± 95% CI over seeds:", "",
                    "| variant | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
                    "|---|" + "---:|" * len(ratios)]
            for c, h in variants:
                cells = [_fmt([r[metric] for r in rs if r["criterion"] == c and r["heads"] == h
                               and r["target"] == t], scale, digits) for t in ratios]
                out.append(f"| {variant_name(c, h)} | " + " | ".join(cells) + " |")
            out.append("")
        out += ["Paired by seed: KL of each variant minus KL of the best variant at that "
                "ratio (lowest mean KL), mean ± 95% CI; `*` where the interval excludes 0:", "",
                "| ratio | best | " + " | ".join(variant_name(c, h) for c, h in variants) + " |",
                "|---|---|" + "---:|" * len(variants)]
        for t in ratios:
            means = {(c, h): statistics.mean(r["kl"] for r in rs if r["criterion"] == c
                                             and r["heads"] == h and r["target"] == t)
                     for c, h in variants}
            best = min(means, key=means.get)
            cells = []
            for c, h in variants:
                if (c, h) == best:
                    cells.append("-")
                    continue
                d = paired(rs, {"criterion": c, "heads": h, "target": t},
                           {"criterion": best[0], "heads": best[1], "target": t}, "kl")
                m, hw = mean_ci(d)
                star = "*" if len(d) > 1 and (m - hw > 0 or m + hw < 0) else ""
                cells.append(f"{m:+.4f} ± {hw:.4f}{star}")
            out.append(f"| {t:.1f} | {variant_name(*best)} | " + " | ".join(cells) + " |")
        reached = [r["macs_ratio"] - r["target"] for r in rs if r["criterion"] != "dense"]
        out += ["", f"MACs reached minus target: {min(reached):+.4f} to {max(reached):+.4f}.", ""]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """Test top-1 and KL against the MACs ratio, one line per variant (95% CI bands), one row
    of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4.2 * len(kinds)), squeeze=False)
    styles = {"channels": "-", "whole": "--"}
    colors = dict(zip(CRITERIA, ("tab:blue", "tab:orange", "tab:gray", "tab:green")))
    for ax_row, kind in zip(axes, kinds):
        rs = [r for r in rows if r["model"] == kind]
        n = len({r["seed"] for r in rs})
        dense_acc = statistics.mean(100 * r["acc_test"] for r in rs if r["criterion"] == "dense")
        for c in CRITERIA:
            for h in HEADS:
                sel = [r for r in rs if r["criterion"] == c and r["heads"] == h]
                if not sel:
                    continue
                ratios = sorted({r["target"] for r in sel})
                for ax, metric, scale in ((ax_row[0], "acc_test", 100.0), (ax_row[1], "kl", 1.0)):
                    stats = [mean_ci([scale * r[metric] for r in sel if r["target"] == t])
                             for t in ratios]
                    m = [s[0] for s in stats]
                    lo = [s[0] - s[1] for s in stats]
                    hi = [s[0] + s[1] for s in stats]
                    ax.plot(ratios, m, styles[h], color=colors[c], ms=3,
                            marker="o" if h == "channels" else "s",
                            label=variant_name(c, h))
                    ax.fill_between(ratios, lo, hi, color=colors[c], alpha=0.12, lw=0)
        ax_row[0].axhline(dense_acc, color="black", lw=0.8, ls=":", label="dense")
        ax_row[0].set(title=f"{kind}: test top-1, no fine-tuning ({n} seeds, 95% CI)",
                      xlabel="MACs ratio (target)", ylabel="top-1 (%)")
        ax_row[1].set(title=f"{kind}: KL(dense || pruned) over 1,797 images",
                      xlabel="MACs ratio (target)", ylabel="KL (nats, log scale)", yscale="log")
        for ax in ax_row:
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "criteria_retention.json"))
    p.add_argument("--plot", default=str(HERE / "results" / "criteria_retention.png"))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--dense-epochs", type=int, default=digits_models.DENSE_EPOCHS)
    p.add_argument("--cache", default=str(digits_models.CACHE),
                   help="folder of trained dense models (digits_models.py)")
    p.add_argument("--no-cache", action="store_true", help="train every dense model afresh")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="processes, one (model, seed) each at a time (default: one per core)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    print(f"criteria retention: models {args.models}, {args.seeds} seeds, ratios {args.ratios}, "
          f"criteria {args.criteria}, heads {args.heads}, {args.jobs} process(es) of "
          f"{torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    start, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    tasks = [(kind, seed) for kind in args.models for seed in range(args.seeds)]
    rows = []
    if args.jobs <= 1:
        for kind, seed in tasks:
            rows += run_model_seed(kind, seed, data, args, _log)
    else:
        # one (model, seed) per task: the prunings of one dense model stay in one process, so
        # it is loaded once; spawn, not fork, so no worker inherits torch's thread pools
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(args.threads,)) as pool:
            for part in pool.map(_run_task, [(kind, seed, args) for kind, seed in tasks]):
                rows += part
    pruning_seconds = sum(r["seconds"] for r in rows)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    meta = {"wall_s": round(elapsed, 1), "cpu_s": round(cpu, 1),
            "pruning_s": round(pruning_seconds, 1), "jobs": args.jobs, "threads": args.threads,
            "load_average_start": load0, "load_average_end": os.getloadavg()[0],
            "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else list(argv)}
    try:
        import _env

        meta.update(cpu=_env.cpu_name(), commit=_env.git_revision())
    except ImportError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print()
    print(summarize(rows))
    print(f"total {elapsed:.0f} s wall ({args.jobs} process(es); the prunings took "
          f"{pruning_seconds:.0f} s in all), {cpu:.0f} s CPU of the main process, load average "
          f"{load0:.1f} at start, {meta['load_average_end']:.1f} at end; rows in {args.out}"
          + (f", plot in {args.plot}" if args.plot else ""))
    return rows


if __name__ == "__main__":
    main()
