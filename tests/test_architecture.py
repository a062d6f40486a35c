"""The package's architecture, checked: subpackages by role, imports one way (entry points and tools above the
pipeline, the pipeline above the model loaders and result writers, config and errors at the bottom), no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "harness"
# Each module's layer; a module may import from its own layer's package or any lower layer, never upward, and
# models and results (one layer) do not import each other.
LAYERS = {
    "harness": 0,  # __version__
    "harness.errors": 0,
    "harness.config": 1,
    "harness.console": 1,
    "harness.data": 1,
    "harness.models": 2,
    "harness.results": 2,
    "harness.pipeline": 3,
    "harness.options": 4,
    "harness.tools": 5,
    "harness.cli": 6,
    "harness.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str:
    """The LAYERS key a module belongs to: its subpackage, or the module itself at the top."""
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    return candidate if candidate in LAYERS else "harness"


def _imports(path: Path) -> set[str]:
    """Every harness module `path` imports, at the top or inside functions (the lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("harness"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_imports_run_one_way() -> None:
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            here, there = _group(module), _group(target)
            if LAYERS[there] > LAYERS[here] or (here != there and LAYERS[there] == LAYERS[here] and here != "harness"):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*path, module, target]))
            if target not in state and target in graph:
                visit(target, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_subpackages_by_role_with_empty_inits() -> None:
    for name in ("pipeline", "models", "results", "tools"):
        init = PACKAGE / name / "__init__.py"
        assert init.is_file() and init.read_text() == "", init
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
        "__init__.py",
        "__main__.py",
        "cli.py",
        "config.py",
        "console.py",
        "errors.py",
        "options.py",
    ]


def test_every_module_says_what_it_is_for() -> None:
    modules = [path for path in PACKAGE.rglob("*.py") if path.name not in ("__init__.py", "__main__.py")]
    missing = [_module_name(path) for path in modules if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing


def test_the_csv_row_has_one_owner() -> None:
    """Only harness/results/rows.py lays out a row: no other module, test or script slices ids and confidences
    out of a row by position or formats a confidence."""
    owner = PACKAGE / "results" / "rows.py"
    layout = ("[1::2]", "[2::2]", "[0::2]", ":.6g")
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    wrong = [
        f"{path.relative_to(REPO)}: {text}"
        for path in sources
        if path not in (owner, Path(__file__))
        for text in layout
        if text in path.read_text(encoding="utf-8")
    ]
    assert not wrong, wrong
