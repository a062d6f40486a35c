"""The last word on a written predictions CSV, the same for a run, a torchrun merge and `harness ensemble`: exit 0
follows only from a file that holds exactly one right row per image (and passes the challenge scorer's rules when
it is an ObjectNet top-5 file) with the failures within the limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import CheckFailedError, TooManyFailuresError
from harness.results.contract import committed_problems


def failure_limit(max_failures: float | None, images: int) -> int | None:
    """Failures allowed: a count as given, a fraction of `images`, or None when no limit was given."""
    if max_failures is None:
        return None
    return int(max_failures) if max_failures >= 1 or max_failures == 0 else int(max_failures * images)


@dataclass(frozen=True)
class Verdict:
    status: str  # run.json's: "complete", "invalid predictions" or "too many failures"
    problems: list[str]  # why the file is not right to submit
    failures: int
    total: int
    limit: int | None

    def raise_unless_complete(self, path: Path, errors: Path | None) -> None:
        """Exit 9 for a file that is not right to submit, 7 for too many failures, with one line saying why
        (`errors`: the file that gives each failure's reason, where there is one)."""
        why = f", and {errors} says why each failed" if errors is not None else ""
        if self.problems:
            shown = "; ".join(self.problems[:3])
            more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
            raise CheckFailedError(f"{path} was written but is not right to submit: {shown}{more}")
        if self.status == "complete":
            return
        if self.failures >= self.total:
            raise TooManyFailuresError(
                f"every one of the {self.total} images failed (is the right folder mounted?); the predictions were "
                f"written{why}"
            )
        raise TooManyFailuresError(
            f"{self.failures} of {self.total} images failed, more than --max-failures allows ({self.limit}: pass "
            f"--max-failures N or a fraction to allow more); the predictions were written{why}"
        )


def judge(
    path: Path, keys: list[str], columns: int, scorer_rules: bool, failures: int, total: int, max_failures: float | None
) -> Verdict:
    """The committed CSV against the images it covers (`keys`, in input order) and the failure limit over `total`
    (the images and the folders that could not be listed): with no --max-failures given, not all may fail. A file
    of the challenge's shape (`scorer_rules`: contract.scorer_shaped) is held to every rule of its scorer."""
    problems = committed_problems(path, keys, columns, scorer_rules)
    limit = failure_limit(max_failures, total)
    all_failed = limit is None and total > 0 and failures >= total
    if problems:
        status = "invalid predictions"
    elif (limit is not None and failures > limit) or all_failed:
        status = "too many failures"
    else:
        status = "complete"
    return Verdict(status, problems, failures, total, limit)
