"""One rank of a 2-process DistributedDataParallel AMAP search (gloo, CPU).

Run by ``tests/amap/test_search.py::test_ddp_two_ranks_end_with_identical_masks``::

    python -m torch.distributed.run --nproc_per_node=2 --standalone \\
        tests/support/ddp_search_worker.py OUTDIR

Every rank builds the same tiny ViT (same seed) and the same small random dataset, takes its
own shard of it (rank r gets samples r, r + world, ...), runs ``fxprune.amap.search.search`` for a
few steps (``search`` wraps the gated model in DistributedDataParallel because the process
group is initialised) and saves ``OUTDIR/rank{r}.pt`` with the final masks, the final
indicator values and a few facts about the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from fxprune.amap.search import search
    from fxprune.models.reference import tiny_vit
    from fxprune.passes.insert_indicators import indicator_modules

    gen = torch.Generator().manual_seed(123)  # the same data on every rank ...
    x = torch.randn(32, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    xs, ys = x[rank::world], y[rank::world]  # ... and a different shard per rank
    loader = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, len(xs), 8)]

    torch.manual_seed(0)
    model = tiny_vit()
    result = search(model, loader, x[:1], macs_ratio=0.5, epochs=6, indicator_lr=0.2,
                    seed=0, progress=False)
    indicators = {g: ind.m.detach().clone()
                  for g, ind in indicator_modules(result.graph_module).items()}
    weights = {n: p.detach().clone() for n, p in result.graph_module.named_parameters()}
    torch.save({
        "rank": rank,
        "world": world,
        "shard_checksum": float(xs.sum()),
        "masks": {g: torch.from_numpy(m) for g, m in result.masks.items()},
        "indicators": indicators,
        "weights": weights,
        "macs_ratio": result.macs_ratio,
        "steps": len(loader) * 6,
    }, Path(outdir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m torch.distributed.run --nproc_per_node=2 --standalone "
                 "tests/support/ddp_search_worker.py OUTDIR")
    os.makedirs(sys.argv[1], exist_ok=True)
    main(sys.argv[1])
