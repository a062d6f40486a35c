"""torchrun sharding: the slices; two CPU processes (gloo) writing the same CSV as one process, on one machine and as
two machines (two torchrun agents meeting through c10d rendezvous); and a run killed on one node resuming, each rank
from its own part."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness.pipeline import sandbox
from harness.pipeline.distributed import part_config, reopen_finished_part
from harness.pipeline.files import shard
from harness.results.writer import partial_path
from harness.sources import build_config
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


def test_a_finished_part_is_reopened_for_resume_and_a_partial_one_left_alone(tmp_path: Path) -> None:
    given = {"output_file": str(tmp_path / "p.csv"), "world_size": "2", "rank": "1"}
    config = build_config({**given, "master_addr": "127.0.0.1", "master_port": "29500"}, {}, {})
    part = part_config(config)
    part.output_file.parent.mkdir(parents=True)
    part.output_file.write_text("a.png,1\n")
    part.errors_csv.write_text("")
    reopen_finished_part(part)
    assert partial_path(part.output_file).read_text() == "a.png,1\n" and not part.output_file.exists()
    assert partial_path(part.errors_csv).exists() and not part.errors_csv.exists()
    part.output_file.write_text("older\n")  # a committed file beside a partial one: the partial is the newer
    reopen_finished_part(part)
    assert partial_path(part.output_file).read_text() == "a.png,1\n" and part.output_file.read_text() == "older\n"


@pytest.mark.equivalence
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
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "entrypoint.py", str(SAMPLES), str(multi), *options],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert multi.read_bytes() == single.read_bytes()
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("harness:")]
    closing = [line for line in said if " failed, " in line]
    assert len(closing) == 1 and closing[0].endswith(str(multi)), said  # one closing line: the merged run's
    assert not any(".parts" in line or line.startswith("harness: 0 images") for line in said), said
    assert (multi.parent / "errors.csv").read_text() == ""
    assert sorted(p.name for p in multi.parent.iterdir()) == ["errors.csv", "predictions.csv", "run.json"]
    confinement = json.loads((multi.parent / "run.json").read_text())["confinement"]
    if sandbox.landlock_abi() >= 4:  # each rank confined its files; TCP stays open for the rendezvous
        assert (confinement["state"], confinement["network"]) == ("filesystem", "TCP (torchrun)")


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agents(images: Path, output: Path, options: list[str], port: int) -> list[subprocess.Popen]:
    """Two torchrun agents as two machines would start them: --nnodes 2, one process each, meeting at a c10d
    rendezvous on this machine (the ranks go by the order they join). Each in its own session, so one can be killed
    with everything it started."""
    torchrun = Path(sys.executable).with_name("torchrun")
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex]
    command = [str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", *rendezvous, "entrypoint.py"]
    return [
        subprocess.Popen(
            [*command, str(images), str(output), *options],
            cwd=REPO,
            env=env_without_build_args(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]


def _finish(agents: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    return [(agent.wait(timeout=timeout), agent.stdout.read()) for agent in agents]


# One thread in the single run too: torchrun gives each process one, and the thread count can move a CPU score's
# last digit.
SAME_AS_ONE_PROCESS = ["--progress", "false", "--device", "cpu", "--threads", "1", "--workers", "1"]


@pytest.mark.equivalence
@pytest.mark.slow
def test_two_torchrun_agents_as_two_machines_write_the_single_process_csv(tmp_path: Path) -> None:
    options = [*SAME_AS_ONE_PROCESS, "--batch-size", "8"]  # 19 images: 16 + 3 across the ranks
    single, multi = tmp_path / "single" / "predictions.csv", tmp_path / "multi" / "predictions.csv"
    env = env_without_build_args()
    subprocess.run(
        [sys.executable, "entrypoint.py", str(SAMPLES), str(single), *options], cwd=REPO, env=env, check=True
    )
    results = _finish(_agents(SAMPLES, multi, options, _free_port()))
    assert [code for code, _ in results] == [0, 0], results
    assert multi.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in multi.parent.iterdir()) == ["errors.csv", "predictions.csv", "run.json"]
    assert json.loads(multi.with_name("run.json").read_text())["world_size"] == 2


SLOW_MODEL = """import time
import torch


class Model(torch.nn.Module):
    \"\"\"A small network that takes its time over each batch, so a run can be killed part way.\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        time.sleep(0.3)
        return self.fc(self.conv(x).mean((2, 3)))
"""


def _rows(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_tree(agent: subprocess.Popen) -> None:
    """The agent, its worker and the worker's decoders, as a machine going down would end them (torchrun starts
    its worker in a session of its own, so the agent's process group is not enough)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [agent.pid]
    while stack:
        tree.append(stack.pop())
        stack.extend(children.get(tree[-1], []))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait(timeout=60)


@pytest.mark.equivalence
@pytest.mark.slow
def test_a_run_killed_on_one_node_resumes_each_rank_from_its_own_part(tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for n in range(6):  # 114 images: 57 a rank, 15 batches of 4 each at 0.3 s
        for sample in sorted(SAMPLES.glob("*.*g")):
            shutil.copy(sample, images / f"{n}-{sample.name}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.py").write_text(SLOW_MODEL)
    options = [*SAME_AS_ONE_PROCESS, "--batch-size", "4", "--model-dir", str(model), "--label-map", "none"]
    output = tmp_path / "out" / "predictions.csv"
    parts = [output.parent / f".predictions.csv.parts/rank{rank}/predictions.csv.partial" for rank in (0, 1)]

    agents = _agents(images, output, options, _free_port())
    deadline = time.monotonic() + 240
    while min(map(_rows, parts)) < 8 and time.monotonic() < deadline and all(a.poll() is None for a in agents):
        time.sleep(0.05)
    assert min(map(_rows, parts)) >= 8, _finish(agents)
    _kill_tree(agents[1])
    try:  # the other node's rank finds its peer gone at the latest when it has finished its share
        agents[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(agents[0])
    assert agents[0].returncode != 0 and not output.exists()

    results = _finish(_agents(images, output, [*options, "--resume"], _free_port()))
    assert [code for code, _ in results] == [0, 0], results
    resumed = [line for _, log in results for line in log.splitlines() if "resuming after" in line]
    assert len(resumed) == 2 and all(int(line.split("resuming after ")[1].split()[0]) >= 8 for line in resumed)

    single = tmp_path / "single" / "predictions.csv"
    subprocess.run(
        [sys.executable, "entrypoint.py", str(images), str(single), *options],
        cwd=REPO,
        env=env_without_build_args(),
        check=True,
    )
    assert output.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in output.parent.iterdir()) == ["errors.csv", "predictions.csv", "run.json"]


def test_world_size_without_a_place_to_meet_is_exit_2(tmp_path: Path) -> None:
    env = {**env_without_build_args(), "WORLD_SIZE": "2", "RANK": "0"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    command = [sys.executable, "entrypoint.py", str(SAMPLES), str(tmp_path / "p.csv"), "--progress", "false"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["timeout", "SIGTERM"])
def test_a_rank_whose_peer_never_comes_ends_instead_of_hanging(tmp_path: Path, stop: str) -> None:
    """Its rendezvous ends after --dist-timeout as exit 2, and docker stop (SIGTERM) ends the wait at once: 130."""
    env = {**env_without_build_args(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    output = tmp_path / "p.csv"
    timeout = "4" if stop == "timeout" else "600"
    command = [sys.executable, "entrypoint.py", str(SAMPLES), str(output), "--progress", "false"]
    process = subprocess.Popen(
        [*command, "--dist-timeout", timeout], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    lines = []
    if stop == "SIGTERM":
        assert process.stderr is not None
        while not any("meeting the others" in line for line in lines) and process.poll() is None:
            lines.append(process.stderr.readline())
        time.sleep(1)  # inside the wait
        process.send_signal(signal.SIGTERM)
    err = "".join(lines) + process.communicate(timeout=120)[1]
    assert process.returncode == (2 if stop == "timeout" else 130), err
    assert "Traceback" not in err
    if stop == "timeout":
        assert "could not meet the others" in err and "--dist-timeout 4 s" in err


DYING = """import os
import torch


class Dying(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x):
        if os.environ.get("RANK") == "1" and x.shape[0] > 1:
            os._exit(3)  # a rank lost outright (the OOM killer, a machine gone): no word of its own
        return self.fc(x.float().mean((2, 3)))
"""


@pytest.mark.slow
def test_a_rank_that_dies_leaves_the_others_one_line_each(tmp_path: Path) -> None:
    """Rank 1 dies mid-run: rank 0 says so in one harness line, whether it finished first (gloo's lost peer) or was
    stopped by torchrun's agent (SIGTERM), never a traceback of its own."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(DYING)
    (folder / "config.yaml").write_text("class_name: Dying\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "entrypoint.py", str(SAMPLES)]
    command += [str(tmp_path / "out" / "p.csv"), "--model-dir", str(folder), "--progress", "false"]
    done = subprocess.run(
        [*command, "--device", "cpu", "--batch-size", "8", "--threads", "1"],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    rank0 = [line for line in done.stderr.splitlines() if "rank 0" in line or "[rank0]" in line]
    said = [line for line in done.stderr.splitlines() if line.startswith(("harness: error:", "harness: terminated"))]
    assert said, done.stderr
    assert "another rank stopped answering" in said[0] or "every rank stops when one fails" in said[0]
    assert not any("Traceback" in line for line in rank0), rank0
