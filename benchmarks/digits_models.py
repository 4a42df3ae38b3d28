"""Trained dense digits models, cached per seed, for the benchmarks that prune them many times
(``criteria_retention.py``, ``amap_low_ratio.py``).

A model is trained exactly as the other digits benchmarks train it
(``digits_ablation.train_dense``: the seed's initialisation and data order, 100 epochs of AdamW
by default), so seed ``s`` here is the dense model of seed ``s`` in ``digits_ablation.py``
(``vit``) and ``digits_flatten.py`` (``flatten``). Its ``state_dict`` is saved under
``runs/digits_models/`` (git-ignored) and loaded on the next call; training one takes about a
minute on one thread of the 2-core dev VM, loading one a few milliseconds.

``python benchmarks/digits_models.py --models vit flatten --seeds 10`` fills the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):  # a plain checkout; digits_ablation beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

import digits_ablation as abl  # noqa: E402
import digits_flatten  # noqa: E402

CACHE = HERE.parent / "runs" / "digits_models"
DENSE_EPOCHS = 100  # the digits benchmarks' dense schedule


def factory(kind: str):
    """A fresh, untrained model of ``kind`` (``"vit"``: ``digits_vit``; ``"flatten"``: the
    FLatten-Swin nano of ``digits_flatten.py``)."""
    if kind == "vit":
        from fxprune.models.reference import digits_vit

        return digits_vit()
    if kind == "flatten":
        return digits_flatten.flatten_digits()
    raise ValueError(f"unknown model kind {kind!r} (vit or flatten)")


def dense_model(kind: str, seed: int, data, epochs: int = DENSE_EPOCHS,
                cache: Path | None = CACHE, log=print) -> torch.nn.Module:
    """The seed's trained dense model (eval mode), from the cache when it is there."""
    path = None if cache is None else Path(cache) / f"{kind}-seed{seed}-e{epochs}.pt"
    if path is not None and path.exists():
        model = factory(kind)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t = time.perf_counter()
    model = abl.train_dense(data, seed, epochs, factory=lambda: factory(kind))
    if log:
        log(f"  trained {kind} seed {seed} ({epochs} epochs) in {time.perf_counter() - t:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: a parallel run never reads a half-written file
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="fill the cache of trained dense digits models")
    p.add_argument("--models", nargs="+", default=["vit", "flatten"])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--dense-epochs", type=int, default=DENSE_EPOCHS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from fxprune.app.digits import load_digits_split

    data = load_digits_split()
    for kind in args.models:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            dense_model(kind, seed, data, args.dense_epochs)


if __name__ == "__main__":
    main()
