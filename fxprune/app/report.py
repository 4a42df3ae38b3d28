"""Human-readable tables for analyses and pruning results.

Example:
    >>> print(format_table(["a", "b"], [[1, "x"], [22, "yy"]]))
    a   b
    --  --
    1   x
    22  yy
"""

from __future__ import annotations

import torch

from fxprune.meta import DENSE_MACS_KEY, MACS_RATIO_KEY, SUMMARY_KEY
from fxprune.planning.plan import model_shapes


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def format_macs(macs: float) -> str:
    """``4.6e9 -> '4.600 G'``, with M and K for small models."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3f} {unit}"
    return f"{macs:.0f}"


def analysis_table(analysis) -> str:
    rows = []
    for s in analysis.attention:
        qk = analysis.groups[s.qk_group] if s.qk_group is not None else None
        v = analysis.groups[s.v_group] if s.v_group is not None else None
        frozen = "; ".join(sorted({g.frozen for g in (qk, v) if g is not None and g.frozen}))
        rows.append([s.index, s.kind, s.num_heads, s.qk_head_dim, s.v_head_dim,
                     f"{s.scale:.4g}" if s.scale is not None else "-",
                     f"{s.q.name}/{s.k.name}", s.v.name if s.v is not None else "-",
                     s.proj.name if s.proj is not None else "-",
                     f"{s.qk_group}/{s.v_group}", frozen or "-"])
    out = ["attention sites:", format_table(
        ["site", "kind", "heads", "qk dim", "v dim", "scale", "q/k", "v", "proj",
         "groups qk/v", "frozen"], rows)]
    grows = []
    for g in analysis.groups:
        if g.kind == "heads":
            continue
        grows.append([g.index, g.kind, g.num_heads if g.num_heads else "-", g.size,
                      g.site if g.site is not None else "-", len(g.members),
                      g.frozen or "prunable"])
    out += ["", "channel groups:", format_table(
        ["group", "kind", "heads", "size", "site", "members", "status"], grows)]
    if getattr(analysis, "unprepared", None):
        from fxprune.analysis.inputs import PREPARE_CALL

        out += ["", f"attention not analysed ({len(analysis.unprepared)} opaque call(s); "
                f"run `{PREPARE_CALL}` first, or fxprune.analyze(model, x)):"]
        out += [f"  {n}: {w}" for n, w in analysis.unprepared]
    if analysis.opaque:
        out += ["", "opaque ops (their channels stay dense):"]
        out += [f"  {n}: {w}" for n, w in analysis.opaque]
    return "\n".join(out)


def prune_table(pruned) -> str:
    """Per-layer table of a pruned GraphModule (from ``pruned.meta["fxprune.summary"]``):
    kept heads, q/k and v head dims, MLP widths, and MACs before/after.

    Example:
        >>> import torch, fxprune
        >>> from fxprune.models.reference import tiny_vit
        >>> p = fxprune.prune(tiny_vit(), torch.randn(1, 3, 32, 32), macs_ratio=0.6, align=4)
        >>> "qk dim" in prune_table(p)
        True
    """
    summary = pruned.meta.get(SUMMARY_KEY, [])
    sites = [r for r in summary if "site" in r]
    mlps = [r for r in summary if r.get("kind") == "mlp"]
    rows = []
    for i, r in enumerate(sites):
        mlp = mlps[i] if i < len(mlps) and len(mlps) == len(sites) else None
        rows.append([r["site"], r["kind"], f"{r.get('heads_after', r['heads'])}/{r['heads']}",
                     f"{r['qk_dim']} -> {r['qk_dim_after']}",
                     f"{r['v_dim']} -> {r['v_dim_after']}",
                     f"{mlp['width']} -> {mlp['width_after']}" if mlp else "-"])
    out = [format_table(["site", "kind", "kept heads", "qk dim", "v dim", "MLP width"], rows)]
    if mlps and len(mlps) != len(sites):
        out.append(format_table(["group", "MLP width"], [[m["group"], f"{m['width']} -> "
                                                          f"{m['width_after']}"]
                                                         for m in mlps]))
    dense = pruned.meta.get(DENSE_MACS_KEY)
    ratio = pruned.meta.get(MACS_RATIO_KEY)
    if dense is not None and ratio is not None:
        out.append(f"MACs: {format_macs(dense)} -> {format_macs(dense * ratio)} "
                   f"(ratio {ratio:.3f}, criterion {pruned.meta.get('fxprune.criterion')})")
    return "\n".join(out)


def plan_rows(model: torch.nn.Module, plan: dict) -> list[dict]:
    """One row per (parameter, dim) of a plan (``pruned.meta["fxprune.plan"]``): the kept
    count and the original size (None where ``model`` has no such tensor). ``model`` may be
    a Module or an ExportedProgram.

    Example:
        >>> import torch
        >>> plan_rows(torch.nn.Linear(4, 3), {"weight": {0: torch.tensor([0, 2])}})
        [{'param': 'weight', 'dim': 0, 'kept': 2, 'of': 3}]
    """
    shapes = model_shapes(model)
    rows = []
    for name, dims in plan.items():
        shape = shapes.get(name)
        for dim, kept in dims.items():
            n = int(kept.numel()) if isinstance(kept, torch.Tensor) else len(kept)
            of = shape[int(dim)] if shape is not None and int(dim) < len(shape) else None
            rows.append({"param": name, "dim": int(dim), "kept": n, "of": of})
    return rows
