"""pytest hooks for the mutation pass only (scripts/mutation.py; pyproject.toml's [tool.mutmut] loads them with -p):
a mutant's tests run fastest first, so that the first to fail ends its run early, and no more of them than a
budget; the objects a mutant's process inherits are left out of its garbage collections; and the marker of
mutmut's coverage run stays out of the processes the tests start."""

from __future__ import annotations

import gc
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest
import tomllib

MARKER = "MUTANT_UNDER_TEST"
# mutmut runs the tests from its mutants/ folder. Its coverage run times each test's call only; this plugin adds
# each test's set-up and tear-down there (a model built by a fixture), which a mutant's run pays as well.
TIMES = Path("mutmut-test-times.json")
# Seconds of tests a mutant runs at most (the fastest of those that reached its function, at least one): most of
# the guarantee code is reached by whole runs too, a second or more each, and a mutant that survived ran every one
# of them, which did not fit CI's budget. A guarantee that only a whole run checks wants a unit test of its own.
TESTS_BUDGET_S = 1.0

_times: dict[str, float] = defaultdict(float)
_coverage_run = False


def pytest_configure(config: pytest.Config) -> None:
    """mutmut keeps the coverage run's marker in the process as well; a run the tests start (python entrypoint.py)
    would inherit it from the environment, and its mutmut would then read pyproject.toml, which a confined run may
    not. That run's calls are not counted either way: mutmut sees only the calls of its own process."""
    global _coverage_run
    if os.environ.get(MARKER) == "stats":
        del os.environ[MARKER]
        _coverage_run = True
    if "__mutmut_" in os.environ.get(MARKER, ""):
        # A mutant's tests run in a process forked from mutmut's server, which holds torch and every test module:
        # pytest collects garbage at its end, and walking those inherited objects (copying each page it touches)
        # cost more than most mutants' tests. They outlive the process anyway, so the collector leaves them be.
        gc.freeze()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _coverage_run:
        _times[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _coverage_run:
        TIMES.write_text(json.dumps(_times), encoding="utf-8")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A mutant's tests, its module's own test files first, each part fastest first (mutmut runs them in no order,
    and stops at the first failure), and only as many as fit TESTS_BUDGET_S by the coverage run's timings: the rest
    are deselected."""
    if "__mutmut_" not in os.environ.get(MARKER, "") or not TIMES.is_file():
        return
    times = json.loads(TIMES.read_text(encoding="utf-8"))
    own = set(_own_test_files(os.environ[MARKER]))
    items.sort(key=lambda item: (item.nodeid.split("::")[0] not in own, times.get(item.nodeid, 0.0)))
    spent = 0.0
    for kept, item in enumerate(items):
        spent += times.get(item.nodeid, 0.0)
        if kept and spent > TESTS_BUDGET_S:
            config.hook.pytest_deselected(items=items[kept:])
            del items[kept:]
            return


def _own_test_files(mutant: str) -> list[str]:
    """The test files [tool.mutmut.own_tests] gives the mutant's module (mutants/ holds a copy of pyproject.toml):
    a function every run reaches is reached by dozens of faster tests that do not check it."""
    module = re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0]
    own = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"].get("own_tests", {})
    return own.get(module.replace(".", "/") + ".py", [])
