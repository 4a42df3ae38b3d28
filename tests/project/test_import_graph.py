"""fxprune's module-level imports form a DAG (no cycles), so any module can be imported on
its own and the layers (contracts -> analysis -> planning -> amap -> app) stay visible."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"fxprune": ROOT / "fxprune", "fxprune.passes": ROOT / "passes",
            "fxprune.models": ROOT / "models"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = path
    return out


def _top_level_imports(path: Path) -> set[str]:
    """Imports executed at import time (module body, not functions or TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_fxprune_import_graph_is_a_dag():
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _top_level_imports(path):
            if target in modules and target != name:
                graph.add_edge(name, target)
    # a package importing its own submodules is how it exports them, not a cycle
    for name in list(graph):
        for target in list(graph.successors(name)):
            if name in modules and modules[name].name == "__init__.py" and \
                    target.startswith(name + ".") and graph.has_edge(target, name):
                graph.remove_edge(target, name)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:3]}"
    assert graph.number_of_edges() > 50  # the walk saw the package's real imports


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, module and class attributes, and
    ``self._x = ...`` attributes of its classes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


def _module_of(name: str, modules: dict[str, Path], here: str, level: int) -> str:
    if level and here in modules:
        base = here.split(".")
        is_package = modules[here].name == "__init__.py"
        base = base[:len(base) - level + (1 if is_package else 0)]
        name = ".".join(base + ([name] if name else []))
    return name


def _private_uses(name: str, path: Path, modules: dict[str, Path],
                  defined_elsewhere: set[str]) -> list[str]:
    """Every use in ``path`` of another fxprune module's private name: ``from m import _x``,
    ``from m._private_module import x`` outside the package holding it,
    ``m._x`` on an imported fxprune module, and ``obj._x`` where ``_x`` is defined only in
    other fxprune modules (an instance's private attribute read from outside its class)."""
    tree = ast.parse(path.read_text())
    own = _private_definitions(tree)
    bound: dict[str, str] = {}  # local name -> fxprune module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _module_of(node.module or "", modules, name, node.level)
            if not module.startswith("fxprune"):
                continue
            hidden = [p for p in module.split(".") if _is_private(p)]
            if hidden and not name.startswith(module[:module.index(hidden[0]) - 1] + "."):
                # a private module is for its own package's modules only
                found += [f"{path}:{node.lineno}: from {module} import {a.name}"
                          for a in node.names]
                continue
            for a in node.names:
                if f"{module}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{module}.{a.name}"
                elif _is_private(a.name):
                    found.append(f"{path}:{node.lineno}: from {module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fxprune"):
                    bound[a.asname or "fxprune"] = a.name if a.asname else "fxprune"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in bound:
            target = ".".join([bound[value.id]] + chain[::-1])
            if target in modules and target != name:
                found.append(f"{path}:{node.lineno}: {target}.{node.attr}")
                continue
        if node.attr in defined_elsewhere and node.attr not in own:
            found.append(f"{path}:{node.lineno}: .{node.attr} (private to another module)")
    return found


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    defs = {name: _private_definitions(tree) for name, tree in trees.items()}
    found = []
    for name, path in modules.items():
        elsewhere = set().union(*(d for other, d in defs.items() if other != name))
        found += _private_uses(name, path, modules, elsewhere)
    # tests and benchmarks use the library through its public names too
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += _private_uses(f"{folder}.{path.stem}", path, modules, set())
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_sees_every_kind_of_use(tmp_path):
    """The check above is only worth something if it catches each pattern: a refusal case."""
    modules = _modules()
    src = tmp_path / "user.py"
    src.write_text("from fxprune.planning.criteria import _features\n"
                   "from fxprune.passes._support.inline import InlineResult\n"
                   "import fxprune.planning.criteria as c\n"
                   "from fxprune.planning import criteria\n"
                   "c._l1(1, [])\ncriteria._fill(None, [], [])\nobj._hidden\n")
    found = _private_uses("tests.user", src, modules, {"_hidden"})
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "._hidden (private to another module)",
        "from fxprune.passes._support.inline import InlineResult",
        "from fxprune.planning.criteria import _features",
        "fxprune.planning.criteria._fill", "fxprune.planning.criteria._l1"]
