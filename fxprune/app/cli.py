"""The ``fxprune`` command line (also ``python -m fxprune``).

Subcommands::

    fxprune analyze MODEL [--json] [--input-size H W] [-v]
    fxprune prune   MODEL [--macs-ratio 0.7] [--criterion similarity] [--align 8]
                          [--out pruned.pt2] [--json] [--input-size H W] [--strict]
    fxprune demo
    fxprune bench   [--models NAME ...] [--out FILE] [--repeats 5] [--threads 2]

``MODEL`` is a spec read by :func:`fxprune.app.models_registry.load_model`: ``timm:<name>``,
``torchvision:<name>``, ``fxprune:<factory>``, ``hf:<model id or directory>`` or
``path/to/file.py:<factory>``.

Errors fxprune raises on purpose (:class:`fxprune.errors.FxPruneError`) are printed as one
paragraph on stderr with exit status 2; ``--debug`` adds the traceback. ``prune`` prints
what it could not prune (frozen groups and why); with ``--strict`` a missed MACs target
exits with status 3 (``EXIT_TARGET_MISSED``) and writes nothing to ``--out``. Anything else is a bug
and shows its traceback.

Example:
    >>> main(["analyze", "fxprune:tiny_vit"])  # doctest: +ELLIPSIS
    model: fxprune:tiny_vit  input: (1, 3, 32, 32)  MACs: ...
    ...
    0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from fxprune.app.report import plan_rows, prune_table
from fxprune.errors import FxPruneError, InputError
from fxprune.meta import PLAN_KEY, REPORT_KEY, SUMMARY_KEY

PROG = "fxprune"
#: exit status of `fxprune prune --strict` when the MACs target is missed
EXIT_TARGET_MISSED = 3
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = REPO_ROOT / "benchmarks" / "bench_analyze.py"

__all__ = ["build_parser", "main"]


# -- shared helpers -----------------------------------------------------------------------

def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _shape_text(x: Any) -> str:
    shapes = [str(tuple(t.shape)) for t in _as_tuple(x) if isinstance(t, torch.Tensor)]
    return ", ".join(shapes) or "-"


def _fmt_macs(macs: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3f} {unit}"
    return str(macs)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _load(args) -> tuple[torch.nn.Module, Any]:
    from fxprune.app.models_registry import load_model

    return load_model(args.model, input_size=args.input_size)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, torch.fx.Node):
        return obj.name
    return str(obj)


def _warning_texts(caught, echo: bool) -> list[str]:
    """The messages of recorded warnings (for --json; library deprecation notices left out);
    re-emitted when ``echo``."""
    texts = []
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            texts.append(str(w.message))
        if echo:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return texts


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


# -- analyze ------------------------------------------------------------------------------

def analysis_report(model: torch.nn.Module, x: Any) -> tuple[Any, int, list]:
    """Trace, count MACs, prepare (decompose) and analyze: ``(analysis, macs, prepare log)``,
    the log being ``[(pass name, modified)]``."""
    import fxprune
    from fxprune.pipeline import prepare

    gm = fxprune.trace(model, x)
    macs = fxprune.count_macs(gm)  # the dense graph as traced (opaque leaves are counted too)
    gm, prepared = prepare(gm)
    return fxprune.analyze(gm), macs, prepared


class _debug_log:
    """With ``on``: debug records of the ``fxprune`` loggers on stderr while inside (the
    level and handlers are restored after, so a process calling :func:`main` twice is not
    left logging)."""

    def __init__(self, on: bool):
        self.on = on
        self.logger = logging.getLogger("fxprune")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def __enter__(self):
        if self.on:
            self.level = self.logger.level
            self.logger.addHandler(self.handler)
            self.logger.setLevel(logging.DEBUG)

    def __exit__(self, *exc):
        if self.on:
            self.logger.removeHandler(self.handler)
            self.logger.setLevel(self.level)


def cmd_analyze(args) -> int:
    model, x = _load(args)
    with _debug_log(getattr(args, "verbose", False)):
        analysis, macs, prepared = analysis_report(model, x)
    if args.json:
        d = analysis.to_dict()
        out = {"model": args.model,
               "input_shape": [list(t.shape) for t in _as_tuple(x)],
               "macs": macs,
               "prepared": True,
               "prepare_passes": [{"pass": n, "modified": bool(m)} for n, m in prepared],
               "sites": len(d["attention"]),
               "prunable_groups": sum(1 for g in analysis.groups if g.prunable),
               "frozen_groups": sum(1 for g in analysis.groups if g.frozen is not None)}
        out.update(d)
        _print_json(out)
        return 0
    print(f"model: {args.model}  input: {_shape_text(x)}  MACs: {_fmt_macs(macs)}")
    changed = [n for n, m in prepared if m]
    print(f"prepare: {', '.join(changed) if changed else 'no rewrites needed'}")
    print()
    print(str(analysis))
    return 0


# -- prune --------------------------------------------------------------------------------

def _save(pruned: torch.nn.Module, x: Any, out: str) -> str:
    """Save by ``--out``'s suffix (fxprune.serialization.save_artifact); returns what."""
    from fxprune.serialization import save_artifact

    return save_artifact(pruned, out, _as_tuple(x))


def _prune_options(args) -> dict:
    """``fxprune.prune`` keyword arguments from the prune subcommand's flags."""
    kwargs = {}
    if getattr(args, "dense_sites", None):
        kwargs["dense_sites"] = tuple(args.dense_sites)
    if getattr(args, "heads", None):
        kwargs["heads"] = args.heads
    if getattr(args, "keep_dense", None):
        kwargs["keep_dense"] = tuple(args.keep_dense)
    return kwargs


def cmd_prune(args) -> int:
    import fxprune

    if not 0.0 < args.macs_ratio <= 1.0:
        raise InputError(f"{PROG} prune", f"--macs-ratio must be in (0, 1], got "
                         f"{args.macs_ratio}", hint="e.g. --macs-ratio 0.7 keeps 70% of the MACs")
    if args.align < 1:
        raise InputError(f"{PROG} prune", f"--align must be a positive int, got {args.align}")
    model, x = _load(args)
    dense = fxprune.count_macs(model, x)
    kwargs = _prune_options(args)
    if hasattr(args, "seed"):
        kwargs["seed"] = args.seed  # the random criterion's seed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, x, macs_ratio=args.macs_ratio, criterion=args.criterion,
                       align=args.align, **kwargs)
    notes = _warning_texts(caught, echo=not args.json)
    after = fxprune.count_macs(pruned, x)
    plan = pruned.meta.get(PLAN_KEY, {}) if hasattr(pruned, "meta") else {}
    rows = plan_rows(model, plan)
    missed = _strict_missed(args, pruned)
    # under --strict a missed target is a failed run: no artifact a pipeline could ship
    saved = _save(pruned, x, args.out) if args.out and not missed else None
    if args.json:
        _print_json({"model": args.model,
                     "input_shape": [list(t.shape) for t in _as_tuple(x)],
                     "macs_ratio_target": args.macs_ratio, "criterion": args.criterion,
                     "align": args.align, "macs_dense": dense, "macs_pruned": after,
                     "macs_ratio": after / dense if dense else None,
                     "summary": getattr(pruned, "meta", {}).get(SUMMARY_KEY),
                     "report": getattr(pruned, "meta", {}).get(REPORT_KEY),
                     "plan": rows, "out": args.out, "saved": saved, "warnings": notes})
        return _strict_status(args, pruned)
    print(f"model: {args.model}  input: {_shape_text(x)}  criterion: {args.criterion}  "
          f"align: {args.align}")
    print(f"MACs: {_fmt_macs(dense)} -> {_fmt_macs(after)} "
          f"({after / dense if dense else float('nan'):.3f} of dense; target "
          f"{args.macs_ratio:g})")
    print()
    print(prune_table(pruned))
    report = getattr(pruned, "meta", {}).get(REPORT_KEY)
    if report:
        from fxprune.planning.report import format_report

        print()
        print(format_report(report))
    if args.out:
        print(f"\nsaved: {args.out} ({saved})")
    return _strict_status(args, pruned)


def _strict_missed(args, pruned) -> bool:
    """``--strict`` is set and the MACs target was missed."""
    report = getattr(pruned, "meta", {}).get(REPORT_KEY) or {}
    return bool(getattr(args, "strict", False) and report.get("target_met") is False)


def _strict_status(args, pruned) -> int:
    """0, or ``EXIT_TARGET_MISSED`` under ``--strict`` when the target was missed (nothing
    was then written to ``--out``)."""
    if _strict_missed(args, pruned):
        from fxprune.planning.report import report_blockers

        report = pruned.meta[REPORT_KEY]
        print(f"{PROG}: error: MACs target {args.macs_ratio:g} missed (reached "
              f"{report['reached']}); blocked by: {report_blockers(report)}"
              + (f"; nothing written to {args.out}" if args.out else ""), file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


# -- demo ---------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from fxprune.app.demo import main as demo_main

    given = {"model_name": args.model, "macs_ratio": args.macs_ratio, "out_dir": args.out}
    demo_main(**{k: v for k, v in given.items() if v is not None})
    return 0


# -- bench --------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    if not BENCH_SCRIPT.is_file():
        raise InputError(f"{PROG} bench", f"benchmark script not found at {BENCH_SCRIPT}",
                         hint="benchmarks live in the source checkout; run from a clone "
                         "installed with `pip install -e .`")
    cmd = [sys.executable, str(BENCH_SCRIPT), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    if args.out:
        cmd += ["--out", args.out]
    if args.models:
        cmd += ["--models", *args.models]
    return subprocess.call(cmd)


# -- parser and entry point ---------------------------------------------------------------

def _criteria() -> tuple[str, ...]:
    from fxprune.planning.criteria import CRITERIA

    return tuple(CRITERIA)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm:<name> | torchvision:<name> | fxprune:<factory> | "
                   "hf:<model id or directory> | path/to/file.py:<factory>")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="spatial size of the example input (default: the model's own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors")
    common.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                        help="seed of torch's global RNG (random weights, random criterion; "
                        "default 0)")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Structured pruning of vision transformers with torch.fx passes.",
        epilog="examples:\n"
               "  fxprune analyze timm:deit_small_patch16_224\n"
               "  fxprune analyze fxprune:tiny_vit --json\n"
               "  fxprune prune timm:deit_small_patch16_224 --macs-ratio 0.7 --out pruned.pt2\n"
               "  fxprune demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _add_analyze(sub, common)
    _add_prune(sub, common)
    _add_demo(sub, common)
    _add_bench(sub, common)
    return parser


def _add_analyze(sub, common) -> None:
    p = sub.add_parser("analyze", parents=[common], help="attention sites and channel groups",
                       description="Trace MODEL, decompose opaque attention, and print the "
                       "attention sites, channel groups (with the reason of any frozen group) "
                       "and the dense MACs.")
    _add_model_args(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log the analysis deciding to stderr: each rule that fires, each "
                   "freeze with its reason, each site and group found")
    p.set_defaults(func=cmd_analyze)


def _add_prune(sub, common) -> None:
    p = sub.add_parser("prune", parents=[common], help="one-shot structured pruning",
                       description="Prune MODEL to a MACs budget without training and print "
                       "what it could not prune; --out saves the result (see --out).")
    _add_model_args(p)
    p.add_argument("--macs-ratio", type=float, default=0.7,
                   help="target MACs as a fraction of the dense model (default 0.7)")
    p.add_argument("--criterion", default="similarity", choices=_criteria(),
                   help="channel ranking: similarity (AMAP eq. 1-3), l1, random or toast "
                   "(ToaSt's distance from the head's median) (default similarity)")
    p.add_argument("--align", type=int, default=8,
                   help="kept counts per head / group rounded to this multiple (default 8)")
    p.add_argument("--out", default=None,
                   help="where to save the pruned model, by suffix: DIR (model.safetensors + "
                   "plan.json + program.pt2; fxprune.load reads it), FILE.pt2 (torch.export, "
                   "dynamic batch), FILE.onnx (torch.onnx.export dynamo=True), FILE.pt "
                   "(torch.save: a pickle)")
    p.add_argument("--dense-sites", type=int, nargs="+", default=None, metavar="I",
                   help="attention sites (graph order, from 0) left dense")
    p.add_argument("--heads", choices=("channels", "whole"), default=None,
                   help="prune channels inside heads (default) or whole heads")
    p.add_argument("--keep-dense", action="append", default=None, metavar="PATTERN",
                   help="parameter-name glob (e.g. 'blocks.0.*'): every channel group coupled "
                   "to a matching parameter stays dense (repeatable)")
    p.add_argument("--strict", action="store_true",
                   help=f"a missed MACs target is an error (exit status {EXIT_TARGET_MISSED}, "
                   "nothing written to --out)")
    p.set_defaults(func=cmd_prune)


def _add_demo(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="the demo job (what `make demo` runs)",
                       description="Analyse and prune a timm ViT with random weights (default "
                       "DeiT-S to 0.7 of its MACs), check it against the zeroed original and "
                       "time it.")
    p.add_argument("--model", default=None, help="timm model name (default: the demo's)")
    p.add_argument("--macs-ratio", type=float, default=None, help="target MACs fraction")
    p.add_argument("--out", default=None, help="output folder (default: the demo's, runs/demo)")
    p.set_defaults(func=cmd_demo)


def _add_bench(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common],
                       help="analysis timings (benchmarks/bench_analyze.py)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="timm model names (default: vit_large, vit_base, deit_small)")
    p.add_argument("--out", default=None,
                   help="JSON result file (default benchmarks/results/analyze.json)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per step (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or fxprune error, 3 a
    missed target under ``prune --strict``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if getattr(args, "threads", None) and args.command != "bench":
        torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        return args.func(args)
    except FxPruneError as exc:
        if debug:
            traceback.print_exc()
        text = str(exc).rstrip()
        if not debug:
            text += "\n(run with --debug for the traceback)"
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fxprune analyze ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
