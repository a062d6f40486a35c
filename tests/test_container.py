"""The images built and run for real: scripts/container-test.sh, with its output shown as it goes.

About 11 minutes on a fresh 2-core machine (it installs podman, makes the base images and a wheelhouse), under
a minute after that. Run by CI through `pytest -m "slow or container"`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 45 * 60


def can_run() -> str | None:
    """Why the test cannot run here, or None. In CI it always runs, so a missing tool fails instead of hiding."""
    if os.environ.get("CI"):
        return None
    if os.geteuid() != 0:
        return "scripts/container-test.sh needs root (it installs podman and runs it rootful)"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "neither podman nor apt-get to install it"
    return None


@pytest.mark.container
@pytest.mark.slow
def test_container_script(capsys: pytest.CaptureFixture[str]) -> None:
    reason = can_run()
    if reason:
        pytest.skip(reason)
    lines: list[str] = []
    with capsys.disabled():  # the build's progress and the step times belong in CI's log as they happen
        process = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "container-test.sh")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, "PYTHON": sys.executable},
            start_new_session=True,  # its own process group, so a time-out stops podman too
        )
        assert process.stdout is not None
        watchdog = threading.Timer(TIME_LIMIT_S, os.killpg, (process.pid, signal.SIGTERM))
        watchdog.start()
        try:
            for line in process.stdout:
                lines.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            code = process.wait()
        finally:
            timed_out = watchdog.finished.is_set()  # set when it fired; checked before cancel() sets it too
            watchdog.cancel()
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert not timed_out, f"scripts/container-test.sh ran past {TIME_LIMIT_S} s and was stopped"
    tail = "".join(lines[-40:])
    assert code == 0, f"scripts/container-test.sh exited {code}:\n{tail}"
    assert lines and lines[-1].strip() == "container test: all checks passed", tail
