"""The package's shape: layers that import only downward (import-linter's contracts), no import cycle at all
(imports inside functions included), and every package shipped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlsub_tui"


def test_import_contracts_hold(capsys):
    """.importlinter: the layers, the Textual-free core and the torch-free explorer process."""
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "0 broken" in out


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the package's modules, or None (depth-first search, three colours)."""
    modules = sorted(graph.modules)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in modules:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = grimp.build_graph("rlsub_tui", include_external_packages=False)
    # a package's __init__ is imported with each of its modules: the edge to it says nothing about the layers
    for m in list(graph.modules):
        for d in list(graph.find_modules_directly_imported_by(m)):
            if m.startswith(d + "."):
                graph.remove_import(importer=m, imported=d)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.a")):
        graph.add_import(importer=a, imported=b)
    assert _cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]


def test_every_package_is_shipped_and_the_top_level_stays_small():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"
    top = [p for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    assert len(top) <= 14, sorted(p.name for p in top)
