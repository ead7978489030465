"""The package's shape: layers that import only downward (import-linter's contracts), no import cycle at all
(imports inside functions included), and every package shipped."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

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


def _wheel_files(pyproject: Path) -> set[str]:
    """The files setuptools' build_py puts in the wheel under this configuration, by their path in the wheel
    (nothing is built or written). Run with the checkout's root as the working directory: setuptools reads
    package-dir and package-data from there."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = apply_configuration(Distribution({"script_name": "setup.py"}), pyproject)
    # include-package-data adds what a MANIFEST.in or a VCS plugin names: this project has neither, so the
    # wheel's data files are package-data's patterns alone
    dist.include_package_data = False
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    lib = Path(build_py.build_lib)
    return {Path(f).relative_to(lib).as_posix() for f in build_py.get_outputs(include_bytecode=False)}


def _checkout_files() -> set[str]:
    """Every file that must be in the wheel, by its path there: rlsub_tui/ as it is (modules and the data they
    load, app.tcss), and the top-level sample_data/ as rlsub_tui/sample_data/."""
    out = set()
    for src, dest in ((PACKAGE, "rlsub_tui"), (ROOT / "sample_data", "rlsub_tui/sample_data")):
        for p in src.rglob("*"):
            rel = p.relative_to(src)
            if p.is_file() and "__pycache__" not in rel.parts and not any(s.startswith(".") for s in rel.parts):
                out.add(f"{dest}/{rel.as_posix()}")
    return out


def test_every_module_and_data_file_is_shipped_and_the_top_level_stays_small(monkeypatch):
    monkeypatch.chdir(ROOT)
    missing = _checkout_files() - _wheel_files(ROOT / "pyproject.toml")
    assert not missing, ("left out of the wheel: add the package to [tool.setuptools] packages or the file's "
                         f"pattern to package-data in pyproject.toml: {sorted(missing)}")
    top = [p for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    assert len(top) <= 14, sorted(p.name for p in top)


def test_a_package_or_sample_file_left_out_is_caught(monkeypatch, tmp_path):
    """The check above on a pyproject.toml that forgets rlsub_tui.cli and the sample's checkpoint-N weights."""
    text = (ROOT / "pyproject.toml").read_text()
    for old, new in (('"rlsub_tui.cli",', ""), ('"*/*/*.safetensors", ', "")):
        assert old in text
        text = text.replace(old, new, 1)
    (tmp_path / "pyproject.toml").write_text(text)
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())  # the readme it names, beside it
    monkeypatch.chdir(ROOT)
    missing = _checkout_files() - _wheel_files(tmp_path / "pyproject.toml")
    assert "rlsub_tui/cli/main.py" in missing
    assert "rlsub_tui/sample_data/grpo-lowlr-seed1/checkpoint-200/model.safetensors" in missing
    assert not any(f.startswith("rlsub_tui/ui/") for f in missing)


def test_a_checkout_that_is_not_installed_finds_its_sample(monkeypatch):
    """With the checkout on sys.path but not installed, rlsub_tui.sample_data is no module: the sample is found
    beside the package."""
    from rlsub_tui.checkpoints import sample_paths

    if Path(sample_paths.__file__).resolve().parents[1] != PACKAGE:
        pytest.skip(f"rlsub_tui is imported from {sample_paths.__file__}, not from this checkout")

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(sample_paths.resources, "files", not_installed)
    assert sample_paths.sample_dir() == ROOT / "sample_data"
