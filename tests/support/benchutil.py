"""Load a benchmark script from ``benchmarks/`` as a module, for the smoke tests.

Example:
    >>> from benchutil import load_bench
    >>> load_bench("digits_ablation.py").__name__
    'digits_ablation'
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench(name: str):
    """A benchmark script as a module (they import ``_env`` from their own folder)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCH / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
