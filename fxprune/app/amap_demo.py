"""AMAP end to end on real data: scikit-learn's 8x8 digits (no download), in about a minute.

Trains the reference ``digits_vit`` (4 blocks, 4 heads of 16 channels, MLP 128) from scratch,
runs the AMAP search (:func:`fxprune.amap.search.search`: similarity-weighted indicators, head
synchronisation, MACs loss) to ``macs_ratio`` of the dense MACs, refines (slice with the learned
masks, reweight modules on the queries, retrain: :func:`fxprune.amap.search.refine`), then prints:

* test accuracy and MACs (``fxprune.count_macs``) before and after;
* the kept channels per layer: Q/K and V dims per head, MLP hidden width;
* the measured CPU speed-up at batch 256 (dense eager model vs. the sliced GraphModule; the two
  are timed alternately, round after round, and the medians compared).

(At this size the speed-up stays below ``1 / macs_ratio``: the embedding width and the 17
tokens are untouched, so layer norms, softmax, GELU and copies cost what they did. The search
rounds kept counts to multiples of 8 and pairs q/k and v head dims where SDPA runs, which keeps
SDPA on its fused kernel: ``benchmarks/bench_amap_speed.py`` measured 1.33x at 0.507 of the
MACs, batch 256, one thread, against 1.09x with the masks as searched.)

It saves, under ``out_dir``: ``kept_channels.png`` (kept vs. total channels per layer and head,
like the paper's Figure 5), ``amap_pruned/`` (the pruned GraphModule as written by fxprune.save;
``fxprune.load(path)``) and ``amap_summary.json``.

Usage::

    python -m fxprune.app.amap_demo [--out runs/demo] [--seed 0]

Example (seconds; tiny schedule, the accuracies mean nothing)::

    >>> from fxprune.app.amap_demo import main
    >>> r = main(out_dir="/tmp/amap_demo", dense_epochs=2, epochs=3, rounds=3,
    ...          verbose=False)  # doctest: +SKIP
    >>> sorted(r)[:3]  # doctest: +SKIP
    ['accuracy_after', 'accuracy_before', 'dense_ms']
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import torch

from fxprune.meta import SLICED_KEY


def interleaved_ms(models: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per forward of every model, timed alternately (order rotated each round) so
    that load from other processes hits all of them alike."""
    names = list(models)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:                 # warm-up
            models[n](x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                models[n](x)
                times[n].append((time.perf_counter() - t) * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}


def kept_channels(result) -> list[dict]:
    """Per block: kept/total Q/K and V channels per head and MLP hidden width, from the
    search's masks (``SearchResult``)."""
    analysis, masks = result.analysis, result.masks
    mlps = [g for g in analysis.groups if g.kind == "mlp"]
    rows = []
    for i, site in enumerate(analysis.attention):
        row = {"layer": i, "heads": site.num_heads}
        for key, gi, dim in (("qk", site.qk_group, site.qk_head_dim),
                             ("v", site.v_group, site.v_head_dim)):
            total = [dim] * site.num_heads
            if gi is not None and gi in masks:
                kept = [int(h.sum()) for h in np.asarray(masks[gi]).reshape(site.num_heads, -1)]
            else:
                kept = list(total)
            row[f"{key}_kept"], row[f"{key}_total"] = kept, total
        if len(mlps) == len(analysis.attention):
            g = mlps[i]
            row["mlp_total"] = int(g.width)
            row["mlp_kept"] = int(np.asarray(masks[g.index]).sum()) if g.index in masks \
                else int(g.width)
        rows.append(row)
    return rows


def format_kept(rows: list[dict]) -> str:
    from fxprune.app.report import format_table

    table = []
    for r in rows:
        table.append([r["layer"],
                      " ".join(str(k) for k in r["qk_kept"]) + f"  / {r['qk_total'][0]}",
                      " ".join(str(k) for k in r["v_kept"]) + f"  / {r['v_total'][0]}",
                      f"{r['mlp_kept']} / {r['mlp_total']}" if "mlp_total" in r else "-"])
    return format_table(["layer", "q/k dims per head", "v dims per head", "MLP width"], table)


def plot_kept(rows: list[dict], path: str, title: str = "") -> str | None:
    """Bar chart of kept vs. total channels per layer and head (Q/K, V) and per layer (MLP)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no kept-channels plot", stacklevel=2)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8),
                             gridspec_kw={"width_ratios": [2.2, 2.2, 1.2]})
    colors = plt.get_cmap("tab10").colors
    for ax, key, label in ((axes[0], "qk", "Q/K channels per head"),
                           (axes[1], "v", "V channels per head")):
        heads = max(r["heads"] for r in rows)
        width = 0.8 / heads
        for h in range(heads):
            xs = [r["layer"] - 0.4 + width * (h + 0.5) for r in rows]
            total = [r[f"{key}_total"][h] for r in rows]
            kept = [r[f"{key}_kept"][h] for r in rows]
            ax.bar(xs, total, width * 0.9, color="0.88", edgecolor="0.6", linewidth=0.5,
                   label="total" if h == 0 else None)
            ax.bar(xs, kept, width * 0.9, color=colors[h % 10], label=f"head {h} kept")
            for x_, k in zip(xs, kept):
                ax.text(x_, k + 0.2, str(k), ha="center", va="bottom", fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("layer (block)")
        ax.set_ylabel("channels")
        ax.set_xticks([r["layer"] for r in rows])
        ax.set_ylim(0, max(max(r[f"{key}_total"]) for r in rows) * 1.15)
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax = axes[2]
    mrows = [r for r in rows if "mlp_total" in r]
    ax.bar([r["layer"] for r in mrows], [r["mlp_total"] for r in mrows], 0.6, color="0.88",
           edgecolor="0.6", linewidth=0.5, label="total")
    ax.bar([r["layer"] for r in mrows], [r["mlp_kept"] for r in mrows], 0.6, color=colors[4],
           label="kept")
    for r in mrows:
        ax.text(r["layer"], r["mlp_kept"] + 1, str(r["mlp_kept"]), ha="center", va="bottom",
                fontsize=8)
    ax.set_title("MLP hidden channels")
    ax.set_xlabel("layer (block)")
    ax.set_xticks([r["layer"] for r in mrows])
    ax.set_ylim(0, max([r["mlp_total"] for r in mrows] or [1]) * 1.15)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(out_dir: str = "runs/demo", seed: int = 0, *, dense_epochs: int = 40,
         epochs: int = 10, macs_ratio: float = 0.5, rounds: int = 21,
         threads: int | None = 1, verbose: bool = True) -> dict:
    """Run the demo (see the module docstring). ``dense_epochs`` trains the dense model,
    ``epochs`` is the search's and the refine's length each. ``threads`` is
    ``torch.set_num_threads`` for the run (restored afterwards; None leaves torch's setting).
    It defaults to 1: this model's matrices are tiny, and on the 2-core machine two intra-op
    threads made a training epoch 3 to 12 times slower whenever another process was busy."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, seed, dense_epochs, epochs, macs_ratio, rounds, verbose)
    finally:
        torch.set_num_threads(before)


def _run(out_dir, seed, dense_epochs, epochs, macs_ratio, rounds, verbose) -> dict:
    from fxprune import count_macs
    from fxprune.amap.search import refine, search
    from fxprune.app.digits import accuracy, load_digits_split, train
    from fxprune.app.report import format_macs
    from fxprune.models.reference import digits_vit

    say = print if verbose else (lambda *a, **k: None)
    t_all = time.perf_counter()
    data = load_digits_split()
    x1 = data.x_train[:1]
    say(f"== AMAP demo: digits_vit on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images), target {macs_ratio:.0%} MACs, "
        f"{torch.get_num_threads()} threads ==")

    torch.manual_seed(seed)
    t = time.perf_counter()
    dense = train(digits_vit(), data, epochs=dense_epochs, seed=seed)
    acc_before = accuracy(dense, data)
    dense_macs = count_macs(dense, x1)
    say(f"dense:   top-1 {acc_before:.2%}, {format_macs(dense_macs)} MACs per image "
        f"(trained {dense_epochs} epochs in {time.perf_counter() - t:.1f} s)")

    with warnings.catch_warnings():  # search/refine log float() of tensors that need grad
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        t = time.perf_counter()
        res = search(dense, data.train_loader(seed=seed), x1, macs_ratio=macs_ratio,
                     epochs=epochs, seed=seed, progress=verbose)
        t_search = time.perf_counter() - t
        say(f"search:  {epochs} epochs in {t_search:.1f} s, masked MACs ratio "
            f"{res.macs_ratio:.3f}")
        t = time.perf_counter()
        pruned, _ = refine(res, data.train_loader(seed=seed), epochs=epochs, progress=verbose)
        t_refine = time.perf_counter() - t
    if not pruned.meta.get(SLICED_KEY, True):
        raise RuntimeError("the searched masks could not be sliced (the demo searches with "
                           "head synchronisation, so this is a bug)")
    acc_after = accuracy(pruned, data)
    pruned_macs = count_macs(pruned, x1)   # reweight modules included
    from fxprune.passes.reweight import ReweightModule
    rw_macs = sum(m.fc.in_features * m.fc.out_features for m in pruned.modules()
                  if isinstance(m, ReweightModule))
    say(f"refine:  {epochs} epochs in {t_refine:.1f} s (sliced, reweight modules on the queries)")
    say(f"pruned:  top-1 {acc_after:.2%}, {format_macs(pruned_macs)} MACs per image "
        f"(ratio {pruned_macs / dense_macs:.3f}, of which {format_macs(rw_macs)} in the "
        f"reweight modules)")

    rows = kept_channels(res)
    say("\nkept channels per layer:")
    say(format_kept(rows))

    xb = data.x_test[:256]
    if len(xb) < 256:
        xb = torch.cat([xb] * (256 // len(xb) + 1))[:256]
    ms = interleaved_ms({"dense": dense.eval(), "pruned": pruned.eval()}, xb, rounds)
    speedup = ms["dense"] / ms["pruned"]
    say(f"\nCPU, batch 256, {torch.get_num_threads()} threads, median of {rounds} interleaved "
        f"runs: dense {ms['dense']:.2f} ms, pruned {ms['pruned']:.2f} ms -> {speedup:.2f}x "
        f"(ideal {dense_macs / pruned_macs:.2f}x)")

    os.makedirs(out_dir, exist_ok=True)
    png = plot_kept(rows, os.path.join(out_dir, "kept_channels.png"),
                    title=f"AMAP on digits_vit: kept channels at {pruned_macs / dense_macs:.0%} "
                          f"MACs (top-1 {acc_before:.1%} -> {acc_after:.1%})")
    model_path = os.path.join(out_dir, "amap_pruned")
    from fxprune.serialization import save

    save(pruned, model_path, xb[:1])
    result = {"accuracy_before": acc_before, "accuracy_after": acc_after,
              "dense_macs": dense_macs, "pruned_macs": pruned_macs,
              "macs_ratio": pruned_macs / dense_macs, "reweight_macs": rw_macs,
              "search_macs_ratio": res.macs_ratio, "kept": rows,
              "dense_ms": ms["dense"], "pruned_ms": ms["pruned"], "speedup": speedup,
              "threads": torch.get_num_threads(), "search_s": t_search, "refine_s": t_refine,
              "plot": png, "model": model_path, "seconds": time.perf_counter() - t_all}
    with open(os.path.join(out_dir, "amap_summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    say(f"\nsaved {png or '(no plot: matplotlib missing)'}, {model_path}/ (safetensors, "
        f"plan.json, program.pt2: fxprune.load('{model_path}')) and amap_summary.json; "
        f"total {result['seconds']:.0f} s")
    return result


def _cli(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fxprune.app.amap_demo", description=__doc__.split(
        "\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-epochs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    main(a.out, a.seed, dense_epochs=a.dense_epochs, epochs=a.epochs, threads=a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
