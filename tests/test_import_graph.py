"""fxprune's module-level imports form a DAG (no cycles), so any module can be imported on
its own and the layers (contracts -> analysis -> planning -> amap -> app) stay visible."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
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
