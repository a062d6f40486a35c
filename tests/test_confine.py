"""Confinement (harness/pipeline/confine.py, sandbox.py) and the output gate (harness/results/gate.py): what a confined
run may reach, proven on this machine's kernel class by class, and a hostile model's every attempt refused in one
line, while `--confine off` lets the same attempts through (so the tests can fail)."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import glob
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import RUN_FIELDS, Config
from harness.pipeline import confine, sandbox
from harness.pipeline.confine import SYSTEM_READ, SYSTEM_RUN, Confinement, denial, rules
from harness.results import gate
from harness.results.gate import (
    ANYTHING,
    OutputFiles,
    gated,
    make_folder,
    open_output,
    remove_folder,
    remove_output,
    replace_output,
    sync_folder,
)
from harness.results.outputs import run_outputs
from harness.sources import build_config
from tests.helpers import REPO, SAMPLES, env_without_build_args

pytestmark = pytest.mark.skipif(sandbox.landlock_abi() < 6, reason="needs a kernel with Landlock ABI 6 or newer")

# ---- the kernel's side, class by class, in one confined process ----

PROBE = r"""
import ctypes, errno, fcntl, json, os, socket, subprocess, sys, termios
from pathlib import Path
from harness.pipeline import sandbox
from harness.models.reads import software_places
from harness.pipeline.confine import SYSTEM_READ, SYSTEM_RUN

places = json.loads(sys.argv[1])
tty_main, tty_other = os.openpty()  # a terminal opened before: its descriptor survives the confinement
granted = [sandbox.Rule(Path(p), sandbox.RUN) for p in [*SYSTEM_RUN, *map(str, software_places())]]
granted += [sandbox.Rule(Path(p), sandbox.READ) for p in SYSTEM_READ]
granted += [sandbox.Rule(Path(places["images"]), sandbox.READ), sandbox.Rule(Path(places["scratch"]), sandbox.WRITE)]
granted += [sandbox.Rule(Path("/dev/shm"), sandbox.WRITE), sandbox.Rule(Path("/dev/null"), sandbox.DEVICE)]
sandbox.restrict(granted, close_network=True)
scratch = Path(places["scratch"])
results = {}


def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except OSError as error:
        results[name] = errno.errorcode.get(error.errno, str(error.errno))
    except subprocess.CalledProcessError:
        results[name] = "the child failed"


def write(path):
    with open(path, "w") as f:
        f.write("x")


def connect(family, kind, address):
    with socket.socket(family, kind) as s:
        s.settimeout(2)
        s.connect(address) if kind == socket.SOCK_STREAM else s.sendto(b"x", address)


def shared_memory():
    write("/dev/shm/harness-probe-%d" % os.getpid())
    os.unlink("/dev/shm/harness-probe-%d" % os.getpid())


def through_a_link():
    os.symlink(places["answers"], scratch / "link")
    open(scratch / "link").read()


def own_child():
    child = subprocess.Popen(["sleep", "0.2"])
    os.kill(child.pid, 0)
    child.wait()


def io_uring():
    if sandbox._libc().syscall(425, 1, ctypes.create_string_buffer(120)) == -1:
        raise OSError(ctypes.get_errno(), "io_uring_setup")


attempt("read an image", lambda: open(Path(places["images"]) / "a.png", "rb").read())
attempt("read beside the images", lambda: open(places["answers"]).read())
attempt("write outside", lambda: write(places["victim"]))
attempt("add a file to the images", lambda: write(Path(places["images"]) / "new.png"))
attempt("write the private folder", lambda: write(scratch / "mine"))
attempt("write /dev/shm", shared_memory)
attempt("read through a link", through_a_link)
attempt("hard-link a file in", lambda: os.link(places["answers"], scratch / "hard"))
attempt("tcp", lambda: connect(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", places["tcp"])))
attempt("tcp6", lambda: connect(socket.AF_INET6, socket.SOCK_STREAM, ("::1", places["tcp"])))
attempt("udp", lambda: connect(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", places["tcp"])))
attempt("abstract socket outside", lambda: connect(socket.AF_UNIX, socket.SOCK_STREAM, places["abstract"]))
attempt("signal a process outside", lambda: os.kill(places["outside_pid"], 0))
attempt("signal its own child", own_child)
attempt("type into a terminal", lambda: fcntl.ioctl(tty_other, termios.TIOCSTI, b"x"))
attempt("io_uring", io_uring)
attempt("run a program", lambda: subprocess.run(["/bin/true"], check=True))
reader = f"open({places['answers']!r}).read()"
attempt("a child reads beside the images", lambda: subprocess.run([sys.executable, "-c", reader], check=True))
print(json.dumps(results))
"""

ALLOWED = ("read an image", "write the private folder", "write /dev/shm", "signal its own child", "run a program")


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("probe")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(b"png")
    (root / "answers.json").write_text("{}")
    (root / "scratch").mkdir()
    victim = root / "victim.py"
    victim.write_text("print('mine')\n")
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0harness-probe-%d" % os.getpid())
    abstract.listen()
    places = {
        "images": str(root / "images"),
        "answers": str(root / "answers.json"),
        "scratch": str(root / "scratch"),
        "victim": str(victim),
        "tcp": listener.getsockname()[1],
        "abstract": abstract.getsockname().decode("latin-1"),
        "outside_pid": os.getpid(),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(places)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    listener.close()
    abstract.close()
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "print('mine')\n"
    return json.loads(done.stdout)


def test_a_confined_process_reaches_only_what_it_was_granted(probe: dict[str, str]) -> None:
    allowed = {name: result for name, result in probe.items() if name in ALLOWED}
    assert allowed == dict.fromkeys(ALLOWED, "ok")
    refused = {name: result for name, result in probe.items() if name not in ALLOWED}
    assert refused == {
        "read beside the images": "EACCES",
        "write outside": "EACCES",
        "add a file to the images": "EACCES",
        "read through a link": "EACCES",  # the kernel checks the file a link leads to
        "hard-link a file in": "EXDEV",  # Landlock refuses to link in a file from a folder it does not grant
        "tcp": "ENETDOWN",  # seccomp: no socket but a UNIX one
        "tcp6": "ENETDOWN",
        "udp": "ENETDOWN",
        "abstract socket outside": "EPERM",  # Landlock's scope: only the run's own processes' sockets
        "signal a process outside": "EPERM",
        "type into a terminal": "EPERM",  # TIOCSTI
        "io_uring": "EPERM",
        "a child reads beside the images": "the child failed",  # what the run starts inherits it all
    }


def test_landlock_refuses_a_process_that_already_runs_threads() -> None:
    code = textwrap.dedent(
        """
        import threading, time
        from harness.pipeline import sandbox
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        try:
            sandbox.restrict([], close_network=True)
        except sandbox.SandboxError as error:
            print(error)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "already runs 2 threads" in done.stdout, done.stderr


def test_importing_the_run_and_reading_its_settings_starts_no_thread() -> None:
    """What a run does before it confines itself leaves it one thread: numpy's BLAS or torch imported early would
    start threads that Landlock leaves free."""
    code = textwrap.dedent(
        """
        import sys
        import harness.cli, harness.tools.commands
        from harness.options import sources_from
        from harness.pipeline import sandbox
        sources_from({"input_dir": "sample-images", "model": "timm:resnet18", "checkpoint": "x"}, {})
        sources_from({"input_dir": "sample-images"}, {})
        print(sandbox.threads(), "torch" in sys.modules, "numpy" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "False", "False"], done.stderr


# ---- the rules a run gets, from its settings ----


def test_every_setting_that_names_a_file_says_whether_the_run_reads_or_writes_it() -> None:
    """A new setting naming a file cannot be forgotten by the confinement: each Path setting, and each text one that
    names a file, declares its role; the roles are the settings the rules are built from."""
    for name, spec in RUN_FIELDS.items():
        if "Path" in str(spec.type):
            assert spec.metadata["path"] in ("read", "write"), name
    roles = {name: spec.metadata["path"] for name, spec in RUN_FIELDS.items() if spec.metadata["path"]}
    assert roles == {
        "input_dir": "read",
        "output_file": "write",
        "model": "read",
        "model_dir": "read",
        "module": "read",
        "checkpoint": "read",
        "label_map": "read",
        "save_probs": "write",
    }


def test_a_runs_rules_read_its_files_and_write_nothing_of_its_output_folder(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    checkpoint = tmp_path / "weights" / "w.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    output = tmp_path / "out" / "p.csv"
    given = {"input_dir": SAMPLES, "output_file": output, "label_map": labels, "checkpoint": checkpoint}
    config = build_config({**given, "model_dir": REPO / "model", "topk": 2}, {}, {})
    scratch = tmp_path / "scratch"
    granted = {rule.path: rule.rights for rule in rules(config, {}, [], scratch)}

    def reads(path: Path) -> bool:
        return any(
            path.resolve().is_relative_to(place) and rights & sandbox.READ_FILE for place, rights in granted.items()
        )

    assert all(reads(path) for path in (SAMPLES, REPO / "model", labels, checkpoint))
    assert not reads(tmp_path / "answers.json")
    assert {path for path, rights in granted.items() if rights & sandbox.MAKE_REG} == {Path("/dev/shm"), scratch}
    assert not any(output.parent.is_relative_to(path) for path in granted)  # not even readable
    assert run_outputs(config).files >= {output, output.with_name("run.json"), output.with_name("errors.csv.partial")}


def test_rules_covered_by_another_are_left_out_and_none_is_lost() -> None:
    """A rule goes when a folder above it, or the same path already kept, grants all it grants; the rest stay, in
    order: the rights of one path given twice add up before the folders below them are judged."""
    rule = sandbox.Rule
    read, run, write, read_file = sandbox.READ, sandbox.RUN, sandbox.WRITE, sandbox.READ_FILE
    given = [
        rule(Path("/a"), read),
        rule(Path("/a/b"), read),  # /a reads it already
        rule(Path("/a/b"), run),  # and execution too: more than /a grants
        rule(Path("/c"), read),
        rule(Path("/c"), read),  # the same again
        rule(Path("/c"), read_file),  # less than /c's
        rule(Path("/c"), run),  # execution too: more than /c was given
        rule(Path("/x"), read),
        rule(Path("/x"), write & ~read),  # /x: read and write, given in two rules
        rule(Path("/x/y"), write),  # within what /x's two rules grant together
        rule(Path("/x"), read),  # given already, by the first of them
        rule(Path("/d/e"), write),
        rule(Path("/d"), read),
        rule(Path("/e/f"), sandbox.EXECUTE),  # a right alone (its bit is 1), under no folder given anything
    ]
    assert confine._without_repeats(given) == [
        rule(Path("/a"), read),
        rule(Path("/a/b"), run),
        rule(Path("/c"), read),
        rule(Path("/c"), run),
        rule(Path("/x"), read),
        rule(Path("/x"), write & ~read),
        rule(Path("/d/e"), write),
        rule(Path("/d"), read),
        rule(Path("/e/f"), sandbox.EXECUTE),
    ]


def test_a_runs_rules_read_the_system_its_libraries_and_devices_and_name_servers_only_under_torchrun(
    tmp_path: Path,
) -> None:
    config = build_config({"model_dir": REPO / "model"}, {}, {})
    extra = tmp_path / "extra.txt"
    environ = {"LD_LIBRARY_PATH": "/opt/vendor/lib:relative/lib::/usr/local/cuda/lib64"}

    def granted(config: Config) -> list[sandbox.Rule]:
        return rules(config, environ, [extra], tmp_path / "scratch")

    def covered(found: list[sandbox.Rule], path: Path, rights: int) -> bool:
        return any(
            (path == rule.path or path.is_relative_to(rule.path)) and rule.rights & rights == rights for rule in found
        )

    alone, ranked = granted(config), granted(dataclasses.replace(config, world_size=2))
    for found in (alone, ranked):
        assert all(covered(found, Path(place), sandbox.RUN) for place in SYSTEM_RUN)
        assert all(covered(found, Path(place), sandbox.READ) for place in SYSTEM_READ)
        devices = [Path(device) for pattern in confine.DEVICES for device in glob.glob(pattern)]
        assert devices and all(covered(found, device, sandbox.DEVICE) for device in devices)
        assert all(covered(found, place, sandbox.RUN) for place in confine.software_places())
        for library in ("/opt/vendor/lib", "/usr/local/cuda/lib64"):
            assert covered(found, Path(library), sandbox.RUN)
        assert not any(str(rule.path).startswith("relative") for rule in found)
        assert covered(found, extra.resolve(), sandbox.READ) and covered(found, REPO / "model", sandbox.READ)
    assert not covered(alone, Path("/etc/resolv.conf"), sandbox.READ_FILE)
    assert covered(ranked, Path("/etc/resolv.conf"), sandbox.READ)


# ---- the gate ----


def test_the_gate_opens_only_the_runs_files_and_never_through_a_link(tmp_path: Path) -> None:
    output = tmp_path / "p.csv"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    with gated(OutputFiles.of([output])):
        fd = open_output(output.with_name("p.csv.partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b"a.png,1\n")
        os.close(fd)
        replace_output(output.with_name("p.csv.partial"), output)
        assert output.read_text() == "a.png,1\n"
        with pytest.raises(PermissionError):
            open_output(tmp_path / "other.csv", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(PermissionError):
            replace_output(output, victim)
        output.with_name("p.csv.partial").symlink_to(victim)
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            open_output(output.with_name("p.csv.partial"), os.O_WRONLY | os.O_TRUNC)
        remove_output(output.with_name("p.csv.partial"))  # the link itself, not its target
        os.mkfifo(output.with_name("p.csv.partial"))
        with pytest.raises(OSError, match="not a regular file"):  # and it did not block on the pipe
            open_output(output.with_name("p.csv.partial"), os.O_RDONLY)
        with pytest.raises(OSError, match="No such device or address"):  # a pipe nobody reads: refused at once
            open_output(output.with_name("p.csv.partial"), os.O_WRONLY)
    assert victim.read_text() == "keep\n" and stat.S_ISFIFO(os.lstat(output.with_name("p.csv.partial")).st_mode)


def test_each_refusal_of_a_confined_run_is_worded_by_what_was_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line a user sees for an error the confinement caused (the kernel's errno, or a library's error that kept
    only its words), found anywhere in the error's chain; any other error is not the confinement's."""
    images, model = tmp_path / "images", tmp_path / "model"
    granted = (sandbox.Rule(images, sandbox.READ), sandbox.Rule(model / "weights.pt", sandbox.READ_FILE))
    granted += (sandbox.Rule(tmp_path / "scratch", sandbox.WRITE), sandbox.Rule(Path("/dev/null"), sandbox.DEVICE))
    confined = Confinement("filesystem+network", rules=granted)
    assert confined.readable(images) and confined.readable(images / "a" / "b.png")
    assert confined.readable(model / "weights.pt") and not confined.readable(model / "other.pt")
    assert not confined.readable(tmp_path / "imagesX") and not confined.readable(tmp_path)
    assert Confinement("filesystem", rules=(sandbox.Rule(images, sandbox.MAKE_REG),)).readable(images) is False
    assert confined.paths(sandbox.READ_FILE) == sorted(str(rule.path) for rule in granted)
    assert confined.paths(sandbox.READ) == [str(images), str(tmp_path / "scratch")]
    assert confined.paths(sandbox.MAKE_REG) == [str(tmp_path / "scratch")]
    monkeypatch.setattr(confine._process, "confinement", confined)
    lift = "--confine off to allow"
    outside = tmp_path / "elsewhere.txt"

    def said(error: BaseException, who: str = "the model") -> str | None:
        return denial(error, who)

    assert (
        denial(OSError(sandbox.NETWORK_ERRNO, "down"))  # who: the model, by default
        == f"the model tried to use the network: a confined run has none; {lift}"
    )
    assert (
        said(PermissionError(errno.EACCES, "denied"))
        == f"the model tried to use the network: a confined run has none; {lift}"
    )
    assert said(PermissionError(errno.EACCES, "denied", str(outside))) == (
        f"the model tried to open {outside}: a confined run may read only its images, its model's files and Python, "
        f"and write only its output files; {lift}"
    )
    assert said(PermissionError(errno.EACCES, "denied", str(images / "x.png")), who="the harness") == (
        f"the harness tried to write {images / 'x.png'}: a confined run may write only its output files; {lift}"
    )
    assert said(PermissionError(errno.EACCES, "denied", os.fsencode(outside))) == said(
        PermissionError(errno.EACCES, "denied", str(outside))
    )
    assert said(PermissionError(errno.EPERM, "not permitted")) == (
        "the model was refused an operation outside the run: a confined run may signal only its own processes and "
        f"use no io_uring or terminal input; {lift}"
    )
    assert said(PermissionError(errno.EPERM, "not permitted", str(outside))) is None
    assert said(FileNotFoundError(errno.ENOENT, "missing", str(outside))) is None
    torch_words = f"unable to open file <{outside}> in read-binary mode: Permission denied"
    assert said(RuntimeError(f"loading failed\n{torch_words}")) == said(PermissionError(errno.EACCES, "", str(outside)))
    assert said(RuntimeError("Permission denied, somewhere")) == (
        f"the model was refused a file outside what a confined run may reach; {lift}"
    )
    assert said(RuntimeError("the model's own failure")) is None
    try:
        try:
            raise PermissionError(errno.EACCES, "denied", str(outside))
        except PermissionError as cause:
            raise ValueError("a wrapper") from cause
    except ValueError as wrapped:
        assert said(wrapped) == said(PermissionError(errno.EACCES, "denied", str(outside)))
    try:
        try:
            raise OSError(sandbox.NETWORK_ERRNO, "down")
        except OSError:
            raise KeyError("raised while handling it") from None
    except KeyError as context_only:
        assert context_only.__cause__ is None and said(context_only) is not None  # found through __context__
    looped = RuntimeError("a cycle")
    looped.__context__ = ValueError("back")
    looped.__context__.__context__ = looped
    assert said(looped) is None
    monkeypatch.setattr(confine._process, "confinement", Confinement("off", "--confine off"))
    assert said(OSError(sandbox.NETWORK_ERRNO, "down")) is None


def test_the_gates_refusals_say_what_and_name_the_file(tmp_path: Path) -> None:
    """Each refusal an errno, its words and the file; a request that lacks a field is read with that field empty
    (the working folder, opened read-only), never as some other name."""
    output, other = tmp_path / "p.csv", tmp_path / "other.csv"
    partial = output.with_name("p.csv.partial")
    allowed = OutputFiles.of([output])

    def refusal(request: dict) -> tuple[int | None, str | None, str | None]:
        with pytest.raises(OSError) as refused:
            gate._perform(allowed, request)
        return refused.value.errno, refused.value.strerror, refused.value.filename

    assert refusal({"op": "open", "path": str(other), "flags": os.O_RDONLY}) == (
        errno.EACCES,
        "not one of the run's output files",
        str(other),
    )
    assert refusal({"op": "open", "path": str(output), "flags": os.O_WRONLY | os.O_SYNC}) == (
        errno.EINVAL,
        "flags the gate does not take",
        str(output),
    )
    partial.mkdir()  # a folder where a file is written
    assert refusal({"op": "open", "path": str(partial), "flags": os.O_RDONLY}) == (
        errno.EINVAL,
        "not a regular file",
        str(partial),
    )
    assert refusal({"op": "replace", "path": str(partial), "to": str(output)}) == (
        errno.EINVAL,
        "not a regular file",
        str(partial),
    )
    assert refusal({"op": "chmod", "path": str(output)}) == (errno.EINVAL, "no such operation 'chmod'", None)
    assert refusal({"op": "open", "flags": os.O_RDONLY}) == (errno.EACCES, "not one of the run's output files", ".")
    output.write_text("a.png,1\n")
    assert refusal({"op": "replace", "path": str(output)}) == (errno.EACCES, "not one of the run's output files", ".")
    fd = gate._perform(allowed, {"op": "open", "path": str(output)})  # no flags: read-only
    assert fd is not None
    try:
        assert os.read(fd, 100) == b"a.png,1\n" and os.get_blocking(fd)
    finally:
        os.close(fd)


def test_the_gate_makes_and_removes_only_the_runs_folders_and_joins_two_sets(tmp_path: Path) -> None:
    """torchrun's parts folder is made and removed whole; any other folder is refused, whichever set names it."""
    output, parts, other = tmp_path / "p.csv", tmp_path / "parts", tmp_path / "other"
    other.mkdir()
    joined = OutputFiles.of([output]) | OutputFiles.of([], [parts])
    assert joined == OutputFiles(OutputFiles.of([output]).files, frozenset({parts}))
    assert (joined | ANYTHING).anything and not joined.anything
    with gated(joined):
        make_folder(parts)
        (parts / "rank0.csv").write_text("a.png,1\n")
        sync_folder(tmp_path)
        make_folder(parts)  # there already: no error
        for refused in (make_folder, remove_folder, sync_folder):
            with pytest.raises(PermissionError) as error:
                refused(other)
            assert (error.value.strerror, error.value.filename) == ("not one of the run's output folders", str(other))
        remove_folder(parts)
        remove_folder(parts)  # gone already: no error
    assert not parts.exists() and other.is_dir()
    with gated(OutputFiles.of([output])), pytest.raises(PermissionError, match="output folders"):
        make_folder(parts)
    assert not parts.exists()


def test_the_gates_loop_answers_each_request_by_its_number_and_outlives_garbage(tmp_path: Path) -> None:
    """The gate's loop and the run's end of it, in this process (the run forks the loop; here a thread serves it,
    so that every line of both is reached): replies by number, refusals as errors, garbage answered, a stale
    reply skipped and its descriptor closed, the private folder removed once the run's end closes."""
    output, scratch = tmp_path / "p.csv", tmp_path / "scratch"
    scratch.mkdir()
    descriptors = set(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=gate._serve, args=(OutputFiles.of([output]), theirs, [scratch]))
    server.start()
    remote = gate._Remote(ours)
    fd = remote({"op": "open", "path": str(output), "flags": os.O_WRONLY | os.O_CREAT})
    assert fd is not None
    os.write(fd, b"a.png,1\n")
    os.close(fd)
    with pytest.raises(PermissionError) as refused:
        remote({"op": "open", "path": str(tmp_path / "other.csv"), "flags": os.O_WRONLY | os.O_CREAT})
    assert (refused.value.strerror, refused.value.filename) == (
        "not one of the run's output files",
        str(tmp_path / "other.csv"),
    )
    assert not (tmp_path / "other.csv").exists()
    with pytest.raises(OSError, match="no such operation 'chmod'"):
        remote({"op": "chmod", "path": str(output)})
    for garbage in (b"{not json", b"[1]"):
        ours.send(garbage)
        assert json.loads(ours.recv(65536)) == {
            "id": None,
            "errno": errno.EINVAL,
            "strerror": "not a request the gate takes",
        }
    ours.send(b"{not json")  # its reply, numbered None, waits unread: the next request's is not it
    assert remote({"op": "remove", "path": str(output.with_name("p.csv.partial"))}) is None
    ours.send(json.dumps({"op": "open", "path": str(output), "flags": os.O_RDONLY, "id": "stale"}).encode())
    fd = remote({"op": "open", "path": str(output), "flags": os.O_RDONLY})
    assert fd is not None and os.read(fd, 100) == b"a.png,1\n"
    os.close(fd)
    assert remote({"op": "remove", "path": str(output)}) is None and not output.exists()
    ours.close()
    server.join(10)
    assert not server.is_alive() and not scratch.exists()
    with pytest.raises(OSError, match="the output gate has gone") as gone:
        gate._Remote(theirs)({"op": "remove", "path": str(output)})
    assert gone.value.errno == errno.EPIPE and gone.value.filename == str(output)
    theirs.close()
    assert set(os.listdir("/proc/self/fd")) <= descriptors  # the stale reply's descriptor was closed, not kept


def test_a_gate_that_goes_while_a_request_waits_is_an_error_naming_the_file(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def take_one_and_go() -> None:
        theirs.recv(65536)
        theirs.close()

    server = threading.Thread(target=take_one_and_go)
    server.start()
    with pytest.raises(OSError) as gone:
        gate._Remote(ours)({"op": "remove", "path": str(tmp_path / "p.csv")})
    server.join(10)
    assert (gone.value.errno, gone.value.strerror, gone.value.filename) == (
        errno.EPIPE,
        "the output gate has gone (it closed its end)",
        str(tmp_path / "p.csv"),
    )


class _Hangs:
    """A run's end that sends one request, then is gone before the gate's reply: the reply cannot be sent."""

    def __init__(self, request: bytes) -> None:
        self.requests = [request]

    def recvmsg(self, size: int, ancillary: int) -> tuple[bytes, list, int, None]:
        if self.requests:
            return self.requests.pop(), [], 0, None
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    def sendmsg(self, *args: object) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_the_gate_cleans_up_when_the_run_goes_before_a_reply_and_minds_no_folder_already_gone(tmp_path: Path) -> None:
    output, scratch, gone = tmp_path / "p.csv", tmp_path / "scratch", tmp_path / "gone"
    scratch.mkdir()
    request = json.dumps({"op": "remove", "path": str(output), "id": 0}).encode()
    gate._serve(OutputFiles.of([output]), _Hangs(request), [gone, scratch])  # type: ignore[arg-type]
    assert not scratch.exists()
    scratch.mkdir()
    reset = _Hangs(b"")
    reset.requests.clear()  # its end fails at once
    gate._serve(OutputFiles.of([output]), reset, [scratch])  # type: ignore[arg-type]
    assert not scratch.exists()


def _children() -> set[int]:
    return {int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


def test_the_gate_is_a_process_of_its_own_that_outlives_signals_and_cleans_up(tmp_path: Path) -> None:
    """start_gate in this process (the run's own order of things is tested in a fresh interpreter below): the
    operations go to a forked gate from then on, which ignores Ctrl-C and SIGTERM, answers until the run's end of
    the channel closes, then removes the private folder and exits 0."""
    output, scratch = tmp_path / "p.csv", tmp_path / "scratch"
    scratch.mkdir()
    before, previous = _children(), gate._current
    gate.start_gate(OutputFiles.of([output]), [scratch])
    try:
        (pid,) = _children() - before
        assert isinstance(gate._current, gate._Remote)
        fd = open_output(output, os.O_WRONLY | os.O_CREAT)  # answered: the gate is past its start
        for sent in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, sent)
        os.write(fd, b"a.png,1\n")
        os.close(fd)
        with pytest.raises(PermissionError):
            open_output(tmp_path / "other.csv", os.O_WRONLY | os.O_CREAT)
        channel = gate._current.channel
        for number in (7, 8):  # two requests sent at once are two messages: the gate answers each
            channel.send(json.dumps({"op": "remove", "path": str(tmp_path / "x.csv"), "id": number}).encode())
        replies = [json.loads(channel.recv(65536)) for _ in range(2)]
        assert [(reply["id"], reply["strerror"]) for reply in replies] == [
            (7, "not one of the run's output files"),
            (8, "not one of the run's output files"),
        ]
        channel.close()
    finally:
        gate._current = previous
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert output.read_text() == "a.png,1\n" and not scratch.exists() and not (tmp_path / "other.csv").exists()


GATE = r"""
import json, os, socket, sys
from pathlib import Path
from harness.results import gate

places = json.loads(sys.argv[1])
gate.start_gate(gate.OutputFiles.of([Path(places["output"])]), [Path(places["cleanup"])])
results = {}
fd = gate.open_output(Path(places["output"]), os.O_WRONLY | os.O_CREAT)
os.write(fd, b"written by the gate's descriptor\n")
os.close(fd)
try:
    gate.open_output(Path(places["other"]), os.O_WRONLY | os.O_CREAT)
except PermissionError:
    results["other"] = "refused"
channel = gate._current.channel
channel.send(b"{not json")
results["garbage"] = json.loads(channel.recv(65536))["strerror"]
channel.send(json.dumps({"op": "open", "path": places["other"], "flags": 65, "id": "x"}).encode())
results["forged"] = json.loads(socket.recv_fds(channel, 65536, 1)[0])["strerror"]
gate.remove_output(Path(places["output"]).with_name("p.csv.partial"))
results["alive"] = "yes"
print(json.dumps(results))
sys.exit(3)  # the run's exit code is its own process's: the gate is a child, not the other way round
"""


def test_the_gate_process_answers_only_for_the_runs_files_and_cleans_up_after_it(tmp_path: Path) -> None:
    cleanup = tmp_path / "scratch"
    cleanup.mkdir()
    places = {"output": str(tmp_path / "p.csv"), "other": str(tmp_path / "other.csv"), "cleanup": str(cleanup)}
    done = subprocess.run(
        [sys.executable, "-c", GATE, json.dumps(places)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout) == {
        "other": "refused",
        "garbage": "not a request the gate takes",
        "forged": "not one of the run's output files",
        "alive": "yes",
    }
    assert (tmp_path / "p.csv").read_text() == "written by the gate's descriptor\n"
    assert not (tmp_path / "other.csv").exists()
    for _ in range(100):  # the gate removes the private folder once the run's last descriptor to it closed
        if not cleanup.exists():
            break
        threading.Event().wait(0.05)
    assert not cleanup.exists()


# ---- hostile models, end to end ----

HOSTILE_CLASS = """import socket
from pathlib import Path

import torch

WHAT, TARGET = (Path(__file__).parent / "attempt.txt").read_text().split()


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x):
        for what in WHAT.split("+"):
            if what == "write":
                Path(TARGET.split(",")[0]).write_text("written by the model")
            elif what == "read":
                Path(TARGET.split(",")[1]).read_text()
            elif what == "connect":
                socket.create_connection(("127.0.0.1", int(TARGET.split(",")[2])), timeout=5).close()
        return self.fc(x.mean(dim=(2, 3)))
"""


@pytest.fixture
def stage(tmp_path: Path) -> dict[str, Path | int]:
    """Images with an answers file beside them, a file outside every folder the run uses, and a listening port."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "chelsea.png").write_bytes((SAMPLES / "chelsea.png").read_bytes())
    (tmp_path / "data" / "answers.json").write_text('{"chelsea.png": 1}')
    victim = tmp_path / "victim.py"
    victim.write_text("print('mine')\n")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    yield {"images": images, "answers": tmp_path / "data" / "answers.json", "victim": victim, "listener": listener}
    listener.close()


def _accepted(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except TimeoutError:
        return False
    return True


def _class_model(folder: Path, what: str, stage: dict) -> Path:
    folder.mkdir()
    (folder / "model.py").write_text(HOSTILE_CLASS)
    port = stage["listener"].getsockname()[1]
    (folder / "attempt.txt").write_text(f"{what} {stage['victim']},{stage['answers']},{port}")
    return folder


def _torchscript_model(folder: Path, what: str, stage: dict) -> Path:
    """TorchScript (no pickle, no --trust-pickle needed): a program, whose forward opens a file outside."""
    import torch

    target = str(stage["victim"] if what == "write" else stage["answers"])

    class Opens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 10)
            self.target = target
            self.shared = what == "write"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen = torch.from_file(self.target, shared=self.shared, size=4, dtype=torch.uint8)
            if self.shared:
                seen.fill_(65)
            return self.fc(x.mean(dim=(2, 3))) + seen.sum().float() * 0

    folder.mkdir()
    torch.jit.script(Opens().eval()).save(str(folder / "model.pt"))
    return folder / "model.pt"


def _run(stage: dict, model: Path, *options: str) -> subprocess.CompletedProcess[str]:
    output = stage["images"].parent.parent / "out" / "predictions.csv"
    command = [sys.executable, "entrypoint.py", str(stage["images"]), str(output), "--model", str(model)]
    return subprocess.run(
        [*command, "--progress", "false", "--workers", "0", *options],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=300,
        input="y\n" * 8,  # nothing may read it
    )


def _refused(done: subprocess.CompletedProcess[str], said: str) -> None:
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("harness: error: ") and said in lines[-1], lines
    assert lines[-1].endswith("--confine off to allow") and "Traceback" not in done.stderr


ATTEMPTS = {
    "write": "the model tried to open {victim}",
    "read": "the model tried to open {answers}",
    "connect": "the model tried to use the network",
}


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("torchscript", "write"),
        ("class", "read"),
        ("class", "connect"),
        pytest.param("class", "write", marks=pytest.mark.slow),
        pytest.param("torchscript", "read", marks=pytest.mark.slow),
    ],
)
def test_a_hostile_model_is_refused_in_one_line(tmp_path: Path, stage: dict, kind: str, what: str) -> None:
    make = _torchscript_model if kind == "torchscript" else _class_model
    done = _run(stage, make(tmp_path / "model", what, stage))
    _refused(done, ATTEMPTS[what].format(**stage))
    assert stage["victim"].read_text() == "print('mine')\n"
    assert not _accepted(stage["listener"])


@pytest.mark.slow
def test_the_same_attempts_succeed_unconfined(tmp_path: Path, stage: dict) -> None:
    """--confine off lets a model do what the tests above refuse: they would fail if confinement did nothing."""
    done = _run(stage, _class_model(tmp_path / "model", "write+read+connect", stage), "--confine", "off")
    assert done.returncode == 0, done.stderr
    assert stage["victim"].read_text() == "written by the model"
    assert _accepted(stage["listener"])
    assert "not confined: --confine off" in done.stderr


@pytest.mark.slow
def test_a_hugging_face_folder_with_its_own_code_is_refused_unrun_whatever_stdin_says(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.helpers import tiny_hf_vit

    folder = tiny_hf_vit(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"}
    config.update(model_type="evil-vit", auto_map=auto_map)
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "imported"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert transformers is not None
    for mode in ("auto", "off"):
        done = subprocess.run(
            [
                sys.executable,
                "entrypoint.py",
                str(SAMPLES),
                str(tmp_path / "p.csv"),
                "--model",
                str(folder),
                "--confine",
                mode,
            ],
            cwd=REPO,
            env=env_without_build_args(),
            capture_output=True,
            text=True,
            timeout=300,
            input="y\n" * 8,
        )
        assert done.returncode == 4, done.stderr
        assert "names the model's own Python code (auto_map)" in done.stderr.strip().splitlines()[-1]
        assert "[y/N]" not in done.stdout + done.stderr
        assert not marker.exists()


# ---- where confinement cannot be ----

NO_LANDLOCK = r"""
import os, struct, sys
from harness.pipeline import sandbox

# A seccomp filter that answers Landlock's system calls (444-446) with ENOSYS, as a kernel without Landlock does.
program = [(0x20, 0, 0, 0), (0x35, 0, 2, 444), (0x35, 1, 0, 447), (0x06, 0, 0, 0x00050026), (0x06, 0, 0, 0x7FFF0000)]
libc = sandbox._libc()
sandbox._prctl(libc, sandbox.PR_SET_NO_NEW_PRIVS, 1)
sandbox._install_seccomp(libc, b"".join(struct.pack("=HBBI", *op) for op in program))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_without_landlock_on_refuses_and_auto_runs_unconfined_saying_so(tmp_path: Path, mode: str) -> None:
    output = tmp_path / "out" / "p.csv"
    command = [sys.executable, "-c", NO_LANDLOCK, "entrypoint.py", str(SAMPLES), str(output), "--confine", mode]
    done = subprocess.run(
        [*command, "--progress", "false"], cwd=REPO, env=env_without_build_args(), capture_output=True, text=True
    )
    if mode == "on":
        assert done.returncode == 5, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert "--confine on: cannot confine this run: the kernel" in last and "no Landlock system calls" in last
        assert not output.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert "harness: not confined: the kernel" in done.stderr
        recorded = json.loads(output.with_name("run.json").read_text())["confinement"]
        assert recorded["state"] == "off" and "no Landlock system calls" in recorded["reason"]


def test_an_in_process_call_cannot_be_confined_on_request(tmp_path: Path, capsys) -> None:
    argv = [str(SAMPLES), str(tmp_path / "p.csv"), "--confine", "on", "--progress", "false"]
    assert main(argv) == 5
    assert "an in-process call cannot confine its caller" in capsys.readouterr().err


# ---- every kind of model and every tool, confined and not: the same bytes ----

TINY_CLASS = """import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One model of each kind, seeded, as their --model options."""
    import zipfile

    import torch

    timm = pytest.importorskip("timm")
    from tests.helpers import tiny_hf_vit

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(resnet.state_dict(), root / "resnet18.pth")
    folder = root / "class"
    folder.mkdir()
    (folder / "model.py").write_text(TINY_CLASS)
    namespace: dict = {}
    exec(TINY_CLASS, namespace)
    tiny = namespace["Tiny"]().eval()
    torch.save(tiny.state_dict(), folder / "weights.pth")
    (folder / "config.yaml").write_text("class_name: Tiny\ncheckpoint: weights.pth\n")
    with zipfile.ZipFile(root / "class.zip", "w") as archive:
        for path in folder.iterdir():
            archive.write(path, f"class/{path.name}")
    (root / "saved").mkdir()
    torch.jit.trace(tiny, torch.zeros(1, 3, 224, 224)).save(str(root / "saved" / "tiny.pt"))
    (root / "onnx").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notices
        torch.onnx.export(
            tiny,
            (torch.zeros(1, 3, 224, 224),),
            str(root / "onnx" / "tiny.onnx"),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "n"}},
        )
    return {
        "timm": ["--model", "timm:resnet18", "--checkpoint", str(root / "resnet18.pth")],
        "hf": ["--model", str(tiny_hf_vit(root / "hf"))],
        "onnx": ["--model", str(root / "onnx" / "tiny.onnx")],
        "class": ["--model", str(folder)],
        "saved": ["--model", str(root / "saved" / "tiny.pt")],
        "zip": ["--model", str(root / "class.zip")],
    }


def _harness(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *argv],
        cwd=REPO,
        env=env_without_build_args(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["timm", "hf", "onnx", "class", "saved", "zip"])
def test_every_kind_writes_the_same_csv_confined_and_not(zoo: dict, tmp_path: Path, kind: str) -> None:
    written = {}
    for mode in ("auto", "off"):
        output = tmp_path / mode / "p.csv"
        done = _harness(str(SAMPLES), str(output), *zoo[kind], "--progress", "false", "--confine", mode)
        assert done.returncode == 0, done.stderr
        state = json.loads(output.with_name("run.json").read_text())["confinement"]["state"]
        assert state == ("filesystem+network" if mode == "auto" else "off")
        written[mode] = output.read_bytes()
    assert written["auto"] == written["off"]


@pytest.mark.slow
def test_the_tools_give_the_same_results_confined_and_not(zoo: dict, tmp_path: Path) -> None:
    for mode in ("auto", "off"):
        done = _harness("check", "--output", str(tmp_path / mode / "check"), "--confine", mode)
        assert done.returncode == 0, done.stderr
        done = _harness("export-onnx", *zoo["class"], "--output", str(tmp_path / mode / "m.onnx"), "--confine", mode)
        assert done.returncode == 0, done.stderr
        run = _harness(str(SAMPLES), str(tmp_path / mode / "p.csv"), "--model", str(tmp_path / mode / "m.onnx"))
        assert run.returncode == 0, run.stderr
        done = _harness("check-model", *zoo["class"], "--repeats", "1", "--confine", mode)
        assert done.returncode == 0, done.stderr
        assert "parameters  314 (0.0M)" in done.stdout
    for name in ("check/predictions.csv", "p.csv"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "off" / name).read_bytes(), name


@pytest.mark.slow
def test_images_behind_links_are_read_where_the_links_lead(tmp_path: Path) -> None:
    """A dataset of links (a linked folder, a linked file) is classified confined as it is unconfined: the run may
    read where its input's links lead, and nothing else beside them."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "folder").mkdir(parents=True)
    (elsewhere / "folder" / "flower.jpg").write_bytes((SAMPLES / "flower.jpg").read_bytes())
    (elsewhere / "chelsea.png").write_bytes((SAMPLES / "chelsea.png").read_bytes())
    images = tmp_path / "images"
    images.mkdir()
    (images / "linked").symlink_to(elsewhere / "folder")
    (images / "chelsea.png").symlink_to(elsewhere / "chelsea.png")
    rows = {}
    for mode in ("auto", "off"):
        output = tmp_path / mode / "p.csv"
        done = _harness(str(images), str(output), "--progress", "false", "--confine", mode)
        assert done.returncode == 0, done.stderr
        rows[mode] = output.read_text()
    assert rows["auto"] == rows["off"] and rows["auto"].count("\n") == 2


def test_an_output_folder_opens_only_as_the_folder_itself_never_through_a_link_nor_a_file(tmp_path: Path) -> None:
    output = tmp_path / "out" / "p.csv"
    output.parent.mkdir()
    allowed = OutputFiles.of([output])
    fd = gate._open(allowed, output.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # no process the model starts inherits it
    finally:
        os.close(fd)
    output.parent.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output.parent.symlink_to(elsewhere)
    with pytest.raises(OSError) as linked:
        gate._open(allowed, output.parent, os.O_RDONLY | os.O_DIRECTORY)
    assert linked.value.errno in (errno.ELOOP, errno.ENOTDIR)
    output.parent.unlink()
    output.parent.write_text("a file where the folder should be")
    with pytest.raises(NotADirectoryError):
        gate._open(allowed, output.parent, os.O_RDONLY | os.O_DIRECTORY)


def test_an_output_file_is_made_with_the_gates_mode_and_a_folder_that_cannot_sync_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "p.csv"
    allowed = OutputFiles.of([output])
    umask = os.umask(0)
    try:
        os.close(gate._open(allowed, output, os.O_WRONLY | os.O_CREAT))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == gate.FILE_MODE

    def refuses(fd: int) -> None:
        raise OSError(errno.EINVAL, "this file system syncs no folder")

    monkeypatch.setattr(os, "fsync", refuses)
    gate._sync_folder(allowed, tmp_path)


def test_an_error_without_words_is_answered_in_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(allowed: object, request: object, store: object, fds: object) -> None:
        raise OSError("the disk said no")

    monkeypatch.setattr(gate, "_perform", fails)
    request = json.dumps({"op": "remove", "path": str(tmp_path / "p.csv"), "id": 7}).encode()
    replies: list[bytes] = []

    class _Once:
        def __init__(self) -> None:
            self.requests = [request]

        def recvmsg(self, size: int, ancillary: int) -> tuple[bytes, list, int, None]:
            return (self.requests.pop() if self.requests else b""), [], 0, None

        def sendmsg(self, buffers: list[bytes], *args: object) -> int:
            replies.append(buffers[0])
            return len(buffers[0])

    gate._serve(OutputFiles.of([tmp_path / "p.csv"]), _Once(), [])  # type: ignore[arg-type]
    assert json.loads(replies[0]) == {"id": 7, "errno": errno.EIO, "strerror": "the disk said no"}
