"""torchrun sharding: the slices, and two CPU processes (gloo) writing the same CSV as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.pipeline.files import shard
from tests.helpers import REPO, SAMPLES, env_without_build_args


@pytest.mark.parametrize("count", [0, 1, 7, 19, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("unit", [1, 8])
def test_shards_are_whole_batches_that_partition_the_list_in_order(count: int, world: int, unit: int) -> None:
    items = list(range(count))
    parts = [shard(items, rank, world, unit) for rank in range(world)]
    assert [x for part in parts for x in part] == items
    assert all(len(part) % unit == 0 for part in parts[:-1] if part)
    assert max(map(len, parts)) - min(map(len, parts)) <= unit * (1 + (world > 1))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_the_single_process_csv(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    # 19 images in batches of 8: 16 + 3 across the ranks. torchrun gives each process one thread, and on the CPU
    # the thread count can change a score's last digit, so the single run gets one too.
    options = ["--progress", "false", "--device", "cpu", "--batch-size", "8", "--threads", "1"]
    env = env_without_build_args()
    single, multi = tmp_path / "single" / "predictions.csv", tmp_path / "multi" / "predictions.csv"
    subprocess.run(
        [sys.executable, "entrypoint.py", str(SAMPLES), str(single), *options], cwd=REPO, env=env, check=True
    )
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "entrypoint.py", str(SAMPLES), str(multi), *options],
        cwd=REPO,
        env=env,
        check=True,
    )
    assert multi.read_bytes() == single.read_bytes()
    assert (multi.parent / "errors.csv").read_text() == ""
    assert sorted(p.name for p in multi.parent.iterdir()) == ["errors.csv", "predictions.csv", "run.json"]


@pytest.mark.slow
def test_torchrun_judges_failures_over_all_ranks(tmp_path: Path) -> None:
    """One unreadable image on each rank: the merged CSV is complete, and --max-failures sees both."""
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "z.png"):  # sorted first and last: one lands on each rank
        (images / name).write_bytes(b"not a png")
    for name in ("coffee.png", "chelsea.png"):
        (images / f"m-{name}").write_bytes((SAMPLES / name).read_bytes())
    output = tmp_path / "out" / "predictions.csv"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "entrypoint.py",
        str(images),
        str(output),
        "--progress",
        "false",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    result = subprocess.run(
        [*command, "--max-failures", "1"],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "2 of 4 images failed" in result.stderr
    rows = [line.split(",")[0] for line in output.read_text().splitlines()]
    assert rows == ["a.png", "m-chelsea.png", "m-coffee.png", "z.png"]
    errors = [line.split(",")[0] for line in (output.parent / "errors.csv").read_text().splitlines()]
    assert errors == ["a.png", "z.png"]
    assert json.loads((output.parent / "run.json").read_text())["status"] == "too many failures"
