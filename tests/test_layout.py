"""The house rules of the layout: engine is the base and imports neither watcher nor training."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.name] = names
    return found


def test_engine_imports_neither_watcher_nor_training():
    offenders = {name: sorted(mods & {"watcher", "training"})
                 for name, mods in imported_packages(ROOT / "engine").items()
                 if mods & {"watcher", "training"}}
    assert offenders == {}


def test_watcher_and_training_do_not_import_each_other():
    for pkg, other in (("watcher", "training"), ("training", "watcher")):
        folders = [ROOT / pkg, *(p for p in (ROOT / pkg).iterdir() if (p / "__init__.py").exists())]
        for folder in folders:
            for name, mods in imported_packages(folder).items():
                assert other not in mods, f"{folder.name}/{name} imports {other}"


def test_project_structure_names_every_tracked_python_module():
    structure = (ROOT / "project_structure.txt").read_text(encoding="utf-8")
    for pkg in ("engine", "watcher", "watcher/web", "training", "benchmarks"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in structure, f"{pkg}/{path.name} missing from project_structure.txt"
