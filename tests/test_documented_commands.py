"""Every command in README.md and docs/*.md runs as written, from a fresh copy of the checkout.

A command is a line of a fenced ```bash block (a line ending in a backslash goes on in the next; a line that is only
a comment is prose). The slow test runs each in a copy of the checkout's tracked files, from its root, in the order
a reader meets them (README.md, then docs/*.md by name), and expects exit 0. A mark says otherwise: a trailing
comment that starts with it, or an HTML comment on the line before a block, for each command there without a mark
of its own:

    harness check --channel-order bgr   # exit 9: ...      run, and it must exit 9
    scripts/run.sh IMAGE IN OUT         # needs Docker     not run here, for a reason that NEEDS names
    pytest                              # run by .ci/run   not run here: .ci/run runs this very line
    <!-- usage -->                                         a synopsis with placeholders, not a command

A command is run or marked, never skipped in silence: a `needs` that NEEDS does not name, a comment that names an
exit code without the mark, a `run by .ci/run` that .ci/run does not run, and a fence without a language all fail
the fast test below, before anything runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, env_without_build_args

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell")
CI = REPO / ".ci" / "run"
# Why a command is not run here: each a reason that holds wherever the tests run, not a way to skip a slow one.
NEEDS = {
    "a GPU": "a CUDA GPU (scripts/gpu-check.sh runs the GPU tests on one)",
    "Docker": "a container engine (Docker or podman) and the image the command names (tests/test_container.py)",
    "real weights": "a trained checkpoint: the checkout holds none, and random weights do not show what it shows",
    "the network": "it downloads gigabytes from a package index into the Python environment the tests run in",
    "a quiet machine": "a benchmark, whose figures mean something only with nothing else running",
    "other checkouts": "code that is not in this checkout (the ObjectNet template, timm's inference.py)",
    "a mutation pass": "tests run again for each of thousands of mutants: about half an hour, .ci/run's own step",
}
CI_MARK = "run by .ci/run"
USAGE = "usage"
MARK = re.compile(r"(?:exit (?P<code>\d+)|needs (?P<need>[^:;,]+)|(?P<other>run by \.ci/run|usage))(?=$|[:;,]\s)")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>```+)\s*(?P<language>\S*)")
HTML_COMMENT = re.compile(r"^\s*<!--\s*(?P<text>.*?)\s*-->\s*$")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    text: str  # what bash runs
    mark: str  # "" (run, exit 0), "exit N", "needs ...", CI_MARK or USAGE

    @property
    def exit_code(self) -> int | None:
        """The exit code it must end with when run here; None when it is not run here."""
        if not self.mark:
            return 0
        found = MARK.match(self.mark)
        return int(found["code"]) if found and found["code"] else None


def split_comment(line: str) -> tuple[str, str]:
    """(the command, its trailing comment): a `#` that starts a word outside quotes, as bash reads it."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line.rstrip(), ""


def mark_of(comment: str, where: str, problems: list[str]) -> str:
    """The mark a comment starts with ("" for none); what would mislead a reader or hide a command is a problem."""
    found = MARK.match(comment)
    if found and found["need"] and found["need"].strip() not in NEEDS:
        problems.append(f"{where}: needs '{found['need'].strip()}' is not a reason NEEDS names ({', '.join(NEEDS)})")
    if found:
        return found.group(0)
    if re.search(r"\bexit \d+", comment):
        problems.append(f"{where}: the comment names an exit code; start it with the mark (# exit N) or reword it")
    return ""


def read_document(text: str, name: str, problems: list[str]) -> list[Command]:
    """The commands of one Markdown document, with their marks; what is wrong with them is added to problems."""
    lines = text.splitlines()
    commands: list[Command] = []
    number = 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence:
            number += 1
            continue
        start, ticks, indent = number, fence["ticks"], len(fence["indent"])
        number += 1
        while number < len(lines) and not lines[number].strip().startswith(ticks):
            number += 1
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[start + 1 : number]]
        number += 1
        if not fence["language"]:
            problems.append(f"{name}:{start + 1}: a fence without a language: bash for commands, text for output")
        if fence["language"] not in SHELLS:
            continue
        block_mark = ""
        before = HTML_COMMENT.match(lines[start - 1]) if start else None
        if before:
            block_mark = mark_of(before["text"], f"{name}:{start}", problems)
            if not block_mark:
                problems.append(
                    f"{name}:{start}: the HTML comment before a block must be a mark, not '{before['text']}'"
                )
        commands += read_block(body, name, start + 2, block_mark, problems)
    return commands


def read_block(body: list[str], name: str, first: int, block_mark: str, problems: list[str]) -> list[Command]:
    commands = []
    pending, pending_line = "", first
    for offset, line in enumerate(body):
        if not pending:
            pending_line = first + offset
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.rstrip().endswith("\\"):  # bash reads on: the command is every line of it, as written
            pending += line.rstrip() + "\n"
            continue
        command, comment = split_comment(pending + line)
        pending = ""
        where = f"{name}:{pending_line}"
        mark = mark_of(comment, where, problems) or block_mark
        commands.append(Command(where, command.strip(), mark))
    return commands


def read_documents() -> tuple[list[Command], list[str]]:
    problems: list[str] = []
    commands = [
        command
        for path in DOCUMENTS
        for command in read_document(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix(), problems)
    ]
    ci_lines = {line.strip() for line in CI.read_text(encoding="utf-8").splitlines()}
    problems += [
        f"{c.where}: marked '{CI_MARK}', but .ci/run has no line `{c.text}`"
        for c in commands
        if c.mark == CI_MARK and c.text not in ci_lines
    ]
    return commands, problems


def test_every_documented_command_is_run_or_marked() -> None:
    commands, problems = read_documents()
    assert not problems, "\n".join(problems)
    assert commands, f"no ```bash block in {', '.join(p.name for p in DOCUMENTS)}"


def test_marks_are_read_as_written_and_a_misleading_one_is_caught() -> None:
    text = """
<!-- needs Docker -->
```bash
scripts/run.sh img in out   # docker run ...
scripts/build.sh \\
    --cpu   # exit 3
```

```bash
# a comment line
harness check "a # in quotes" #exit 9 is no mark
harness check   # needs coffee
harness check   # runs it: exit 9
```

```
plain
```
"""
    problems: list[str] = []
    commands = read_document(text, "x.md", problems)
    assert [(c.where, c.text, c.mark, c.exit_code) for c in commands] == [
        ("x.md:4", "scripts/run.sh img in out", "needs Docker", None),
        ("x.md:5", "scripts/build.sh \\\n    --cpu", "exit 3", 3),
        ("x.md:11", 'harness check "a # in quotes"', "", 0),
        ("x.md:12", "harness check", "needs coffee", None),
        ("x.md:13", "harness check", "", 0),
    ]
    assert problems == [
        "x.md:11: the comment names an exit code; start it with the mark (# exit N) or reword it",
        "x.md:12: needs 'coffee' is not a reason NEEDS names (" + ", ".join(NEEDS) + ")",
        "x.md:13: the comment names an exit code; start it with the mark (# exit N) or reword it",
        "x.md:16: a fence without a language: bash for commands, text for output",
    ]


def fresh_copy(folder: Path) -> Path:
    """The checkout's tracked files as they are now (a fresh clone, with this worktree's edits)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, or None past TIMEOUT_S; the output): bash runs it, in its own process group, stopped whole."""
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


@pytest.mark.slow
def test_documented_commands_run_as_written(tmp_path: Path) -> None:
    commands, problems = read_documents()
    assert not problems, "\n".join(problems)
    checkout = fresh_copy(tmp_path / "checkout")
    env = env_without_build_args()
    env.pop("CONTAINER_ENGINE", None)
    # `python`, `harness` and `pytest` as the README's install leaves them: this Python's, running the copy's code
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    failures, done = [], set()
    for command in commands:
        expected = command.exit_code
        if expected is None or (command.text, expected) in done:
            continue
        done.add((command.text, expected))
        code, output = run(command.text, checkout, env)
        if code != expected:
            ended = f"ran past {TIMEOUT_S} s" if code is None else f"exited {code}, not {expected}"
            failures.append(f"{command.where}: `{command.text}` {ended}:\n{output[-3000:]}")
    assert done, "no documented command ran"
    assert not failures, "\n\n".join(failures)


# ---- what the documented commands rely on in scripts/ ----

SCRIPTS = REPO / "scripts"


def fake_engine(folder: Path, name: str, script: str) -> Path:
    engine = folder / "bin" / name
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_text("#!/bin/sh\n" + script, encoding="utf-8")
    engine.chmod(0o755)
    return engine


def bash_script(name: str, *args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("message", "code", "explained"),
    [
        ("Error: runc: runc create failed: error setting rlimit type 7: operation not permitted", 126, True),
        ("Error: localhost/img: image not known", 125, False),
    ],
)
def test_run_sh_names_the_fix_for_podmans_rlimit_error(
    tmp_path: Path, message: str, code: int, explained: bool
) -> None:
    engine = fake_engine(tmp_path, "podman", f"echo '{message}' >&2\nexit {code}\n")
    env = {**os.environ, "CONTAINER_ENGINE": str(engine)}
    result = bash_script("run.sh", "img", str(REPO / "sample-images"), str(tmp_path / "out"), env=env)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert message in lines
    fix = "run.sh: podman may not raise the container's limits here (rlimit type 7 is open files, 6 processes)"
    assert lines[-1].startswith(fix) == explained, result.stderr
    if explained:
        assert "CONTAINERS_CONF" in lines[-1] and "default_ulimits = [" in lines[-1]


def test_image_requirements_finds_its_checkout_from_any_folder(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPTS / "image-requirements.py"), "--out", "lists", "--extra", "onnx"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lists" / "torch.txt").read_text(encoding="utf-8").startswith("torch==")
    assert "onnxruntime>=" in (tmp_path / "lists" / "harness.txt").read_text(encoding="utf-8")
    elsewhere = subprocess.run(
        [*command, "--root", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert elsewhere.returncode == 1
    assert (
        elsewhere.stderr
        == f"image-requirements.py: error: {tmp_path} is not a checkout (pyproject.toml, constraints.txt)\n"
    )


def test_build_offline_builds_on_what_the_container_test_provisions(tmp_path: Path) -> None:
    torch = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(encoding="utf-8"), re.M)
    assert torch, "no torch in the lock"
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_ENGINE", "CONTAINERS_CONF")}
    env["CONTAINER_TEST_CACHE"] = str(tmp_path)
    for options, base in (
        (["--cpu"], "localhost/harness-ci/bookworm-python:3.11"),
        ([], f"localhost/harness-ci/pytorch-standin:{torch[1]}"),
    ):
        result = bash_script("build.sh", "--offline", "-n", *options, env=env)
        assert result.returncode == 0, result.stderr
        printed = " ".join(result.stdout.split())
        assert printed.startswith("podman build ")
        for pair in (
            f"--build-arg BASE_IMAGE={base}",
            "--build-arg PIP_NO_INDEX=1",
            "--build-arg PIP_FIND_LINKS=/wheels",
            "--network none",
            f"--volume {tmp_path}/wheelhouse:/wheels:ro",
        ):
            assert pair in printed, pair

    podman = fake_engine(tmp_path, "podman", "exit 1\n")  # `podman image exists` answers no
    refused = bash_script("build.sh", "--cpu", "--offline", env={**env, "CONTAINER_ENGINE": str(podman)})
    assert (
        refused.returncode == 1 and "no wheelhouse in" in refused.stderr and "container-provision.sh" in refused.stderr
    )
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / ".complete").write_text("stamp\n", encoding="utf-8")
    refused = bash_script("build.sh", "--cpu", "--offline", env={**env, "CONTAINER_ENGINE": str(podman)})
    assert refused.returncode == 1
    assert "no local image localhost/harness-ci/bookworm-python:3.11" in refused.stderr
    docker = fake_engine(tmp_path, "docker", "exit 0\n")
    refused = bash_script("build.sh", "--cpu", "--offline", env={**env, "CONTAINER_ENGINE": str(docker)})
    assert refused.returncode == 1 and "--offline needs podman" in refused.stderr
