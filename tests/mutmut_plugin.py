"""pytest hooks for the mutation pass only (scripts/mutation.py; pyproject.toml's [tool.mutmut] loads them with -p):
a mutant's tests run fastest first, so that the first to fail ends its run early, and no more of them than a
budget; the objects a mutant's process inherits are left out of its garbage collections; and the marker of
mutmut's coverage run stays out of the processes the tests start."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

MARKER = "MUTANT_UNDER_TEST"
STATS = Path("mutmut-stats.json")  # mutmut runs the tests from its mutants/ folder, where it keeps this
# Seconds of tests a mutant runs at most (the fastest of those that reached its function, at least one): most of
# the guarantee code is reached by whole runs too, a second or more each, and a mutant that survived ran every one
# of them, which did not fit CI's budget. A guarantee that only a whole run checks wants a unit test of its own.
TESTS_BUDGET_S = 2.0


def pytest_configure(config: pytest.Config) -> None:
    """mutmut keeps the coverage run's marker in the process as well; a run the tests start (python entrypoint.py)
    would inherit it from the environment, and its mutmut would then read pyproject.toml, which a confined run may
    not. That run's calls are not counted either way: mutmut sees only the calls of its own process."""
    if os.environ.get(MARKER) == "stats":
        del os.environ[MARKER]
    if "__mutmut_" in os.environ.get(MARKER, ""):
        # A mutant's tests run in a process forked from mutmut's server, which holds torch and every test module:
        # pytest collects garbage at its end, and walking those inherited objects (copying each page it touches)
        # cost more than most mutants' tests. They outlive the process anyway, so the collector leaves them be.
        gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A mutant's tests, fastest first (mutmut runs them in no order, and stops at the first failure), and only as
    many as fit TESTS_BUDGET_S by the clean run's timings: the rest are deselected."""
    if "__mutmut_" not in os.environ.get(MARKER, "") or not STATS.is_file():
        return
    durations = json.loads(STATS.read_text(encoding="utf-8"))["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
    spent = 0.0
    for kept, item in enumerate(items):
        spent += durations.get(item.nodeid, 0.0)
        if kept and spent > TESTS_BUDGET_S:
            config.hook.pytest_deselected(items=items[kept:])
            del items[kept:]
            return
