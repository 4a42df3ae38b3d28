"""The examples in the docstrings run and print what they say (the docs match the code).

Five of them had drifted (found when this file was added): they now run here in CI.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("fxprune", "fxprune.passes", "fxprune.models")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        package = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{pkg}."):
            if not info.name.endswith("__main__"):  # importing it runs the command line
                names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, one_thread):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
