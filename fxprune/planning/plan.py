"""Plans are data: :class:`Plan` says what a pruned model kept, as plain JSON, and
:func:`apply_plan` re-creates the same pruned GraphModule from a fresh copy of the model
(another initialisation, pretrained weights loaded after planning on a proxy, a restart).

A plan holds the kept indices per sliced parameter and dim (original names), the shape of
every parameter and buffer the sliced graph read (to match a model against it), the analysis'
group and site summary with each pruned group's kept positions per head, the example input
spec, the fxprune and torch versions, and the passes run after slicing (``reweight``).

Example:
    >>> import torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> pruned = fxprune.prune(tiny_vit(), x, macs_ratio=0.6, align=4)
    >>> plan = fxprune.Plan.from_json(pruned.meta["fxprune.plan_data"].to_json())
    >>> again = fxprune.apply_plan(tiny_vit(), plan, x)     # another initialisation
    >>> again.code == pruned.code
    True
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.errors import InputError, PlanError
from fxprune.meta import (
    DENSE_MACS_KEY,
    INPUT_DTYPES_KEY,
    INPUT_SHAPES_KEY,
    MACS_RATIO_KEY,
    PLAN_DATA_KEY,
    PLAN_KEY,
    PREPARED_KEY,
)

WHERE = "fxprune.apply_plan"
FORMAT = 1


def _versions() -> dict[str, str]:
    try:
        from importlib.metadata import version

        ours = version("fxprune")
    except Exception:  # noqa: BLE001 - a source checkout that was never installed
        ours = "unknown"
    return {"fxprune": ours, "torch": torch.__version__}


@dataclasses.dataclass
class Plan:
    """What a pruned model kept (see the module docstring). ``params`` maps each sliced
    parameter of the ORIGINAL model to ``{dim: kept indices}``; ``groups`` has one summary per
    channel group, with ``keep`` (kept positions per head) on the pruned ones."""

    params: dict[str, dict[int, list[int]]]
    param_shapes: dict[str, list[int]]
    groups: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    prepare: bool = False
    training: bool = False          # the mode the model was traced in (eval: False)
    after: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=_versions)
    format: int = FORMAT

    # -- building -----------------------------------------------------------------------
    @classmethod
    def from_slice(cls, gm: torch.fx.GraphModule, analysis, keep: dict[int, np.ndarray],
                   param_plan: dict, param_shapes: dict[str, list[int]]) -> Plan:
        """The plan of slicing ``gm`` (analysed as ``analysis``) with group masks ``keep``."""
        groups = []
        for g in analysis.groups:
            row = {"index": g.index, "kind": g.kind, "num_heads": g.num_heads, "size": g.size,
                   "site": g.site, "frozen": g.frozen, "layout": list(g.layout.shape)}
            if g.index in keep:
                mask = np.asarray(keep[g.index], dtype=bool).reshape(g.layout.shape)
                row["keep"] = [np.nonzero(r)[0].tolist() for r in mask]
            groups.append(row)
        sites = [{k: v for k, v in s.items() if k not in ("q", "k", "v", "proj")}
                 for s in analysis.to_dict()["attention"]]
        shapes = gm.meta.get(INPUT_SHAPES_KEY) or []
        dtypes = gm.meta.get(INPUT_DTYPES_KEY) or [torch.float32] * len(shapes)
        inputs = [{"shape": list(s), "dtype": str(d).replace("torch.", "")}
                  for s, d in zip(shapes, dtypes)]
        params = {name: {int(d): [int(i) for i in kept.tolist()] for d, kept in dims.items()}
                  for name, dims in param_plan.items()}
        return cls(params, param_shapes, groups, sites, inputs,
                   prepare=bool(gm.meta.get(PREPARED_KEY)), training=bool(gm.training))

    # -- plain data ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params"] = {n: {str(d): k for d, k in dims.items()} for n, dims in self.params.items()}
        return out

    def to_json(self, indent: int | None = None) -> str:
        """The plan as JSON text (``Plan.from_json`` reads it back)."""
        return json.dumps(self.to_dict(), indent=indent)  # model order: first mismatch first

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or "params" not in data:
            raise PlanError(WHERE, "not an fxprune plan (no 'params')")
        if int(data.get("format", FORMAT)) > FORMAT:
            raise PlanError(WHERE, f"plan format {data['format']} is newer than this fxprune "
                            f"reads ({FORMAT})", hint="upgrade fxprune")
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields}
        data["params"] = {n: {int(d): list(k) for d, k in dims.items()}
                          for n, dims in data["params"].items()}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(WHERE, f"the plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # -- uses ---------------------------------------------------------------------------
    def torch_plan(self) -> dict[str, dict[int, torch.Tensor]]:
        """``{parameter: {dim: LongTensor of kept indices}}``, as in ``meta["fxprune.plan"]``."""
        return {n: {d: torch.as_tensor(k, dtype=torch.long) for d, k in dims.items()}
                for n, dims in self.params.items()}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Zero tensors shaped and typed like the inputs the plan was made with."""
        return tuple(torch.zeros(i["shape"], dtype=getattr(torch, i["dtype"]))
                     for i in self.inputs)

    def keep_masks(self, analysis) -> dict[int, np.ndarray]:
        """The plan's keep mask per group, checked against ``analysis``'s groups."""
        masks = {}
        for row in self.groups:
            if "keep" not in row:
                continue
            i = row["index"]
            if i >= len(analysis.groups):
                raise PlanError(WHERE, f"the plan prunes group {i} ({row['kind']}); the model's "
                                f"analysis has {len(analysis.groups)} groups",
                                hint="apply the plan to the architecture it was made for")
            g = analysis.groups[i]
            if g.kind != row["kind"] or list(g.layout.shape) != list(row["layout"]):
                raise PlanError(WHERE, f"group {i} is {g.kind} {list(g.layout.shape)} in the "
                                f"model, {row['kind']} {row['layout']} in the plan",
                                hint="apply the plan to the architecture it was made for")
            mask = np.zeros(g.layout.shape, dtype=bool)
            for h, kept in enumerate(row["keep"]):
                mask[h, kept] = True
            masks[i] = mask
        return masks


def model_shapes(model) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter and buffer of a Module (non-persistent buffers too) or an
    ExportedProgram, by qualified name."""
    exported_cls = getattr(torch.export, "ExportedProgram", None)
    if exported_cls is not None and isinstance(model, exported_cls):
        state = dict(model.state_dict)
    else:
        state = dict(model.named_buffers(remove_duplicate=False))  # non-persistent ones too
        state.update(dict(model.named_parameters(remove_duplicate=False)))
    return {n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor)}


def check_model(model, plan: Plan) -> None:
    """Raise :class:`PlanError` naming the first parameter of ``plan`` that ``model`` lacks or
    has with another shape."""
    have = model_shapes(model)
    for name, shape in plan.param_shapes.items():
        if name.rsplit(".", 1)[-1].startswith("_tensor_constant"):
            continue  # a constant fx lifted out of forward, not a tensor of the model
        if name not in have:
            raise PlanError(WHERE, f"the model has no parameter or buffer {name!r}, which the "
                            "plan was made with", hint="apply the plan to the architecture it "
                            "was made for (same module names)")
        if tuple(have[name]) != tuple(shape):
            raise PlanError(WHERE, f"parameter {name!r} has shape {tuple(have[name])} in the "
                            f"model and {tuple(shape)} in the plan",
                            hint="apply the plan to the architecture it was made for")


def apply_plan(model, plan: Plan, example_inputs=None) -> torch.fx.GraphModule:
    """Re-create the pruned GraphModule ``plan`` describes from ``model`` (a fresh copy of the
    architecture the plan was made on; its weights are used, the model is not modified).

    ``example_inputs`` defaults to zeros shaped like the plan's inputs. A model that does not
    match the plan raises :class:`PlanError` naming the first mismatching parameter.
    """
    from fxprune.analysis.engine import analyze
    from fxprune.passbase import copy_graph_module
    from fxprune.passes.slice import Slice
    from fxprune.pipeline import prepare
    from fxprune.tracing import trace

    if not isinstance(plan, Plan):
        raise InputError(WHERE, f"expected an fxprune.Plan, got {type(plan).__name__}",
                         hint="read one with fxprune.Plan.from_json(text)")
    check_model(model, plan)
    inputs = plan.example_inputs() if example_inputs is None else example_inputs
    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):  # modes trace to different graphs (dropout, ...)
        model.train(plan.training)
    try:
        gm = copy_graph_module(trace(model, inputs))
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    if plan.prepare:
        gm, _ = prepare(gm)
    analysis = analyze(gm)
    keep = plan.keep_masks(analysis)
    pruned = Slice(keep=keep, inplace=True)(gm).graph_module
    _check_result(pruned.meta[PLAN_KEY], plan)
    if "reweight" in plan.after:
        from fxprune.passes.reweight import Reweight

        analyze(pruned)
        pruned = Reweight(inplace=True)(pruned).graph_module
    pruned.meta[PLAN_DATA_KEY] = plan
    for key, meta_key in (("macs_ratio", MACS_RATIO_KEY), ("dense_macs", DENSE_MACS_KEY)):
        if key in plan.info:
            pruned.meta[meta_key] = plan.info[key]
    return pruned


def zeroed_copy(model: torch.nn.Module, plan) -> torch.nn.Module:
    """A deep copy of the ORIGINAL ``model`` with every entry the plan drops set to zero: the
    reference a pruned model must equal, checkable without trusting the slicer.

    ``plan`` is a pruned GraphModule, an :class:`Plan`, or its ``{parameter: {dim: kept}}``
    mapping (``meta["fxprune.plan"]``). A parameter the model lacks raises :class:`PlanError`.

    Example:
        >>> import torch, fxprune
        >>> from fxprune.models.reference import tiny_vit
        >>> _ = torch.manual_seed(0)
        >>> model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
        >>> pruned = fxprune.prune(model, x, macs_ratio=0.6)
        >>> reference = fxprune.zeroed_copy(model, pruned)
        >>> bool(torch.allclose(pruned(x), reference(x), atol=1e-5))
        True
    """
    if isinstance(plan, torch.fx.GraphModule):
        if PLAN_KEY not in plan.meta:
            raise InputError("fxprune.zeroed_copy", "the GraphModule carries no plan "
                             f"(meta[{PLAN_KEY!r}])", hint="pass a model returned by "
                             "fxprune.prune, fxprune.apply_plan or the Slice pass")
        plan = plan.meta[PLAN_KEY]
    elif isinstance(plan, Plan):
        plan = plan.params
    zeroed = copy.deepcopy(model)
    tensors = dict(zeroed.named_parameters(remove_duplicate=False))
    tensors.update(dict(zeroed.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, dims in plan.items():
            if name not in tensors:
                raise PlanError("fxprune.zeroed_copy", f"the plan names {name!r}, which the "
                                "model does not have", hint="pass the model the plan was "
                                "made from")
            t = tensors[name]
            for dim, kept in dims.items():
                drop = torch.ones(t.shape[int(dim)], dtype=torch.bool)
                drop[torch.as_tensor(kept, dtype=torch.long)] = False
                index = [slice(None)] * t.ndim
                index[int(dim)] = drop
                t[tuple(index)] = 0
    return zeroed


def _check_result(got: dict, plan: Plan) -> None:
    names = sorted(set(got) | set(plan.params))
    for name in names:
        mine = {int(d): k.tolist() for d, k in got.get(name, {}).items()}
        if mine != plan.params.get(name, {}):
            raise PlanError(WHERE, f"parameter {name!r} is sliced differently from the plan "
                            f"(kept counts {_counts(mine)} vs {_counts(plan.params.get(name))})",
                            hint="apply the plan to the architecture (and fxprune version) it "
                            "was made for")


def _counts(dims) -> dict[int, int]:
    return {d: len(k) for d, k in (dims or {}).items()}
