"""What ``fxprune.prune`` could not prune, as plain data (``pruned.meta["fxprune.report"]``).

Every frozen group is listed with its reason (the analysis' refusals, and groups the slicer
could not slice exactly); when the MACs target is missed, ``blocked_by`` names the frozen
groups that held the channels the target needed. A model whose analysis finds no q.k product
(additive attention, pure MLPs or convs) says ``"no dot-product attention"``; its other
groups are pruned as usual.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
    ...                         torch.nn.Linear(32, 8))
    >>> r = fxprune.prune(m, torch.randn(2, 8), macs_ratio=0.5).meta["fxprune.report"]
    >>> r["target_met"], r["attention"], [g["kind"] for g in r["frozen"]]
    (True, 'no dot-product attention', [])
"""

from __future__ import annotations

from typing import Any

#: the slack allowed above the target before it counts as missed
TARGET_SLACK = 0.02
#: frozen groups of these kinds hold channels a plan could otherwise remove
PRUNABLE_KINDS = ("qk", "v", "mlp")
RESIDUAL_DEFAULT = "residual stream (embedding width): left dense by default"


def prune_report(analysis, masks: dict, target: float, reached: float) -> dict[str, Any]:
    """The report of one prune: target and reached ratio, attention found, frozen groups
    with reasons, and (when the target is missed) the groups that blocked it."""
    frozen = [_group_row(g) for g in analysis.groups
              if g.frozen is not None and g.kind != "heads"]
    met = reached <= float(target) + TARGET_SLACK
    # groups a plan could have pruned first (q/k, v, MLPs), then the residual stream
    blocked = [] if met else sorted(frozen, key=lambda row: (
        row["kind"] not in PRUNABLE_KINDS, row["reason"] == RESIDUAL_DEFAULT, -row["channels"]))
    return {
        "target": float(target),
        "reached": round(float(reached), 4),
        "target_met": bool(met),
        "attention": (f"{len(analysis.attention)} dot-product attention sites"
                      if analysis.attention else "no dot-product attention"),
        "pruned_groups": sorted(int(g) for g in masks),
        "frozen": frozen,
        "blocked_by": blocked,
        "opaque": [{"node": n, "what": w} for n, w in analysis.opaque],
    }


def _group_row(g) -> dict[str, Any]:
    return {"group": g.index, "kind": g.kind, "site": g.site, "heads": g.num_heads,
            "size": g.size, "channels": g.width, "reason": g.frozen}


def report_blockers(report: dict[str, Any], limit: int = 3) -> str:
    """One line naming the groups that blocked the target (or that none is frozen)."""
    rows = report["blocked_by"]
    if not rows:
        return "no group is frozen: every prunable group is at its smallest width"
    text = "; ".join(f"group {r['group']} ({r['kind']}, {r['channels']} channels): "
                     f"{r['reason']}" for r in rows[:limit])
    return text + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the command line.

    Example:
        >>> print(format_report({"target": 0.7, "reached": 0.7, "target_met": True,
        ...                      "attention": "no dot-product attention", "frozen": [],
        ...                      "blocked_by": [], "opaque": []}))
        MACs ratio 0.7 (target 0.7, met); no dot-product attention
    """
    met = "met" if report["target_met"] else "MISSED"
    lines = [f"MACs ratio {report['reached']} (target {report['target']}, {met}); "
             f"{report['attention']}"]
    by_reason: dict[str, list[str]] = {}
    for row in report["frozen"]:
        where = f"site {row['site']}" if row["site"] is not None else "no site"
        by_reason.setdefault(row["reason"], []).append(f"{row['group']} ({row['kind']}, {where})")
    if by_reason:
        lines.append("frozen groups (left dense):")
        for reason, groups in by_reason.items():
            lines.append(f"  - {reason}: groups {', '.join(groups)}")
    if not report["target_met"]:
        lines.append(f"target missed; blocked by: {report_blockers(report)}")
    return "\n".join(lines)
