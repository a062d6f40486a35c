"""pytest hooks for the mutation pass only (scripts/mutation.py; pyproject.toml's [tool.mutmut] loads them with -p):
a mutant runs only the tests that executed the statement it changes (mutmut itself knows only which tests reached
the function; its list stands where no test executed the statement in the test's own process, as in a forked
child, and for a change to the signature), its module's own test files first, each part fastest first, so that the
first to fail ends its run early, and no more of them than a budget; the objects a mutant's process inherits are
left out of its garbage collections; and the marker of mutmut's coverage run stays out of the processes the tests
start."""

from __future__ import annotations

import ast
import difflib
import gc
import json
import os
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import tomllib

MARKER = "MUTANT_UNDER_TEST"
# mutmut runs the tests from its mutants/ folder, which also holds what this plugin measures in its coverage run:
# each test's set-up, call and tear-down (mutmut times the call only, and a model built by a fixture is paid by a
# mutant's run as well), and the lines of the mutated modules each test executed (coverage.py, which mutmut
# depends on, with one context per test).
TIMES = Path("mutmut-test-times.json")
LINES = Path("mutmut-test-lines.json")
# Seconds of tests a mutant runs at most (its own module's tests first, each part fastest first, at least one): a
# line that whole runs reach is reached by many tests, and a mutant that survives runs all it is given, which must
# fit CI's budget. At 1 s the test written for a line was often cut off behind faster ones of the same file that
# only pass through it (the fold's, whose file holds dozens); 3 s reaches it. A guarantee that only a whole run
# checks wants a unit test of its own.
TESTS_BUDGET_S = 3.0

_times: dict[str, float] = defaultdict(float)
_coverage: Any = None  # coverage.Coverage during mutmut's coverage run


def _settings() -> dict[str, Any]:
    """[tool.mutmut], from the copy of pyproject.toml mutmut puts in mutants/."""
    return tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def pytest_configure(config: pytest.Config) -> None:
    """mutmut keeps the coverage run's marker in the process as well; a run the tests start (python entrypoint.py)
    would inherit it from the environment, and its mutmut would then read pyproject.toml, which a confined run may
    not. That run's calls are not counted either way: mutmut sees only the calls of its own process."""
    global _coverage
    if os.environ.get(MARKER) == "stats":
        del os.environ[MARKER]
        import coverage

        mutated = [str(Path(path).resolve()) for path in _settings()["only_mutate"]]
        _coverage = coverage.Coverage(data_file=None, include=mutated, config_file=False)
        _coverage.start()
    if "__mutmut_" in os.environ.get(MARKER, ""):
        # A mutant's tests run in a process forked from mutmut's server, which holds torch and every test module:
        # pytest collects garbage at its end, and walking those inherited objects (copying each page it touches)
        # cost more than most mutants' tests. They outlive the process anyway, so the collector leaves them be.
        gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    if _coverage is not None:
        _coverage.switch_context(item.nodeid)  # its set-up, call and tear-down


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _coverage is not None:
        _times[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The coverage run's figures, merged into the earlier run's where mutmut measured only new tests."""
    if _coverage is None:
        return
    _coverage.stop()
    data = _coverage.get_data()
    times = _read(TIMES, {})
    times.update(_times)
    found = _read(LINES, {"tests": [], "lines": {}})
    tests: list[str] = found["tests"]
    index = {test: number for number, test in enumerate(tests)}
    for path in data.measured_files():
        lines = found["lines"].setdefault(str(Path(path).relative_to(Path.cwd())), {})
        for line, contexts in data.contexts_by_lineno(path).items():
            numbers = set(lines.get(str(line), []))
            for context in filter(None, contexts):  # "": executed before the first test (imports)
                if context not in index:
                    index[context] = len(tests)
                    tests.append(context)
                numbers.add(index[context])
            lines[str(line)] = sorted(numbers)
    TIMES.write_text(json.dumps(times), encoding="utf-8")
    LINES.write_text(json.dumps(found), encoding="utf-8")


def _read(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A mutant's tests: those that executed the line it changes (all that reached its function, where the line is
    not known), its module's own test files first, each part fastest first (mutmut runs them in no order, and stops
    at the first failure), and only as many as fit TESTS_BUDGET_S by the coverage run's timings: the rest are
    deselected."""
    mutant = os.environ.get(MARKER, "")
    if "__mutmut_" not in mutant or not TIMES.is_file():
        return
    times = _read(TIMES, {})
    path = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].replace(".", "/") + ".py"
    reached = _tests_of_line(path, mutant)
    if reached:  # none (a forked child's line, one never run, or not known): mutmut's list stands
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in reached])
        items[:] = [item for item in items if item.nodeid in reached]
    own = set(_settings().get("own_tests", {}).get(path, []))
    items.sort(key=lambda item: (item.nodeid.split("::")[0] not in own, times.get(item.nodeid, 0.0)))
    spent = 0.0
    for kept, item in enumerate(items):
        spent += times.get(item.nodeid, 0.0)
        if kept and spent > TESTS_BUDGET_S:
            config.hook.pytest_deselected(items=items[kept:])
            del items[kept:]
            return


def _tests_of_line(path: str, mutant: str) -> set[str]:
    """The tests that executed any statement the mutant changes, as the coverage run saw them in the function's
    original (mutants/ holds it beside each mutant); none where that cannot be told."""
    if not LINES.is_file():
        return set()
    lines = changed_lines(Path(path).read_text(encoding="utf-8"), mutant.rpartition(".")[2])
    found = _read(LINES, {"tests": [], "lines": {}})
    executed = found["lines"].get(path, {})
    return {found["tests"][number] for line in lines or () for number in executed.get(str(line), [])}


def changed_lines(source: str, mutant: str) -> set[int] | None:
    """The lines of the original function (`x_name__mutmut_orig` in mutmut's copy of the module) whose statements
    the mutant (`x_name__mutmut_N`) changes, each widened to its whole statement (a compound one's header only);
    None where the change is in the signature or the functions are not found."""
    text = source.splitlines()
    name = mutant.rpartition("__mutmut_")[0]
    original, changed = _function(text, f"{name}__mutmut_orig"), _function(text, mutant)
    if original is None or changed is None or original.end_lineno is None or changed.end_lineno is None:
        return None
    before = text[original.lineno - 1 : original.end_lineno]
    after = text[changed.lineno - 1 : changed.end_lineno]
    after[0] = after[0].replace(mutant, f"{name}__mutmut_orig", 1)
    edits = difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes()
    lines = {original.lineno + i for tag, i1, i2, _, _ in edits if tag != "equal" for i in range(i1, max(i2, i1 + 1))}
    if not lines or min(lines) < original.body[0].lineno:  # the signature (a default value): every call
        return None
    return {covered for line in lines for covered in _statement(original, line)}


def _function(text: list[str], name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The function `name` of mutmut's copy of a module, parsed on its own, its lines numbered as in the file; None
    where it is not found whole. The copy holds every mutant of the module: parsing all of it (a megabyte for the
    fold's) cost each of its hundreds of mutants half a second."""
    define = re.compile(rf"(\s*)(?:async\s+)?def {re.escape(name)}\(")
    start = next((number for number, line in enumerate(text) if define.match(line)), None)
    if start is None:
        return None
    indent = len(text[start]) - len(text[start].lstrip())
    end = start + 1  # to the next code line as far out as the `def`, a signature's closing bracket aside
    while end < len(text) and (
        not text[end].strip() or text[end].lstrip()[0] in "#)]}" or len(text[end]) - len(text[end].lstrip()) > indent
    ):
        end += 1
    try:
        node = ast.parse(textwrap.dedent("\n".join(text[start:end]))).body[0]
    except SyntaxError:  # a line of a string at the margin ended it early: told as not found
        return None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name != name:
        return None
    return ast.increment_lineno(node, start)


def _statement(function: ast.FunctionDef | ast.AsyncFunctionDef, line: int) -> range:
    """The lines of the innermost statement of `function` that holds `line`: a compound statement's header (up to
    its body), any other statement whole (coverage.py may count a statement on any of its lines)."""
    inner: ast.stmt | None = None
    for node in ast.walk(function):
        holds = isinstance(node, ast.stmt) and node is not function and node.lineno <= line <= (node.end_lineno or 0)
        if holds and (inner is None or node.lineno >= inner.lineno):
            inner = node
    if inner is None:
        return range(line, line + 1)
    body = getattr(inner, "body", None)
    if isinstance(body, list) and body and line < body[0].lineno:
        return range(inner.lineno, body[0].lineno)
    return range(inner.lineno, (inner.end_lineno or inner.lineno) + 1)
