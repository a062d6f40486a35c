"""What the harness tells its user while it works: one-line messages and a progress bar, on stderr, so they read
the same in a terminal and in `docker logs` and never mix with a tool's report on stdout."""

from __future__ import annotations

import sys

from tqdm import tqdm


def say(message: str) -> None:
    """One line on stderr that does not tear an active progress bar."""
    tqdm.write(f"harness: {message}", file=sys.stderr)


def progress_bar(total: int, enabled: bool) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit="img",
        desc="classifying",
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        smoothing=0.1,
    )
