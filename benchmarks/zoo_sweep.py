"""Sweep of every attention-bearing model family fxprune can find installed: timm (families
are timm's model modules), torchvision classification models (families are its modules) and
a set of Hugging Face vision architectures built from small configs and exported with
``torch.export``.

For each family the smallest variant that has attention is taken (random weights, the model's
default input size, batch 1) and, in its own process with a time limit: ``fxprune.trace``,
``fxprune.analyze`` (after the preparation passes), ``fxprune.prune(macs_ratio=0.7)`` and the
exactness check against the ORIGINAL model with the plan's entries zeroed. Before and after
each fxprune call the model's state (state_dict, plain attributes, training flags) is
fingerprinted: fxprune must leave it exactly as it was.

Writes ``benchmarks/results/zoo_sweep.json`` and a markdown table; with ``--results-md`` the
table replaces the sweep section of ``benchmarks/RESULTS.md``.

    OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --jobs 1 --results-md
    python benchmarks/zoo_sweep.py --families levit,cait,hf_vit --jobs 2
    python benchmarks/zoo_sweep.py --list            # the families and chosen variants only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from zoo_families import HF_ARCHS, NO_DOT_PRODUCT, enumerate_families

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET = 0.7
TOLERANCE = 0.02        # "exact to the target": reached ratio within this of TARGET
EXACT_REL = 1e-4        # zeroed original vs pruned, relative to the output's magnitude
SECTION = "## Zoo sweep"

# -- one family, in a worker process --------------------------------------------------------

def build(spec: dict):
    import torch

    torch.manual_seed(0)
    if spec["source"] == "timm":
        import timm
        model = timm.create_model(spec["model"], pretrained=False)
    elif spec["source"] == "torchvision":
        import torchvision
        model = torchvision.models.get_model(spec["model"])
    else:
        import transformers
        cfg_name = spec["model"]
        config = getattr(transformers, cfg_name)(**HF_ARCHS[spec["family"]][1])
        if hasattr(config, "num_labels"):
            config.num_labels = 10
        try:
            model = transformers.AutoModelForImageClassification.from_config(config)
        except (ValueError, KeyError, TypeError):
            model = transformers.AutoModel.from_config(config)
    model.eval()
    x = torch.randn(*spec["input"])
    return model, x


def fingerprint(model) -> str:
    """Digest of a module's state: every parameter and buffer (name, shape, values), every
    submodule's training flag and plain attributes (containers walked, tensors by value)."""
    import torch

    h = hashlib.sha256()

    def feed(value, depth=0):
        if depth > 6:
            h.update(b"deep")
        elif isinstance(value, torch.Tensor):
            h.update(f"T{tuple(value.shape)}{value.dtype}{type(value).__name__}".encode())
            if value.device.type != "meta":
                h.update(value.detach().cpu().contiguous().numpy().tobytes()
                         if value.dtype != torch.bfloat16 else
                         value.detach().float().cpu().numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for k in sorted(value, key=repr):
                h.update(repr(k).encode())
                feed(value[k], depth + 1)
            h.update(b"}")
        elif isinstance(value, (list, tuple, set, frozenset)):
            h.update(type(value).__name__.encode())
            for v in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value):
                feed(v, depth + 1)
        elif isinstance(value, (int, float, str, bool, type(None), torch.dtype, torch.device)):
            h.update(repr(value).encode())
        elif isinstance(value, torch.nn.Module):
            h.update(b"module")
        else:  # functions, configs, ...: their type and identity-free description
            h.update(type(value).__qualname__.encode())

    for name, t in model.state_dict(keep_vars=True).items():
        h.update(name.encode())
        feed(t)
    for name, mod in model.named_modules():
        h.update(f"{name}:{mod.training}".encode())
        for k, v in sorted(vars(mod).items()):
            if k in ("_parameters", "_buffers", "_modules") or k.startswith("_forward") or \
                    k.startswith("_backward") or k.startswith("_state_dict") or \
                    k.startswith("_load_state_dict"):
                continue
            h.update(k.encode())
            feed(v)
    return h.hexdigest()


def _first_tensor(out):
    import torch

    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, dict):
        out = next(v for v in out.values() if v is not None)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return _first_tensor(out) if not isinstance(out, torch.Tensor) else out


def _error(exc: BaseException, stage: str) -> dict:
    import fxprune

    lines = str(exc).strip().splitlines()
    return {"stage": stage, "type": type(exc).__name__, "typed": isinstance(
        exc, fxprune.FxPruneError), "message": "\n".join(lines[:3])[:600],
        "where": traceback.extract_tb(exc.__traceback__)[-1].name if exc.__traceback__ else ""}


def run_one(spec: dict) -> dict:
    """trace, analyze, prune and check one family; every result lands in the returned dict."""
    import warnings
    from collections import Counter

    import torch

    torch.set_num_threads(1)
    import fxprune
    from fxprune.pipeline import prepare

    res = {"family": spec["family"], "source": spec["source"], "model": spec["model"],
           "input": spec["input"], "unchanged": True, "changed_by": []}
    t0 = time.perf_counter()
    model, x = build(spec)
    subject = model
    if spec["source"] == "hf":
        subject = torch.export.export(model, (x,))
    res["build_s"] = round(time.perf_counter() - t0, 2)
    state = fingerprint(model)

    def check(stage):
        nonlocal state
        # seconds from the start of the trace to the end of each stage: where a slow family
        # spends its time
        res.setdefault("stage_s", {})[stage] = round(time.perf_counter() - t1, 2)
        now = fingerprint(model)
        if now != state:
            res["unchanged"] = False
            res["changed_by"].append(stage)
            state = now

    stage = "trace"
    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = fxprune.trace(subject, x)
            check("trace")
            res["traced_from"] = gm.meta.get("fxprune.traced_from")
            res["trace_note"] = gm.meta.get("fxprune.trace_fallback")
            stage = "analyze"
            gm, _ = prepare(gm)
            analysis = fxprune.analyze(gm)
            check("analyze")
            res["sites"] = len(analysis.attention)
            res["site_kinds"] = dict(Counter(s.kind for s in analysis.attention))
            res["groups_prunable"] = sum(1 for g in analysis.groups if g.prunable)
            res["groups_frozen"] = dict(Counter(g.frozen for g in analysis.groups
                                                if g.frozen and g.kind != "embed"))
            del gm, analysis
            stage = "prune"
            pruned = fxprune.prune(subject, x, macs_ratio=TARGET)
            check("prune")
            res["macs_ratio"] = pruned.meta.get("fxprune.macs_ratio")
            report = pruned.meta.get("fxprune.report")
            if report is not None:
                res["report"] = json.loads(json.dumps(report, default=str))
            stage = "exactness"
            plan = pruned.meta["fxprune.plan"]
            res["plan_params"] = len(plan)
            with torch.no_grad():
                ref = _first_tensor(fxprune.zeroed_copy(model, plan)(x))
                out = _first_tensor(pruned(x))
            res["stage_s"]["exactness"] = round(time.perf_counter() - t1, 2)
            err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            res["rel_err"] = err
            res["exact"] = err < EXACT_REL
        res["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                  if "fxprune" in str(w.message)})[:5]
    except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
        res["error"] = _error(exc, stage)
        try:
            check(stage)
        except Exception:  # noqa: BLE001 - a model that cannot be fingerprinted again
            pass
    res["seconds"] = round(time.perf_counter() - t1, 2)
    res["status"] = status_of(res)
    return res


def status_of(res: dict) -> str:
    if not res.get("unchanged", True):
        return "modified"
    if "error" in res:
        return "refused" if res["error"].get("typed") else "crashed"
    if not res.get("exact"):
        return "wrong"
    ratio = res.get("macs_ratio")
    on_target = ratio is not None and abs(ratio - TARGET) <= TOLERANCE
    if not res.get("sites"):
        told = "no dot-product" in str((res.get("report") or {}).get("attention", ""))
        if res.get("family") not in NO_DOT_PRODUCT or not told:
            return "missed"
        if on_target:
            return "no-dpa"
    if on_target:
        return "exact"
    return "below" if ratio is not None and ratio < TARGET else "partial"


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        res = run_one(spec)
    except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be built
        res = {"family": spec["family"], "source": spec["source"], "model": spec["model"],
               "status": "crashed", "error": {"stage": "build", "type": type(exc).__name__,
                                              "typed": False,
                                              "message": str(exc).splitlines()[0][:600]
                                              if str(exc) else ""}}
    print("@@RESULT@@" + json.dumps(res, default=str))


def run_family(family: str, spec: dict, timeout: float) -> dict:
    spec = dict(spec, family=family)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                               json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(spec, status="timeout", seconds=round(time.perf_counter() - t0, 1),
                    error={"stage": "?", "type": "Timeout", "typed": False,
                           "message": f"over {timeout:.0f} s"})
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@@RESULT@@"):
            res = json.loads(line[len("@@RESULT@@"):])
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, status="crashed", wall_s=round(time.perf_counter() - t0, 1),
                error={"stage": "process", "type": f"exit {proc.returncode}", "typed": False,
                       "message": " | ".join(tail)[:600]})


# -- reporting -----------------------------------------------------------------------------

def _frozen_text(res: dict) -> str:
    frozen = res.get("groups_frozen") or {}
    parts = [f"{n}x {reason[:70]}" for reason, n in sorted(frozen.items(), key=lambda kv: -kv[1])]
    return "; ".join(parts[:3]) + (" ..." if len(parts) > 3 else "")


def table(results: list[dict]) -> str:
    head = ("| family | model | sites | groups prunable / frozen (why) | MACs ratio | exact "
            "| s | status |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        err = r.get("error")
        why = _frozen_text(r)
        if err:
            why = f"{err.get('stage')}: {err.get('type')}: {err.get('message', '')[:120]}"
        why = why.replace("|", "/").replace("\n", " ")
        frozen_n = sum((r.get("groups_frozen") or {}).values())
        groups = (f"{r['groups_prunable']} / {frozen_n}" if "groups_prunable" in r else "-")
        exact = {True: "yes", False: "NO"}.get(r.get("exact"), "-")
        if r.get("exact") is not None:
            exact += f" ({r['rel_err']:.0e})"
        ratio = r.get("macs_ratio")
        rows.append(f"| {r['family']} | {r.get('model', '')} | {r.get('sites', '-')} | "
                    f"{groups}{(': ' + why) if why else ''} | "
                    f"{'-' if ratio is None else f'{ratio:.3f}'} | {exact} | "
                    f"{r.get('wall_s', r.get('seconds', '-'))} | {r['status']} |")
    return head + "\n".join(rows) + "\n"


def summary(results: list[dict]) -> dict:
    from collections import Counter

    return dict(Counter(r["status"] for r in results))


def bar_line(results: list[dict]) -> str:
    """How the sweep reads against the bar: families exact within the tolerance, counting the
    ones without dot-product attention (``no-dpa``) apart."""
    n = len(results)
    exact = sum(r["status"] == "exact" for r in results)
    nodpa = sum(r["status"] == "no-dpa" for r in results)
    return (f"Exact within {TOLERANCE} of the target: {exact + nodpa} of {n} "
            f"({(exact + nodpa) / max(n, 1):.0%}; {exact} with dot-product attention found, "
            f"{nodpa} without one by design); {exact} of {n - nodpa} "
            f"({exact / max(n - nodpa, 1):.0%}) leaving those aside.")


def write_results_md(text: str) -> None:
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION)
    if start >= 0:
        nxt = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated family names (default: all found)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per family")
    ap.add_argument("--out", default=str(HERE / "results" / "zoo_sweep.json"))
    ap.add_argument("--results-md", action="store_true", help="write the table into RESULTS.md")
    ap.add_argument("--list", action="store_true", help="print the families and stop")
    ap.add_argument("--rerender", action="store_true",
                    help="rebuild the statuses and the table from --out without running")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.rerender:
        doc = json.loads(Path(args.out).read_text())
        for r in doc["results"]:
            r["status"] = status_of(r) if r["status"] not in ("timeout",) else r["status"]
        doc["summary"] = summary(doc["results"])
        return _write(doc, args)
    t0 = time.perf_counter()
    wanted = [f.strip() for f in (args.families or "").split(",") if f.strip()]
    fams = enumerate_families(set(wanted) if wanted else None)
    if wanted:
        missing = [f for f in wanted if f not in fams]
        if missing:
            print(f"unknown families: {', '.join(missing)}", file=sys.stderr)
            return 2
        fams = {f: fams[f] for f in wanted}
    enum_s = time.perf_counter() - t0
    if args.list:
        for f, spec in fams.items():
            print(f"{f:32s} {spec['source']:12s} {spec['model']:40s} {spec['input']}")
        print(f"{len(fams)} families, enumerated in {enum_s:.1f} s")
        return 0
    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_family, f, spec, args.timeout): f for f, spec in fams.items()}
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results.append(r)
            print(f"{r['family']:30s} {r['status']:9s} {r.get('macs_ratio')} "
                  f"{(r.get('error') or {}).get('message', '')[:100]!r}", flush=True)
    order = list(fams)
    results.sort(key=lambda r: order.index(r["family"]))
    wall = time.perf_counter() - t0
    import platform

    import torch
    doc = {"target": TARGET, "tolerance": TOLERANCE, "jobs": args.jobs, "timeout": args.timeout,
           "wall_s": round(wall, 1), "enumerate_s": round(enum_s, 1),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip(),
           "summary": summary(results), "results": results}
    return _write(doc, args)


def _write(doc: dict, args) -> int:
    results, wall = doc["results"], doc["wall_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = (f"{SECTION}\n\n`OMP_NUM_THREADS=1 python benchmarks/zoo_sweep.py --jobs {doc['jobs']} "
          f"--timeout {doc.get('timeout', 240):g} --results-md` at commit {doc['commit']} "
          f"({doc['machine']}, torch {doc['torch']}): "
          f"{len(results)} families, wall time {wall / 60:.1f} min. Target macs_ratio {TARGET}; "
          f"`exact`: the pruned model equals the original with the plan's entries zeroed "
          f"(relative error < {EXACT_REL:g}); status `exact` = exact and within {TOLERANCE} of "
          f"the target, `partial` = exact but above it, `below` = exact but further below it, "
          f"`refused` = a typed fxprune error, "
          f"`crashed` = any other error, `missed` = no attention site found in a family that "
          f"has dot-product attention, `no-dpa` = exact within {TOLERANCE} of the target in a "
          f"family without dot-product attention (hand-annotated: "
          + "; ".join(f"{k}: {v}" for k, v in NO_DOT_PRODUCT.items())
          + "), `timeout` = over the time limit, `modified` = an "
          "fxprune call changed the model. Summary: "
          + ", ".join(f"{k} {v}" for k, v in sorted(doc["summary"].items())) + ". "
          + bar_line(results) + "\n\n"
          + table(results))
    print(md)
    if args.results_md:
        write_results_md(md)
    return 0

if __name__ == "__main__":
    sys.exit(main())
