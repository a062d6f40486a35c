#!/usr/bin/env python3
"""The mutation pass over the code behind the README's promises: mutmut (pinned in the lock) mutates the modules
pyproject.toml's [tool.mutmut] names, one change at a time, and runs against each mutant only the tests that executed
the statement it changes, its module's own first, fastest first and up to a few seconds of them
(tests/mutmut_plugin.py); a mutant no test fails on has survived. This script runs the pass within a time budget,
reads its results, sets aside the mutants [tool.mutmut] marks equivalent (each with why, and the change it names, so
a mark cannot drift onto another mutant), prints each module's figures and every survivor (with why, where
[tool.mutmut] gives one), and exits 1 when the kill rate of the others is below the floor or the pass ran out of
time.

    python3 scripts/mutation.py                  # the whole pass, from scratch
    python3 scripts/mutation.py --report         # the figures of the last pass again, without running it
    python3 scripts/mutation.py 'harness.results.rows.*'   # only these mutants (shell patterns), for a quick look
    python3 scripts/mutation.py --again NAME...   # these again after new tests, in the last pass; its figures

`mutmut show NAME` prints a mutant's change, `mutmut apply NAME` writes it to the source (undo with git).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "mutants"
LOG = MUTANTS / "mutation.log"
BUDGET_S = 40 * 60  # a stop for a pass gone wrong: it took 27 minutes in CI on a 2-core machine (docs/robustness.md)
FLOOR = 0.95  # the kill rate of the non-equivalent mutants the pass must reach
# mutmut's verdicts on a mutant's test run (its own table of exit codes): a failing test kills it; so does a run past
# its time limit (the mutant looped), as mutmut's own score counts it, and one the kernel killed (mutmut says
# "segfault" for SIGKILL too: a mutant that sized an image by width * height ran out of memory). "no tests" survives.
KILLED = {"killed", "timeout", "segfault"}
MARKS = ("equivalent", "survivor")  # [[tool.mutmut.equivalent]] and [[tool.mutmut.survivor]]: see results()


def settings() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def function_key(name: str) -> str:
    """A function or method as mutmut names its mutants: `x_name`, or `xǁClassǁname` for `Class.name`."""
    owner, _, function = name.rpartition(".")
    return f"xǁ{owner}ǁ{function}" if owner else f"x_{function}"


def patterns(config: dict[str, Any]) -> list[str]:
    """The mutants of the pass: every function of each module in `only_mutate`, or in a module `functions` lists,
    only those."""
    chosen = config.get("functions", {})
    found = []
    for path in config["only_mutate"]:
        module = module_of(path)
        names = chosen.get(path)
        found += [f"{module}.*"] if names is None else [f"{module}.{function_key(n)}__mutmut_*" for n in names]
    return found


def run_pass(selected: list[str], budget_s: float, max_children: int | None, again: bool = False) -> float:
    """Run mutmut over `selected` (from scratch, or with `again` in the last pass's folder, the other mutants'
    results kept), its output in mutants/mutation.log; the wall time, or exit 1 when it ran past `budget_s` or
    failed."""
    if not again:
        shutil.rmtree(MUTANTS, ignore_errors=True)  # a fresh pass: mutmut would keep results of earlier code and tests
    MUTANTS.mkdir(exist_ok=True)
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if mutmut is None:
        sys.exit("mutation: mutmut is not installed: pip install -c constraints.txt -e '.[dev]'")
    command = [mutmut, "run", *([f"--max-children={max_children}"] if max_children else []), *selected]
    started = time.monotonic()
    with LOG.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # mutmut, its fork server and every mutant's tests
            process.wait()
            sys.exit(f"mutation: the pass ran past its budget of {budget_s / 60:g} minutes ({LOG} has how far it got)")
    elapsed = time.monotonic() - started
    if code != 0:
        tail = "\n".join(LOG.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-40:])
        sys.exit(f"mutation: mutmut failed (exit {code}); the end of {LOG}:\n{tail}")
    return elapsed


@dataclass
class Figures:
    mutants: int = 0
    killed: int = 0
    timeouts: list[str] = field(default_factory=list)  # counted as killed, listed: load can look like a loop
    survived: list[str] = field(default_factory=list)
    equivalent: int = 0

    @property
    def rate(self) -> float:
        counted = self.mutants - self.equivalent
        return self.killed / counted if counted else 1.0


def change_of(name: str, path: str) -> str:
    """The mutant's change, as mutmut's diff gives it: each line it removes (-) and adds (+)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        diff = get_diff_for_mutant(name, path=path)
    finally:
        os.chdir(cwd)
    changed = [line for line in diff.splitlines()[2:] if line[:1] in "+-"]
    return " / ".join(f"{line[0]}{line[1:].strip()}" for line in changed)


def results(config: dict[str, Any], selected: list[str]) -> tuple[dict[str, Figures], list[str]]:
    """Each module's figures, and what is wrong with the marks (a mark on a killed mutant, one whose change is no
    longer the one it names, one for a mutant that no longer exists). Two kinds of mark, each with why: an
    `equivalent` mutant (no input can tell it from the code) is left out of the kill rate; a `survivor` (only a
    GPU, say, could tell) counts as survived, and is listed with its why."""
    from mutmut.stats import status_by_exit_code

    marks = {mark["mutant"]: (kind, mark) for kind in MARKS for mark in config.get(kind, [])}
    figures: dict[str, Figures] = {}
    wrong, seen = [], set()
    for path in config["only_mutate"]:
        meta = MUTANTS / f"{path}.meta"
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"] if meta.is_file() else {}
        module = figures.setdefault(path, Figures())
        for name, code in codes.items():
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in selected):
                continue
            module.mutants += 1
            kind, mark = marks.get(name, (None, None))
            status = status_by_exit_code[code] if code is not None else None
            # a marked mutant that ran out of time ran on a busy machine: an equivalent one cannot loop, and a GPU
            # one's tests are the CPU's; it keeps its mark (only a failing test disproves one)
            killed = status in KILLED and not (mark is not None and status == "timeout")
            change = change_of(name, path) if mark is not None or not killed else ""  # mutmut's diff: read once
            if mark is not None:
                seen.add(name)
                if mark["change"] not in change:
                    wrong.append(f"{name} is marked {kind} for `{mark['change']}`, but it now changes: {change}")
            if code is None:
                wrong.append(f"{name} was not run (the pass stopped early?)")
            elif killed:
                module.killed += 1
                if status == "timeout":
                    module.timeouts.append(name)
                if mark is not None:
                    wrong.append(f"{name} is marked {kind}, but a test kills it: remove the mark")
            elif kind == "equivalent":
                module.equivalent += 1
            else:
                why = f" [{mark['why']}]" if mark is not None else ""
                module.survived.append(f"{name} ({status}, exit {code}): {change}{why}")
    unseen = [name for name in marks.keys() - seen if any(fnmatch.fnmatchcase(name, p) for p in selected)]
    wrong += [f"{name} is marked {marks[name][0]} but is not a mutant of the pass" for name in sorted(unseen)]
    return figures, wrong


def report(figures: dict[str, Figures], wrong: list[str], elapsed: float | None, floor: float) -> int:
    total = Figures()
    print(
        f"\n{'module':<34} {'mutants':>8} {'killed':>7} {'of which timeout':>17} {'survived':>9} {'equivalent':>11} "
        f"{'kill rate':>10}"
    )
    for module in figures.values():
        total.mutants += module.mutants
        total.killed += module.killed
        total.timeouts += module.timeouts
        total.survived += module.survived
        total.equivalent += module.equivalent
    for path, module in [*figures.items(), ("all", total)]:
        print(
            f"{path:<34} {module.mutants:>8} {module.killed:>7} {len(module.timeouts):>17} {len(module.survived):>9} "
            f"{module.equivalent:>11} {module.rate:>10.1%}"
        )
    if elapsed is not None:
        print(f"\nthe pass took {elapsed / 60:.1f} minutes")
    if total.timeouts:
        print(
            f"\n{len(total.timeouts)} killed by their time limit (a loop, or a busy machine: --again NAME... reruns "
            "them):"
        )
        print("  " + " ".join(total.timeouts))
    if total.survived:
        print(f"\n{len(total.survived)} survivors (mutmut show NAME prints one whole):")
        print("\n".join(f"  {line}" for line in total.survived))
    if wrong:
        print("\nmarks to fix in pyproject.toml's [tool.mutmut]:")
        print("\n".join(f"  {line}" for line in wrong))
    if total.rate < floor:
        print(
            f"\nmutation: the kill rate {total.rate:.1%} is below {floor:.0%}: write a test that fails on each "
            "survivor, or mark it equivalent (with why) where no input can tell it from the code"
        )
    return 1 if wrong or total.rate < floor else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="only these mutants (shell patterns over mutmut's names)")
    parser.add_argument("--report", action="store_true", help="print the last pass's figures, without running it")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds the pass may take (default %(default)s)"
    )
    parser.add_argument("--max-children", type=int, help="mutants tested at once (mutmut's default: the CPUs)")
    parser.add_argument(
        "--again",
        action="store_true",
        help="run the mutants named again (after new tests) in the last pass's folder: the whole pass's figures",
    )
    args = parser.parse_args()
    config = settings()
    selected = patterns(config)
    if args.again and not args.mutants:
        parser.error("--again needs the mutants to run again")
    chosen = args.mutants or selected
    elapsed = None if args.report else run_pass(chosen, args.budget, args.max_children, args.again)
    shown = selected if args.again else chosen
    figures, wrong = results(config, shown)
    return report(figures, wrong, elapsed, FLOOR if shown is selected else 0.0)


if __name__ == "__main__":
    sys.exit(main())
