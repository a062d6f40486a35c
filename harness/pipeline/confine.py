"""Confinement: what a run may reach once it has read its settings, decided and applied before it imports torch or
loads a model, so a submission's code (a model.py class, TorchScript, a pickled module, a model folder's
data_transform_description.py, all of which run in this process) reaches only this:

- read: the images; the model's files (its folder, and every file a setting names: the checkpoint, the labels file,
  the module); Python and its packages; the system's libraries, programs and the few settings files they read
  (SYSTEM_READ); /proc (Landlock keeps other processes' private files there closed); the parts of /sys that torch,
  CUDA and onnxruntime read; the devices they use, the GPUs' included (DEVICES);
- write: /dev/shm (the DataLoader's batches travel there) and a private temporary folder made for the run and
  removed after it, nothing else; the output files are opened, renamed and removed by the gate, a process outside
  the confinement that touches nothing but them (harness/results/gate.py);
- network: none: no TCP, no socket but a UNIX one, no abstract socket nor signal beyond the run's own processes. A
  torchrun rank keeps TCP and sockets, which its rendezvous and collectives need.

The read set was settled by tracing what a run of each model kind opens (docs/robustness.md: Confinement). The
kernel applies it (harness/pipeline/sandbox.py) to this process and everything it starts afterwards; this module
says what is allowed, records it for run.json, and turns a refusal into one line naming what the model tried.
Torch-free and numpy-free: both start threads as they load, and Landlock would leave those free.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import Config
from harness.console import say
from harness.errors import DeviceError
from harness.models.reads import software_places
from harness.pipeline import sandbox
from harness.pipeline.identity import setting_paths
from harness.pipeline.sandbox import DEVICE, READ, RUN, WRITE, Rule
from harness.results.gate import OutputFiles, Store, gated, start_gate

SYSTEM_RUN = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # libraries and programs
SYSTEM_READ = (
    *(
        f"/etc/{name}"
        for name in (
            "ld.so.cache",
            "ld.so.conf",
            "ld.so.conf.d",
            "localtime",
            "timezone",
            "nsswitch.conf",
            "passwd",
            "group",
            "hosts",
            "host.conf",
            "gai.conf",
            "os-release",
            "ssl",
            "mime.types",
            "fonts",
        )
    ),
    "/proc",
    "/sys/devices",
    "/sys/bus",
    "/sys/class",
    "/sys/fs/cgroup",
    "/sys/module",
    "/sys/kernel/mm/transparent_hugepage",
)
NETWORK_READ = ("/etc/resolv.conf",)  # a torchrun rank, whose network stays open, looks its peers' names up
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/nvidia*", "/dev/kfd", "/dev/dri")
SHARED_MEMORY = "/dev/shm"
# Caches that torch.compile, Triton and CUDA would keep in the home folder: the private folder holds them instead.
CACHE_VARIABLES = {
    "XDG_CACHE_HOME": "cache",  # onnxruntime keeps a telemetry id there, and warns when it cannot
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "CUDA_CACHE_PATH": "cuda",
}
MODES = ("auto", "on", "off")
LIFT = "--confine off to allow"


@dataclass(frozen=True)
class Confinement:
    """What this process is confined to, as run.json records it, and why not where it is not."""

    state: str  # "filesystem+network", "filesystem" (a torchrun rank: TCP open) or "off"
    reason: str = ""  # why it is off
    landlock_abi: int = 0
    seccomp: bool = False
    rules: tuple[Rule, ...] = ()
    scratch: str | None = None
    setup_ms: float = 0.0  # what deciding and applying it took

    @property
    def active(self) -> bool:
        return self.state != "off"

    @property
    def network_closed(self) -> bool:
        return self.state == "filesystem+network"

    def paths(self, rights: int) -> list[str]:
        return sorted(str(rule.path) for rule in self.rules if rule.rights & rights == rights)

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason or None,
            "landlock_abi": self.landlock_abi or None,
            "seccomp": self.seccomp,
            "read": self.paths(sandbox.READ_FILE),
            "write": [path for path in self.paths(sandbox.MAKE_REG)],
            "outputs": "through the gate (harness/results/gate.py)" if self.active else "written directly",
            "network": "none" if self.network_closed else ("TCP (torchrun)" if self.active else "unconfined"),
            "setup_ms": round(self.setup_ms, 1),
        }

    def line(self) -> str:
        if not self.active:
            return f"not confined: {self.reason}"
        network = "no network" if self.network_closed else "TCP open for torchrun"
        return (
            f"confined (Landlock ABI {self.landlock_abi}{', seccomp' if self.seccomp else ''}): reads its images, the "
            f"model's files and Python; writes only its output files; {network} ({LIFT.replace(' to allow', '')} "
            "lifts it)"
        )

    def readable(self, path: Path) -> bool:
        return any(
            rule.rights & sandbox.READ_FILE and (path == rule.path or path.is_relative_to(rule.path))
            for rule in self.rules
        )


NOT_ASKED = Confinement("off", "not set up (a library call)")


@dataclass
class _Process:
    """This process's part: whether it is the harness's own (entry()), and what it is confined to."""

    owned: bool = False
    confinement: Confinement = NOT_ASKED
    scratch: Path | None = None


_process = _Process()


def own_process() -> None:
    """Mark this process as the harness's own (the entry point's): only such a process confines itself, quiets its
    standard input and makes a private temporary folder. A call of harness.cli.main in another program (the tests)
    changes nothing of its process."""
    _process.owned = True


def current() -> Confinement:
    return _process.confinement


def rules(config: Config, environ: Mapping[str, str], reads: Iterable[Path], scratch: Path) -> list[Rule]:
    """The whole allow-list of a confined run (this module's docstring says why each is there)."""
    granted: list[Rule] = [Rule(Path(place), RUN) for place in SYSTEM_RUN]
    granted += [Rule(Path(place), READ) for place in SYSTEM_READ]
    granted += [Rule(Path(place), READ) for place in NETWORK_READ if config.world_size > 1]
    granted += [Rule(Path(device), DEVICE) for pattern in DEVICES for device in sorted(glob.glob(pattern))]
    granted += [Rule(place, RUN) for place in sorted(software_places())]
    libraries = [entry for entry in environ.get("LD_LIBRARY_PATH", "").split(":") if os.path.isabs(entry)]
    granted += [Rule(Path(place), RUN) for place in libraries]
    granted += [
        Rule(place, READ) for place in sorted({*setting_paths(config, "read"), *(Path(p).resolve() for p in reads)})
    ]
    granted += [Rule(Path(SHARED_MEMORY), WRITE), Rule(scratch, WRITE | sandbox.EXECUTE)]
    return _without_repeats(granted)


def _without_repeats(granted: list[Rule]) -> list[Rule]:
    """The rules less those another already covers (a package folder inside site-packages, a path twice), in
    order: each rule looks up its own folders only, so a few hundred rules cost well under a millisecond."""
    at: dict[Path, int] = {}
    for rule in granted:
        at[rule.path] = at.get(rule.path, 0) | rule.rights
    kept, given = [], {}
    for rule in granted:
        if any(at.get(parent, 0) & rule.rights == rule.rights for parent in rule.path.parents):
            continue
        if given.get(rule.path, 0) & rule.rights == rule.rights:
            continue
        given[rule.path] = given.get(rule.path, 0) | rule.rights
        kept.append(rule)
    return kept


def _quiet_stdin() -> None:
    """Nothing reads standard input: a library's prompt (\"run this custom code? [y/N]\") gets end-of-file, never an
    answer typed or piped by someone else."""
    with contextlib.suppress(OSError):
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)


def _scratch() -> Path:
    """The run's private temporary folder: every temporary file of this process and its children goes there (a
    zipped submission unpacks there too)."""
    if _process.scratch is None:
        folder = Path(tempfile.mkdtemp(prefix="harness-run-"))
        tempfile.tempdir = str(folder)
        os.environ["TMPDIR"] = str(folder)
        _process.scratch = folder
    return _process.scratch


def _refuse_or_skip(mode: str, reason: str) -> Confinement:
    if mode == "on":
        raise DeviceError(
            f"--confine on: cannot confine this run: {reason}. Run on a kernel with Landlock, or "
            "--confine auto to run unconfined where it cannot be"
        )
    return Confinement("off", reason)


def prepare_process() -> None:
    """What the harness's own process does before it reads a model's file: standard input closed, and the private
    temporary folder made (a zipped submission unpacks into it). Nothing in another program's process."""
    if _process.owned:
        _quiet_stdin()
        _scratch()


@contextlib.contextmanager
def confined(
    config: Config,
    environ: Mapping[str, str],
    outputs: OutputFiles,
    reads: Iterable[Path] = (),
    store: Store | None = None,
) -> Iterator[Confinement]:
    """Confine this process as `config.confine` says (auto: wherever the kernel can), writing only `outputs` and
    `store`'s entry (through the gate) and reading what `rules` lists plus `reads` (a tool's own inputs); says so
    in one line. Must come before torch, numpy or any thread: call it right after the settings are read."""
    if not _process.owned:
        if config.confine == "on":
            raise DeviceError(
                "--confine on needs the harness's own process (python entrypoint.py, harness, or python -m harness): "
                "an in-process call cannot confine its caller"
            )
        with gated(outputs, store):
            yield Confinement("off", "an in-process call: only the harness's own process confines itself")
        return
    started = time.perf_counter()
    record = _confine(config, environ, outputs, reads, _scratch(), store)
    record = dataclasses.replace(record, setup_ms=1000 * (time.perf_counter() - started))
    _process.confinement = record
    if config.rank == 0:  # under torchrun one rank speaks for all
        say(record.line())
    if record.active:
        yield record
        return
    atexit.register(shutil.rmtree, _scratch(), ignore_errors=True)
    with gated(outputs, store):
        yield record


def _confine(
    config: Config,
    environ: Mapping[str, str],
    outputs: OutputFiles,
    reads: Iterable[Path],
    scratch: Path,
    store: Store | None,
) -> Confinement:
    if config.confine == "off":
        return Confinement("off", "--confine off")
    if sandbox.landlock_abi() < 1:
        return _refuse_or_skip(config.confine, sandbox.missing_landlock())
    threads = sandbox.threads()
    if threads != 1:
        return _refuse_or_skip(
            config.confine, f"the process already runs {threads} threads, which Landlock would leave free"
        )
    granted = rules(config, environ, reads, scratch)
    for variable, name in CACHE_VARIABLES.items():
        os.environ[variable] = str(scratch / name)
    start_gate(outputs, [scratch], store)  # the gate removes the private folder once the run has gone
    try:
        applied = sandbox.restrict(granted, close_network=config.world_size == 1)
    except sandbox.SandboxError as error:
        return _refuse_or_skip(config.confine, str(error))
    closed = config.world_size == 1 and (applied.network_closed or applied.seccomp)
    state = "filesystem+network" if closed else "filesystem"
    kept = tuple(rule for rule in granted if str(rule.path) not in applied.missing)
    return Confinement(state, "", applied.abi, applied.seccomp, kept, str(scratch))


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in seen:
        seen.append(link)
        yield link
        link = link.__cause__ or link.__context__


QUOTED_PATH = re.compile(r"""[<'"](/[^<>'"]+)[>'"]""")  # torch's C++ errors: "unable to open file </x> in ..."


def _refused(link: BaseException) -> tuple[str, str | None] | None:
    """(what was refused, the path or None) for an error the confinement causes: an OSError from the kernel, or a
    library's error that kept only the kernel's words (torch: "unable to open file </x> ...: Permission denied")."""
    if isinstance(link, OSError):
        path = os.fsdecode(link.filename) if link.filename is not None else None
        if link.errno == sandbox.NETWORK_ERRNO or (link.errno == errno.EACCES and path is None):
            return "network", None
        if link.errno == errno.EACCES:
            return "file", path
        if link.errno == errno.EPERM and path is None:
            return "operation", None
        return None
    lines = [line for line in str(link).splitlines() if "Permission denied" in line]
    if not lines:
        return None
    found = QUOTED_PATH.search(lines[-1])
    return "file", found.group(1) if found else None


def denial(error: BaseException, who: str = "the model") -> str | None:
    """One line for an error the confinement caused, naming what `who` tried, or None for any other error."""
    confinement = current()
    if not confinement.active:
        return None
    for link in _chain(error):
        refused = _refused(link)
        if refused is None:
            continue
        kind, name = refused
        if kind == "network":
            return f"{who} tried to use the network: a confined run has none; {LIFT}"
        if kind == "operation":
            return (
                f"{who} was refused an operation outside the run: a confined run may signal only its own processes "
                f"and use no io_uring or terminal input; {LIFT}"
            )
        if name is None:
            return f"{who} was refused a file outside what a confined run may reach; {LIFT}"
        path = Path(os.path.abspath(name))
        if confinement.readable(path):
            return f"{who} tried to write {path}: a confined run may write only its output files; {LIFT}"
        return (
            f"{who} tried to open {path}: a confined run may read only its images, its model's files and Python, "
            f"and write only its output files; {LIFT}"
        )
    return None
