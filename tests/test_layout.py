"""The house rules of the layout, read from the source with ``ast`` (nothing is imported):

- engine is the base: it imports neither watcher nor training;
- watcher and training are siblings on the engine: neither imports the other;
- no import cycles between modules, counting imports inside functions (lazy ones) too;
- project_structure.txt names every module.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "watcher", "training")


def module_files(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every .py under ``packages``."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports, at the top or inside functions, relative ones
    resolved; ``from a import b`` gives both ``a`` and ``a.b`` (b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project's modules it imports (third-party names dropped)."""
    files = module_files(root, packages)
    graph = {}
    for module, (path, is_package) in files.items():
        edges = set()
        for name in imported_names(path, module, is_package):
            parts = name.split(".")
            while parts and ".".join(parts) not in files:  # engine.cli.main -> engine.cli
                parts.pop()
            if parts and ".".join(parts) != module:
                edges.add(".".join(parts))
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (strongly connected components, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def reaching(graph: dict[str, set[str]], source: str, target: str) -> dict[str, list[str]]:
    """Modules of package ``source`` -> the ``target`` modules they import."""
    return {m: sorted(e for e in edges if e.split(".")[0] == target)
            for m, edges in sorted(graph.items())
            if m.split(".")[0] == source and any(e.split(".")[0] == target for e in edges)}


def test_engine_imports_neither_watcher_nor_training():
    graph = import_graph()
    assert reaching(graph, "engine", "watcher") == {}
    assert reaching(graph, "engine", "training") == {}


def test_watcher_and_training_do_not_import_each_other():
    graph = import_graph()
    assert reaching(graph, "watcher", "training") == {}
    assert reaching(graph, "training", "watcher") == {}


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_the_graph_sees_lazy_and_relative_imports_and_their_cycles(tmp_path):
    """The checks above can fail: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("thing = 1\n\ndef later():\n    from . import a\n    return a\n")
    (pkg / "sub" / "c.py").write_text("import os\nfrom ..b import thing\nimport pkg.a as a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.b"}
    assert graph["pkg.b"] == {"pkg", "pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert reaching(graph, "pkg", "os") == {}


def test_project_structure_names_every_tracked_python_module():
    structure = (ROOT / "project_structure.txt").read_text(encoding="utf-8")
    for pkg in ("engine", "watcher", "watcher/web", "training", "benchmarks"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in structure, f"{pkg}/{path.name} missing from project_structure.txt"
