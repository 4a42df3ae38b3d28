"""AMAP search and refine (paper section 3 and appendix A).

``search`` traces and analyses the model, puts a learnable indicator on every prunable group
(:mod:`fxprune.passes.insert_indicators`) and trains weights and indicators together with the
task loss plus the MACs loss ``|MACs(masked) / MACs(dense) - macs_ratio|`` (eq. 8, the
Euclidean distance to the target, normalised by the dense MACs so that one weight suits every
model). ``refine`` slices with the learned masks, adds reweight modules on the queries and
retrains. Under ``torchrun`` the gated model is wrapped in DistributedDataParallel: the
indicators are parameters, so their gradients are averaged and every rank ends with the same
masks.

Example:
    >>> import torch
    >>> from fxprune.models.reference import tiny_vit
    >>> x = torch.randn(16, 3, 32, 32); y = torch.randint(0, 10, (16,))
    >>> loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    >>> res = search(tiny_vit(), loader, x[:1], macs_ratio=0.6, epochs=6, indicator_lr=0.2,
    ...              progress=False)
    >>> res.history[-1]["macs_ratio"] < 0.9
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.errors import InputError, PlanError
from fxprune.meta import PLAN_DATA_KEY, SLICED_KEY

WHERE = "fxprune.amap.search"


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Defaults follow the paper's appendix A where it gives them (AdamW, lr 5e-4 -> 5e-6,
    weight decay 1e-6, tau 0.5). ``indicator_lr`` and ``macs_weight`` are not in the paper:
    indicators start at 0 and must cross tau within a short search."""

    macs_ratio: float = 0.5
    epochs: int = 30
    lr: float = 5e-4
    lr_min: float = 5e-6
    weight_decay: float = 1e-6
    indicator_lr: float = 2e-2
    macs_weight: float = 5.0
    tau: float = 0.5
    similarity: bool = True
    sync: bool = True
    similarity_every: int = 10
    linear_init: bool = True        # eq. 5-6 start for linear-attention q/k groups
    linear_init_batches: int = 4
    seed: int = 0
    progress: bool = True
    max_steps: int | None = None
    align: int = 8                  # kept counts per head rounded to multiples (fast kernels)
    match_qk_v: bool | None = None  # equal q/k and v head dims: None = where SDPA runs


@dataclasses.dataclass
class SearchResult:
    graph_module: torch.fx.GraphModule      # gated model (weights trained)
    analysis: Any
    masks: dict[int, np.ndarray]            # binary keep masks per group (heads, size)
    history: list[dict]
    config: SearchConfig
    macs_ratio: float                       # of the masked model, from the MACs model
    linear_init: dict = dataclasses.field(default_factory=dict)  # group -> "scored" or why not


def _first_batch(loader, example, where):
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise InputError(where, "the data loader is empty") from None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise InputError(where, "the data loader must yield (inputs, targets) pairs",
                         hint="e.g. torch.utils.data.DataLoader(TensorDataset(x, y))")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise InputError(where, f"the loader yields inputs of shape "
                         f"{tuple(getattr(x, 'shape', ()))}, the example input has "
                         f"{tuple(example.shape)} (all but the batch dim must match)",
                         hint="pass an example input shaped like one batch of the loader")
    if not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]:
        raise InputError(where, "targets must be a tensor with one entry per input")


def refresh_similarity(gm, analysis, indicators) -> None:
    """Recompute AMAP's similarity weights (eq. 1-2) from the current weights."""
    from fxprune.planning.criteria import features, similarity_weight
    from fxprune.planning.units import group_units

    groups = [analysis.groups[g] for g in indicators]
    blocks = features(gm, analysis, groups)
    for g in groups:
        w = similarity_weight(g, blocks[g.index]).reshape(g.layout.shape)
        units = group_units(g, w)
        indicators[g.index].set_similarity(torch.as_tensor(units.scores, dtype=torch.float32))


def search(model, train_loader, example_inputs, config: SearchConfig | None = None, *,
           eval_loader=None, loss_fn=None, **overrides) -> SearchResult:
    """Train indicators and weights together to ``macs_ratio`` (see the module docstring)."""
    from fxprune.amap.deploy import deployable_masks, pin_indicators, unit_keep
    from fxprune.passes.insert_indicators import InsertIndicators, indicator_modules

    config = dataclasses.replace(config or SearchConfig(), **overrides)
    if not 0.0 < config.macs_ratio <= 1.0:
        raise InputError(WHERE, f"macs_ratio must be in (0, 1], got {config.macs_ratio}")
    example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    _first_batch(train_loader, example, WHERE)
    torch.manual_seed(config.seed)
    gm, analysis, macs_model = _searchable_graph(model, example, config)
    init_scores, init_report = {}, {}
    if config.linear_init:
        init_scores, init_report = _linear_init_scores(gm, analysis, train_loader, config)
    gated = InsertIndicators(tau=config.tau, similarity=config.similarity, sync=config.sync,
                             inplace=True)(gm).graph_module
    indicators = indicator_modules(gated)
    if init_scores:
        _start_from_scores(gated, analysis, indicators, init_scores, config)
    history = _train(gated, analysis, indicators, macs_model, train_loader, eval_loader,
                     loss_fn or nn.CrossEntropyLoss(), config)
    gated.eval()
    # the searched counts, rounded to align and paired for SDPA (fxprune/amap/deploy.py)
    masks = deployable_masks(analysis, indicators, macs_model.units, config.align,
                             config.match_qk_v)
    final_keep = unit_keep(masks, analysis, macs_model.units)
    pin_indicators(indicators, final_keep)  # the gated model computes what gets sliced
    with torch.no_grad():
        final = float(macs_model(final_keep))
    return SearchResult(gated, analysis, masks, history, config, final / macs_model.dense,
                        init_report)


def _searchable_graph(model, example, config: SearchConfig):
    """The traced, prepared and analysed graph, and its MACs model; a typed error when it has
    nothing to prune or cannot reach ``config.macs_ratio``."""
    from fxprune.amap.macs_model import MacsModel
    from fxprune.analysis.engine import analyze
    from fxprune.passbase import copy_graph_module
    from fxprune.pipeline import prepare
    from fxprune.tracing import trace

    gm, _ = prepare(copy_graph_module(trace(model, example)))
    analysis = analyze(gm)
    if not any(g.prunable for g in analysis.groups):
        raise PlanError(WHERE, "the analysis found no prunable channel group",
                        hint="print(fxprune.analyze(fxprune.trace(model, x))) shows why")
    macs_model = MacsModel(gm, analysis)
    lowest = macs_model.minimum() / macs_model.dense
    if lowest > config.macs_ratio:
        raise PlanError(WHERE, f"macs_ratio {config.macs_ratio} cannot be reached: keeping one "
                        f"unit per head in every prunable group still costs {lowest:.3f} of "
                        "the dense MACs (frozen groups stay dense)",
                        hint=f"use macs_ratio >= {math.ceil(lowest * 100) / 100}")
    return gm, analysis, macs_model


def _total_steps(train_loader, config: SearchConfig) -> int:
    """Optimizer steps of the search: ``epochs`` over the loader, capped by ``max_steps``."""
    try:
        total = config.epochs * max(1, len(train_loader))
    except TypeError:  # an iterable loader without a length: max_steps bounds the run
        if not config.max_steps:
            raise InputError(WHERE, "the data loader has no length",
                             hint="pass max_steps=... to bound the search") from None
        total = config.max_steps
    return min(total, config.max_steps) if config.max_steps else total


def _optimizer(gated, indicators, config: SearchConfig) -> torch.optim.Optimizer:
    """AdamW over the weights (``lr``, weight decay) and the indicators (``indicator_lr``, no
    decay), in that order of parameter groups."""
    ind_params = [p for ind in indicators.values() for p in ind.parameters()]
    ind_ids = {id(p) for p in ind_params}
    weights = [p for p in gated.parameters() if id(p) not in ind_ids and p.requires_grad]
    return torch.optim.AdamW([
        {"params": weights, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": ind_params, "lr": config.indicator_lr, "weight_decay": 0.0}])


def _set_cosine_lr(opt, step: int, total: int, config: SearchConfig) -> None:
    """Cosine decay of both groups' rates to ``lr_min / lr`` of their start."""
    frac = 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    floor = config.lr_min / config.lr if config.lr > 0 else 0.0  # lr=0 freezes weights
    for group, lr0 in zip(opt.param_groups, (config.lr, config.indicator_lr)):
        group["lr"] = floor * lr0 + (lr0 - floor * lr0) * frac


def _train(gated, analysis, indicators, macs_model, train_loader, eval_loader, loss_fn,
           config: SearchConfig) -> list[dict]:
    """The search's training loop: task loss plus ``macs_weight * |MACs ratio - target|``;
    one history record per epoch."""
    train_module = gated
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        train_module = nn.parallel.DistributedDataParallel(gated)
    opt = _optimizer(gated, indicators, config)
    total = _total_steps(train_loader, config)
    history: list[dict] = []
    step = 0
    bar = _progress(total, config.progress)
    gated.train()
    for epoch in range(config.epochs):
        seen = correct = 0
        loss_sum = 0.0
        for batch in train_loader:
            if step >= total:
                break
            x, y = batch[0], batch[1]
            if config.similarity and step % config.similarity_every == 0:
                refresh_similarity(gated, analysis, indicators)
            _set_cosine_lr(opt, step, total, config)
            out = train_module(x)
            task = loss_fn(out, y)
            keep = {g: ind.keep() for g, ind in indicators.items()}
            ratio = macs_model(keep) / macs_model.dense
            loss = task + config.macs_weight * (ratio - config.macs_ratio).abs()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += y.shape[0]
            correct += int((out.argmax(-1) == y).sum())
            loss_sum += float(task.detach()) * y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(task.detach()):.3f}", acc=f"{correct / seen:.3f}",
                                macs=f"{float(ratio):.3f}")
        record = {"epoch": epoch, "loss": loss_sum / max(1, seen),
                  "train_acc": correct / max(1, seen), "macs_ratio": float(ratio.detach())}
        if eval_loader is not None:
            record["eval_acc"] = evaluate(gated, eval_loader)
            gated.train()
        history.append(record)
        if step >= total:
            break
    if bar is not None:
        bar.close()
    return history


def _linear_init_scores(gm, analysis, loader, config):
    """Eq. 5-6 scores of linear-attention q/k groups from the first batches of ``loader``."""
    import itertools

    from fxprune.amap.linear_init import linear_attention_scores

    batches = itertools.islice(iter(loader), max(1, config.linear_init_batches))
    scores, skipped = linear_attention_scores(gm, analysis, batches)
    report = {g: "scored" for g in scores}
    report.update({g: f"default start (zeros): {why}" for g, why in skipped.items()})
    return scores, report


def _start_from_scores(gated, analysis, indicators, scores, config) -> None:
    """``m = (score - 1) * tau / w``: the weighted score ``m*`` of a linear-attention q/k unit
    starts between ``-tau`` (most important) and 0 (least important, where every other
    indicator starts), so every unit is kept and the important ones are the last the MACs loss
    pushes over tau (see :mod:`fxprune.amap.linear_init`)."""
    from fxprune.amap.linear_init import HEAD_START
    from fxprune.planning.units import group_units

    if config.similarity:
        refresh_similarity(gated, analysis, {g: indicators[g] for g in scores})
    for gi, score in scores.items():
        ind = indicators[gi]
        units = group_units(analysis.groups[gi], score.reshape(analysis.groups[gi].layout.shape))
        w = ind.w if config.similarity else torch.ones_like(ind.w)
        unit_scores = torch.as_tensor(units.scores, dtype=torch.float32)
        start = HEAD_START * config.tau * (unit_scores - 1.0)
        with torch.no_grad():
            ind.m.copy_(start.reshape(ind.m.shape) / w)


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety; training does not need it
        return None
    return tqdm(total=total, desc="AMAP search", leave=False)


def evaluate(module, loader) -> float:
    """Top-1 accuracy of ``module`` on ``loader`` (eval mode, no grad)."""
    module.eval()
    seen = correct = 0
    with torch.no_grad():
        for batch in loader:
            out = module(batch[0])
            correct += int((out.argmax(-1) == batch[1]).sum())
            seen += batch[1].shape[0]
    return correct / max(1, seen)


def refine(result: SearchResult, train_loader, epochs: int = 30, *, reweight: bool = True,
           lr: float = 5e-4, lr_min: float = 5e-6, weight_decay: float = 1e-6,
           eval_loader=None, progress: bool = False) -> tuple[torch.fx.GraphModule, list]:
    """Slice with the searched masks, add reweight modules, retrain (paper appendix A).

    Where the masks keep different counts per head (search without synchronisation), the
    model cannot be sliced and is refined masked, with fixed binary gates.
    Returns ``(model, history)``.
    """
    from fxprune.analysis.engine import analyze
    from fxprune.passes.insert_gates import InsertGates, gate_modules
    from fxprune.passes.reweight import Reweight
    from fxprune.passes.slice import Slice

    gm = result.graph_module
    try:
        model = Slice(keep=result.masks)(gm).graph_module if result.masks else gm
        sliced = True
    except PlanError:
        sliced = False
    if not sliced:
        base = Slice(keep={})(gm).graph_module  # drops the indicators, keeps every channel
        analyze(base)
        model = InsertGates()(base).graph_module
        for group, gate in gate_modules(model).items():
            if group in result.masks:
                gate.set_mask(torch.as_tensor(result.masks[group]))
            gate.values.requires_grad_(False)
    elif reweight:
        analyze(model)
        model = Reweight()(model).graph_module
        if PLAN_DATA_KEY in model.meta:  # apply_plan re-adds the modules the weights fill
            model.meta[PLAN_DATA_KEY].after.append("reweight")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(train_loader))
    step = 0
    history = []
    loss_fn = nn.CrossEntropyLoss()
    bar = _progress(total, progress)
    model.train()
    for epoch in range(epochs):
        for x, y in train_loader:
            frac = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr_min + (lr - lr_min) * frac
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
        rec = {"epoch": epoch, "loss": float(loss.detach())}
        if eval_loader is not None:
            rec["eval_acc"] = evaluate(model, eval_loader)
            model.train()
        history.append(rec)
    if bar is not None:
        bar.close()
    model.eval()
    model.meta[SLICED_KEY] = sliced
    return model, history
