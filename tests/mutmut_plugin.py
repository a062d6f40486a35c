"""pytest hooks for the mutation pass only (scripts/mutation.py; pyproject.toml's [tool.mutmut] loads them with -p):
a mutant's tests run fastest first, so that the first to fail ends its run early; the objects a mutant's process
inherits are left out of its garbage collections; and the marker of mutmut's coverage run stays out of the processes
the tests start."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

MARKER = "MUTANT_UNDER_TEST"
STATS = Path("mutmut-stats.json")  # mutmut runs the tests from its mutants/ folder, where it keeps this


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A mutant's tests, fastest first (mutmut runs them in no order, and stops at the first failure)."""
    if "__mutmut_" not in os.environ.get(MARKER, "") or not STATS.is_file():
        return
    durations = json.loads(STATS.read_text(encoding="utf-8"))["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
