"""torchrun sharding: the slices, and two CPU processes (gloo) writing the same CSV as one process."""

from __future__ import annotations

import json
import socket
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


@pytest.mark.slow
def test_a_failing_rank_makes_every_rank_exit_with_its_code(tmp_path: Path) -> None:
    """Rank 1's model cannot be built (exit 4, a model error): rank 0 must not report a bug (exit 1) or hang."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import os\nimport torch\n\n\nclass Model(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        if os.environ['RANK'] == '1':\n"
        "            raise ValueError('no weights on this node')\n        self.fc = torch.nn.Linear(3, 4)\n\n"
        "    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        env = {
            **env_without_build_args(),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "entrypoint.py", str(SAMPLES), str(tmp_path / "out" / "p.csv")]
        options = ["--model-dir", str(folder), "--label-map", "none", "--progress", "false", "--device", "cpu"]
        ranks.append(subprocess.Popen([*command, *options], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    results = [(process.wait(timeout=300), process.stderr.read()) for process in ranks]
    assert [code for code, _ in results] == [4, 4]
    assert "rank 1 failed: creating Model() failed: ValueError: no weights on this node" in results[0][1]
    assert "creating Model() failed" in results[1][1] and "Traceback" not in results[0][1] + results[1][1]
