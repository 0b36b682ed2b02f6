"""The package's layout rules, checked from the source: no import cycle, no module over 400 lines, models and
evaluation know nothing of sharding, and nothing but the command line imports a recipe."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "llmd4rec"


def _name(path: Path) -> str:
    parts = ("llmd4rec",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PKG.rglob("*.py")}


def imports(module: str) -> set[str]:
    """Package modules `module` imports; `from . import x` counts as importing the submodule x only."""
    path = MODULES[module]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_the_import_checker_sees_a_known_edge():
    assert "llmd4rec.training.phase" in GRAPH["llmd4rec.training.crm"]
    assert "llmd4rec.recipes.distill" in GRAPH["llmd4rec.cli"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_at_most_400_lines(module):
    assert len(MODULES[module].read_text(encoding="utf-8").splitlines()) <= 400


def test_models_and_evaluation_know_nothing_of_sharding_files_or_recipes():
    for m, deps in GRAPH.items():
        if m.startswith("llmd4rec.models.") or m == "llmd4rec.evaluation":
            bad = {d for d in deps if d.split(".")[1] in ("distributed", "launcher", "recipes", "training",
                                                         "loading", "runs", "io")}
            assert not bad, f"{m} imports {sorted(bad)}"


def test_only_the_command_line_imports_a_recipe():
    for m, deps in GRAPH.items():
        if not m.startswith("llmd4rec.recipes") and m != "llmd4rec.cli":
            assert not {d for d in deps if d.startswith("llmd4rec.recipes")}, m
