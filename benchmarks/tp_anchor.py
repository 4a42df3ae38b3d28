"""Torch-Pruning as an optional anchor of ``bench_gpu.py``: its documented timm ViT recipe
(``MetaPruner`` with ``num_heads`` from every attention module's ``qkv``, head dims pruned, no
head removal, the classifier ignored, ``GroupMagnitudeImportance(p=2)``, global pruning), a
custom pruner for Swin's ``PatchMerging``, and a search of its ``pruning_ratio`` that lands on
a MACs ratio measured by ``fxprune.count_macs``.

Example (needs ``pip install torch-pruning``)::

    import torch_pruning as tp
    pruned, info = tp_prune_to_macs(tp, model, x, 0.7, round_to=8,
                                    dense_macs=fxprune.count_macs(model, x))
"""

from __future__ import annotations

import copy
import warnings


def _attention_modules(model):
    """Modules with a fused ``qkv`` Linear and an int ``num_heads`` (timm ViT and Swin)."""
    import torch

    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), torch.nn.Linear) and \
                isinstance(getattr(m, "num_heads", None), int):
            yield m


def _patch_merging_pruner(tp):
    """Torch-Pruning pruner for timm's Swin ``PatchMerging``: its norm and reduction see the
    C input channels four times (the 2x2 neighbours concatenated), in blocks of C."""
    class PatchMergingPruner(tp.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            tp.prune_linear_out_channels(layer.reduction, idxs)
            if hasattr(layer, "out_dim"):
                layer.out_dim = layer.reduction.out_features
            return layer

        def prune_in_channels(self, layer, idxs):
            dim = layer.norm.normalized_shape[0] // 4
            idxs = list(idxs)
            rep = [i + k * dim for k in range(4) for i in idxs]
            tp.prune_linear_in_channels(layer.reduction, rep)
            tp.prune_layernorm_out_channels(layer.norm, rep)
            layer.dim = dim - len(idxs)
            return layer

        def get_out_channels(self, layer):
            return layer.reduction.out_features

        def get_in_channels(self, layer):
            return layer.norm.normalized_shape[0] // 4

    return PatchMergingPruner()


def tp_prune_once(tp, model, x, pruning_ratio: float, round_to: int | None):
    import torch

    model = copy.deepcopy(model)
    num_heads = {m.qkv: m.num_heads for m in _attention_modules(model)}
    customized, roots = {}, [torch.nn.Conv2d, torch.nn.Linear]
    try:
        from timm.models.swin_transformer import PatchMerging
    except ImportError:
        PatchMerging = None
    if PatchMerging is not None and any(isinstance(m, PatchMerging) for m in model.modules()):
        customized[PatchMerging] = _patch_merging_pruner(tp)
        roots.append(PatchMerging)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=pruning_ratio,
            ignored_layers=[model.get_classifier()], num_heads=num_heads,
            prune_num_heads=False, prune_head_dims=True,
            round_to=round_to if round_to and round_to > 1 else None,
            customized_pruners=customized or None, root_module_types=roots)
        pruner.step()
    # repair the attention modules by hand (Torch-Pruning only changes the Linears)
    for m in _attention_modules(model):
        m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)
        head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "head_dim"):
            m.head_dim = head_dim
        if hasattr(m, "attn_dim"):
            m.attn_dim = head_dim * m.num_heads
    return model


def tp_prune_to_macs(tp, model, x, target: float, round_to: int, dense_macs: int,
                     tol: float = 0.005, max_evals: int = 9):
    """Search Torch-Pruning's global ``pruning_ratio`` so that the MACs ratio (fxprune's MACs
    model) lands within ``tol`` of ``target`` (interpolation inside a bracket, else bisection).
    Returns (model, info)."""
    import fxprune

    lo, f_lo = 0.0, 1.0
    hi, f_hi = 0.95, None
    best, evals = None, []
    r = min(0.9, max(0.02, (1.0 - target) / 0.9))  # first guess: MACs fall ~0.9 per unit ratio
    for _ in range(max_evals):
        pruned = tp_prune_once(tp, model, x, r, round_to)
        f = fxprune.count_macs(pruned, x) / dense_macs
        evals.append({"pruning_ratio": round(r, 5), "macs_ratio": round(f, 5)})
        if best is None or abs(f - target) < abs(best[1] - target):
            best = (pruned, f, r)
        if abs(f - target) <= tol:
            break
        if f > target:
            lo, f_lo = r, f
        else:
            hi, f_hi = r, f
        if f_hi is not None and f_lo > f_hi:  # interpolate inside the bracket
            r_new = lo + (hi - lo) * (f_lo - target) / (f_lo - f_hi)
            r = r_new if lo < r_new < hi and abs(r_new - r) > 1e-4 else (lo + hi) / 2
        else:
            r = min(hi, r * 1.5 + 0.05) if f_hi is None else (lo + hi) / 2
    pruned, f, r = best
    return pruned, {"pruning_ratio": r, "macs_ratio": f, "search": evals}
