"""The benchmark script runs all its phases on a tiny data set (a smoke test: no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, env_without_build_args


@pytest.mark.slow
def test_bench_runs_every_phase_and_reports_the_figures(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "--images",
            "8",
            "--seconds",
            "1",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            str(tmp_path / "bench.json"),
            "--",
            "--batch-size",
            "4",
        ],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "bench.json").read_text())
    for name in ("model_only_ips", "decode_only_ips", "end_to_end_ips", "limit_ips", "efficiency", "peak_rss_mb"):
        assert figures[name] > 0, name
    assert figures["limit_ips"] == pytest.approx(  # the figures are written to 2 decimals
        1 / (1 / figures["model_only_ips"] + 1 / figures["decode_only_ips"]), rel=1e-3, abs=0.01
    )
