"""Saving pruned models without pickle.

:func:`save` writes a directory: ``model.safetensors`` (the weights), ``plan.json``
(:class:`fxprune.Plan`) and, where ``torch.export`` takes the model, ``program.pt2`` (an
ExportedProgram with a dynamic batch dimension; fxprune is not needed to load it).
:func:`load` reads it back: with ``model_factory`` (a callable returning a fresh copy of the
original architecture) it re-applies the plan and loads the weights, without it it loads
``program.pt2``. No file is unpickled. :func:`save_artifact` picks the format from a path's
suffix (the CLI's ``--out``): a directory, ``.pt2`` or ``.onnx``.

Example:
    >>> import tempfile, torch, fxprune
    >>> from fxprune.models.reference import tiny_vit
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> pruned = fxprune.prune(tiny_vit(), x, macs_ratio=0.6, align=4)
    >>> d = tempfile.mkdtemp()
    >>> sorted(fxprune.save(pruned, d, program=False))
    ['model.safetensors', 'plan.json']
    >>> again = fxprune.load(d, model_factory=tiny_vit)
    >>> torch.equal(again(x), pruned(x))
    True
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx

from fxprune.errors import FxPruneError, InputError, PlanError
from fxprune.meta import PLAN_DATA_KEY
from fxprune.tracing import export_dynamic_batch

WEIGHTS = "model.safetensors"
PLAN = "plan.json"
PROGRAM = "program.pt2"
MANIFEST = "fxprune.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise InputError("fxprune.save", "safetensors is not installed",
                         hint="pip install 'fxprune[export]' (or pip install safetensors)"
                         ) from exc
    return st


def _plan_of(pruned, where: str):
    plan = getattr(pruned, "meta", {}).get(PLAN_DATA_KEY)
    if plan is None:
        raise InputError(where, "the model carries no fxprune plan (meta['fxprune.plan_data'])",
                         hint="pass the GraphModule fxprune.prune / refine / apply_plan returned")
    return plan


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def export_program(pruned: torch.nn.Module, example_inputs, dynamic_batch: bool = True):
    """``torch.export.export`` of ``pruned``; with ``dynamic_batch`` the first dim of every
    input is dynamic (exported at batch 2 so that it is not specialised to 1). Falls back to
    static shapes, with a warning, where the graph fixes the batch size."""
    inputs = _as_tuple(example_inputs)
    if dynamic_batch:
        ep, exc = export_dynamic_batch(pruned, inputs)
        if ep is not None:
            return ep
        warnings.warn(f"fxprune: the batch dimension could not be made dynamic "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the "
                      "program runs at the example batch size only", stacklevel=2)
    return torch.export.export(pruned, inputs)


def save(pruned: torch.fx.GraphModule, directory, example_inputs=None, *,
         program: bool = True, dynamic_batch: bool = True) -> dict[str, str]:
    """Write ``pruned`` to ``directory`` (created): weights, plan and, where exportable,
    the program. Returns ``{file name: what it is}``; why a program is missing is in
    ``fxprune.json`` and a warning."""
    st = _safetensors()
    plan = _plan_of(pruned, "fxprune.save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # one copy per name: safetensors refuses tensors sharing memory (tied weights)
    state = {k: v.detach().contiguous().clone() for k, v in pruned.state_dict().items()}
    st.save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "writer": "fxprune"})
    (out / PLAN).write_text(plan.to_json(indent=1))
    written = {WEIGHTS: "weights (safetensors)", PLAN: "fxprune.Plan (JSON)"}
    manifest: dict[str, Any] = {"weights": WEIGHTS, "plan": PLAN, "program": None}
    if program:
        inputs = plan.example_inputs() if example_inputs is None else example_inputs
        try:
            ep = export_program(pruned, inputs, dynamic_batch)
            torch.export.save(ep, str(out / PROGRAM))
            written[PROGRAM] = "torch.export program"
            manifest["program"] = PROGRAM
        except Exception as exc:  # noqa: BLE001 - the weights + plan are still a full save
            manifest["program_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            warnings.warn(f"fxprune.save: no {PROGRAM} ({manifest['program_error']}); load "
                          "with fxprune.load(dir, model_factory=...)", stacklevel=2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return written


def load(directory, model_factory=None, example_inputs=None) -> torch.nn.Module:
    """Load what :func:`save` wrote. With ``model_factory`` (returns a fresh model of the
    original architecture, or ``(model, example_input)``) the plan is re-applied and the
    saved weights loaded (a GraphModule, carrying the plan); without it, ``program.pt2`` is
    loaded (``ExportedProgram.module()``) and its weights are replaced by the saved ones.
    The module comes back in the mode the plan was made in (eval for ``fxprune.prune``)."""
    from fxprune.planning.plan import Plan, apply_plan

    st = _safetensors()
    src = Path(directory)
    if not (src / PLAN).is_file() or not (src / WEIGHTS).is_file():
        raise InputError("fxprune.load", f"{src} has no {PLAN} and {WEIGHTS}",
                         hint="pass a directory written by fxprune.save")
    plan = Plan.from_json((src / PLAN).read_text())
    state = st.load_file(str(src / WEIGHTS))
    if model_factory is not None:
        model = model_factory()
        if isinstance(model, tuple):
            model = model[0]
        module = apply_plan(model, plan, example_inputs)
    elif (src / PROGRAM).is_file():
        with _weights_only():
            module = torch.export.load(str(src / PROGRAM)).module()
        module.meta[PLAN_DATA_KEY] = plan
    else:
        raise InputError("fxprune.load", f"{src} has no {PROGRAM}",
                         hint="pass model_factory=<callable returning a fresh model> to "
                         "rebuild it from the plan")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (missing and model_factory is not None):
        raise PlanError("fxprune.load", "the saved weights do not fit the rebuilt model "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                        hint="load with the factory of the architecture the plan was made on")
    if model_factory is not None:  # an unlifted program keeps the mode it was exported in
        module.train(plan.training)
    return module


@contextlib.contextmanager
def _weights_only():
    """``torch.export.load`` falls back to ``torch.load(weights_only=False)`` (pickle) for
    what its safe reader refuses; while loading a program, every ``torch.load`` is made
    ``weights_only=True`` so that a tampered file fails instead of running code."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def save_onnx(pruned: torch.nn.Module, path, example_inputs, dynamic_batch: bool = True):
    """``torch.onnx.export(..., dynamo=True)`` of ``pruned`` to ``path`` (needs onnx and
    onnxscript: ``pip install 'fxprune[export]'``)."""
    inputs = _as_tuple(example_inputs)
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        inputs = tuple(t.expand(max(2, t.shape[0]), *t.shape[1:]).contiguous() if t.ndim
                       else t for t in inputs)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        kwargs["dynamic_shapes"] = tuple({0: batch} if t.ndim else None for t in inputs)
    try:
        torch.onnx.export(pruned, inputs, str(path), dynamo=True, **kwargs)
    except ImportError as exc:
        raise InputError("fxprune.save_onnx", f"ONNX export needs onnx and onnxscript ({exc})",
                         hint="pip install 'fxprune[export]'") from exc


def save_artifact(pruned: torch.nn.Module, out, example_inputs) -> str:
    """Save by suffix: no suffix (or an existing directory) a directory (:func:`save`),
    ``.pt2`` (torch.export, dynamic batch), ``.onnx`` (dynamo exporter), ``.pt`` (torch.save,
    a pickle). Returns what was written."""
    path = Path(out)
    where = "fxprune.save_artifact"
    if path.is_dir() or not path.suffix:
        save(pruned, path, example_inputs)
        return "directory: model.safetensors + plan.json (+ program.pt2)"
    try:
        if path.suffix in (".pt", ".pth"):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pruned, str(path))
            return "pickled GraphModule (torch.save; torch.load needs weights_only=False)"
        if path.suffix == ".pt2":
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(export_program(pruned, example_inputs), str(path))
            return "torch.export program (dynamic batch where the graph allows)"
        if path.suffix == ".onnx":
            path.parent.mkdir(parents=True, exist_ok=True)
            save_onnx(pruned, path, example_inputs)
            return "ONNX (torch.onnx.export, dynamo=True)"
    except FxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as a typed error with the remedy
        raise FxPruneError(where, f"exporting the pruned model to {path.name} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                           hint="save a directory instead (weights + plan, no export needed), "
                           "and report the model") from exc
    raise InputError(where, f"unknown output suffix {path.suffix!r}",
                     hint="use a directory (weights + plan), .pt2, .onnx or .pt")
