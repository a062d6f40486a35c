"""The package's architecture, checked: subpackages by role, imports one way (entry points and tools above the
pipeline, the pipeline above the model loaders and result writers, config and errors at the bottom), no cycles;
model kinds in one registry, nothing outside harness/models testing for a runtime's class; the CSV row in one
module."""

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
    "harness.parsers": 0,
    "harness.config": 1,  # the settings, knowing nothing of models, images or outputs
    "harness.console": 1,
    "harness.data": 1,
    "harness.models": 2,
    "harness.results": 2,
    "harness.pipeline": 3,
    "harness.sources": 4,  # one Config from its sources: locates the model, reads its settings, checks the label map
    "harness.options": 5,  # a command line to those sources
    "harness.tools": 6,
    "harness.cli": 7,
    "harness.__main__": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str:
    """The LAYERS key a module belongs to: its subpackage, or the module itself at the top."""
    if module in LAYERS:
        return module
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    return candidate if candidate in LAYERS else "harness"


def _imports(path: Path) -> set[str]:
    """Every harness module `path` imports, at the top or inside functions (the lazy imports count too); imports
    for type checkers only (under `if TYPE_CHECKING:`) never run, so they are no dependency."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if _is_module(node.module, alias.name))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("harness"))
    return found


def _is_module(package: str, name: str) -> bool:
    """`from harness import parsers` imports the module harness.parsers, an edge like any other."""
    folder = REPO.joinpath(*package.split("."))
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


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
        "parsers.py",
        "sources.py",
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


def _runtime_classes() -> set[str]:
    """The classes harness/models defines that a model comes back as (nn.Module subclasses: OnnxModule, ...)."""
    names = set()
    for path in (PACKAGE / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(base).endswith("Module") for base in node.bases):
                names.add(node.name)
    return names


def test_no_runtime_class_is_tested_outside_models() -> None:
    """What the harness may do to a model is its kind's to say (harness/models/kinds.py: torch_graph), so nothing
    outside harness/models names the class a runtime wraps a model in."""
    classes = _runtime_classes()
    assert "OnnxModule" in classes
    outside = [
        path for path in [*PACKAGE.rglob("*.py"), *(REPO / "scripts").glob("*.py")] if "models" not in path.parts
    ]
    wrong = [
        f"{path.relative_to(REPO)}: {name}"
        for path in outside
        for name in classes | {"onnx_runtime"}
        if name in path.read_text(encoding="utf-8")
    ]
    assert not wrong, wrong


def test_model_kinds_are_one_registry() -> None:
    """Each kind is recognised one way, has exactly one loader (named directly, no strings) and at most one reader
    of its settings, and is in the README's table; the kinds' file suffixes do not overlap (a new suffix cannot
    fall to another kind's loader)."""
    from harness.models.kinds import DEFAULT_KIND, KINDS
    from harness.models.load import LOADERS
    from harness.models.preprocessing import SETTINGS_READERS

    suffixes = [suffix for kind in KINDS for suffix in kind.suffixes]
    assert len(suffixes) == len(set(suffixes)), suffixes
    assert len({kind.name for kind in KINDS}) == len(KINDS)
    assert list(LOADERS) == list(KINDS), "models/load.py's LOADERS must name every kind, in the registry's order"
    assert set(SETTINGS_READERS) <= set(KINDS)
    assert all(callable(load) for load in LOADERS.values()) and all(map(callable, SETTINGS_READERS.values()))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for kind in KINDS:
        assert kind is DEFAULT_KIND or kind.prefix or kind.suffixes or kind.marker, kind.name
        assert f"| `{kind.name}` |" in readme, f"README's model-sources table lacks the {kind.name} kind"
    spelled = [
        path.relative_to(REPO)
        for path in PACKAGE.rglob("*.py")
        if path.name != "kinds.py" and any(f'"{suffix}"' in path.read_text() for suffix in (".pt", ".torchscript"))
    ]
    assert not spelled, f"model suffixes spelled outside harness/models/kinds.py: {spelled}"
    assert "importlib" not in (PACKAGE / "models" / "kinds.py").read_text(), "the registry names what it uses"


def test_the_readme_maps_every_module() -> None:
    """README's How it works names every module of the package, so a newcomer finds each one's job there."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## How it works") :]
    section = section[: section.index("\n## ", 1)]
    modules = [path for path in PACKAGE.rglob("*.py") if path.name not in ("__init__.py", "__main__.py")]
    missing = [str(path.relative_to(PACKAGE)) for path in modules if f"`{path.name}`" not in section]
    assert not missing, f"README's How it works lacks {missing}"


# What may write the file system, besides the gate (harness/results/gate.py), and why each is not an output.
WRITERS_ALLOWED = {
    "harness/models/submission.py": "unpacks a zipped model folder into the run's private folder, before it runs",
    "harness/results/writer.py": "makes the output folder before the run starts (check_writable), for the gate",
    "harness/pipeline/export_cache.py": "the gate's store: the export cache's entries, written by the gate alone",
}
PATH_WRITES = {"write_text", "write_bytes", "unlink", "mkdir", "rename", "rmdir", "touch", "symlink_to", "hardlink_to"}
MODULE_WRITES = {
    "os": {"replace", "rename", "unlink", "remove", "makedirs", "mkdir", "rmdir", "link", "symlink", "truncate"},
    "shutil": {"rmtree", "move", "copy", "copy2", "copyfile", "copytree"},
    "np": {"save", "savez", "savez_compressed"},  # to a path; into an open file (a name) is the file's writer's
    "torch": {"save"},
    "onnx": {"save", "save_model"},
}
SAVE_TARGET = {"np": 0, "torch": 1, "onnx": 1}  # where a save's file goes: a path writes, a name is an open file
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def _writes(node: ast.Call) -> bool:
    """Whether a call writes the file system: a Path method, os/shutil/numpy's, open() or os.open() for writing."""
    func = node.func
    if isinstance(func, ast.Name) and func.id == "open":
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and any(letter in str(mode.value) for letter in "wax+")
    if not isinstance(func, ast.Attribute):
        return False
    if isinstance(func.value, ast.Name) and func.value.id in MODULE_WRITES:
        if func.value.id == "os" and func.attr == "open":
            return any(flag in ast.unparse(node) for flag in WRITE_FLAGS)
        where = SAVE_TARGET.get(func.value.id)  # the argument that names the file
        into_open_file = where is not None and len(node.args) > where and isinstance(node.args[where], ast.Name)
        return func.attr in MODULE_WRITES[func.value.id] and not into_open_file
    if func.attr == "replace":  # Path.replace(target): one argument (str.replace takes two)
        return len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Constant)
    return func.attr in PATH_WRITES


def test_only_the_gate_writes_the_file_system() -> None:
    """Every output file is opened, renamed and removed by the gate (never through a link, confined or not): no
    other module writes anything, save what WRITERS_ALLOWED names with why."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(REPO))
        if name in ("harness/results/gate.py", *WRITERS_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _writes(node):
                wrong.append(f"{name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not wrong, wrong


MAX_FUNCTION_LINES = 50  # docstring included: a longer one does several jobs, each worth a name


def test_no_function_is_longer_than_a_screen() -> None:
    sources = [*PACKAGE.rglob("*.py"), REPO / "scripts" / "bench.py"]
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sources
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_the_settings_know_nothing_of_what_they_set() -> None:
    """config.py and the parsers import no part of the harness but the errors: the bottom floor stays the bottom."""
    for name in ("config.py", "parsers.py"):
        imported = {target for target in _imports(PACKAGE / name) if target not in ("harness", "harness.errors")}
        assert imported <= {"harness.parsers"}, (name, imported)
