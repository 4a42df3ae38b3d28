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
    """A benchmark script as a module (they import ``_env`` from their own folder), freshly
    executed and registered under its name, so that worker processes can import its functions
    (``--jobs``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module_name = name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, BENCH / name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod
