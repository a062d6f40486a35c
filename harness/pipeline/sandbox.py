"""The kernel's side of confinement, through ctypes: a Landlock ruleset (which files may be read, executed and
written, no TCP, no signals or abstract sockets beyond the run's own processes) and a seccomp filter (no socket but
a UNIX one, no io_uring, no typing into the terminal), applied to the calling thread and every process it starts
afterwards.

Landlock binds the calling thread only: a thread started before `restrict` stays free, so `restrict` refuses to run
in a process that has more than one. numpy's BLAS and torch start threads as they load, which is why a run confines
itself before it imports either (harness/pipeline/confine.py says what is allowed; this module only applies it).
Torch-free and numpy-free.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

# Landlock's system calls have one number on every architecture (the generic table).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2

# Filesystem access rights (linux/landlock.h) and the ABI that brought each.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a file (not a folder) takes
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# The rights each kind of place gets.
READ = READ_FILE | READ_DIR
RUN = READ | EXECUTE
WRITE = READ | WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_DIR | MAKE_SOCK | MAKE_FIFO | REMOVE_FILE | REMOVE_DIR | REFER
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV

# seccomp: what the filter refuses, and with which error. ENETDOWN reads as what it is ("Network is down") and tells
# a refused socket apart from a refused file (EACCES, with the file's name).
NETWORK_ERRNO = errno.ENETDOWN
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # push characters into a terminal's input; the console's own, which can too
AF_UNIX = 1
# (audit arch, syscall numbers: socket, ioctl, io_uring_setup, io_uring_enter, io_uring_register, x32 bit or None)
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, 41, 16, 425, 426, 427, 0x40000000),
    "aarch64": (0xC00000B7, 198, 29, 425, 426, 427, None),
}


class SandboxError(Exception):
    """The kernel would not confine this process; the message names what it lacks."""


@dataclass(frozen=True)
class Rule:
    """A place and the rights beneath it; a file's rule keeps the rights a file can take."""

    path: Path
    rights: int


@dataclass(frozen=True)
class Applied:
    """What the kernel took: the Landlock ABI, whether TCP and foreign sockets are closed, and the rules skipped
    because their place does not exist."""

    abi: int
    network_closed: bool
    seccomp: bool
    scoped: bool
    missing: tuple[str, ...]


def _libc() -> ctypes.CDLL:
    """The C library already loaded into this process (dlopen(NULL)): no search, no `ldconfig` child."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _prctl(libc: ctypes.CDLL, option: int, *values: int) -> int:
    args = [ctypes.c_ulong(value) for value in (*values, 0, 0, 0, 0)[:4]]
    return int(libc.prctl(ctypes.c_int(option), *args))


def _syscall(libc: ctypes.CDLL, number: int, *args: object) -> int:
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where it has none (too old, not built in, or switched off)."""
    try:
        libc = _libc()
        return _syscall(libc, SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError:
        return 0


def missing_landlock() -> str:
    """Why the kernel offers no Landlock, in words, for the start-up line and `--confine on`'s refusal."""
    try:
        _syscall(_libc(), SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError as error:
        if error.errno == errno.ENOSYS:
            return f"the kernel ({platform.release()}) has no Landlock system calls (Linux 5.13 or newer has them)"
        if error.errno == errno.EOPNOTSUPP:
            return "Landlock is built into the kernel but switched off (add landlock to the lsm= boot parameter)"
        if error.errno == errno.EPERM:
            return "a seccomp profile refuses Landlock's system calls (Docker and podman allow them since 2022)"
        return f"Landlock refused: {error.strerror}"
    return ""


def fs_rights(abi: int) -> int:
    """The filesystem rights an ABI knows: every one of them is handled, so what no rule grants is refused."""
    return FS_RIGHTS_BY_ABI[max(level for level in FS_RIGHTS_BY_ABI if level <= abi)]


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _ruleset(libc: ctypes.CDLL, abi: int, close_network: bool) -> tuple[int, bool, bool]:
    """A new ruleset's descriptor, whether it closes TCP, and whether it scopes signals and abstract sockets."""
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if close_network and abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if close_network and abi >= 6 else SCOPE_SIGNAL * (abi >= 6)
    fields = [fs_rights(abi)]
    if abi >= 4:
        fields.append(handled_net)
    if abi >= 6:
        fields.append(scoped)
    attr = ctypes.create_string_buffer(struct.pack(f"={len(fields)}Q", *fields))
    fd = _syscall(libc, SYS_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), ctypes.c_uint32(0))
    return fd, bool(handled_net), bool(scoped)


def _add_path_rule(libc: ctypes.CDLL, ruleset: int, rule: Rule, handled: int) -> bool:
    """Grant `rule`; False where its place does not exist. Links are followed: the rule lands on the real file or
    folder, which is what the kernel checks later."""
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        rights = rule.rights & handled
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        if not rights:
            return True
        attr = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd))
        _syscall(libc, SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), attr, ctypes.c_uint32(0))
    finally:
        os.close(fd)
    return True


def _seccomp_program(machine: str, allow_sockets: bool) -> bytes | None:
    """A classic BPF program for seccomp: refuse sockets other than UNIX ones (unless `allow_sockets`), io_uring
    (which would open sockets past this filter) and TIOCSTI/TIOCLINUX ioctls; allow everything else. A system
    call of another architecture's table (int 0x80, x32) is refused whole, so no second table bypasses the first.
    None where the machine's table is not known here."""
    known = SECCOMP_ARCHES.get(machine)
    if known is None:
        return None
    audit_arch, nr_socket, nr_ioctl, *io_uring, x32_bit = known
    ld_w_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, refuse_all = 0x7FFF0000, 0x00050000 | errno.EPERM
    refuse_net, refuse_eperm = 0x00050000 | NETWORK_ERRNO, 0x00050000 | errno.EPERM
    program: list[tuple[int, int, int, int]] = []

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        program.append((code, jt, jf, k))

    op(ld_w_abs, 4)  # arch
    op(jeq, audit_arch, 1, 0)
    op(ret, refuse_all)
    op(ld_w_abs, 0)  # syscall number
    if x32_bit is not None:
        op(jge, x32_bit, 0, 1)
        op(ret, refuse_all)
    for number in io_uring:
        op(jeq, number, 0, 1)
        op(ret, refuse_eperm)
    op(jeq, nr_ioctl, 0, 5)
    op(ld_w_abs, 24)  # args[1], its low 32 bits (the tty layer reads the request as an unsigned int)
    op(jeq, TIOCSTI, 2, 0)
    op(jeq, TIOCLINUX, 1, 0)
    op(ret, allow)
    op(ret, refuse_eperm)
    if not allow_sockets:
        op(jeq, nr_socket, 0, 3)
        op(ld_w_abs, 16)  # args[0], the address family
        op(jeq, AF_UNIX, 1, 0)
        op(ret, refuse_net)
    op(ret, allow)
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _install_seccomp(libc: ctypes.CDLL, program: bytes) -> None:
    count = len(program) // 8
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", count, ctypes.addressof(filters))  # struct sock_fprog, padded as C pads it
    prog = ctypes.create_string_buffer(fprog, len(fprog))
    if _prctl(libc, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def restrict(rules: list[Rule], close_network: bool) -> Applied:
    """Confine this process and every process it starts from now on, for good: `rules` are all it may reach in the
    file system; with `close_network`, no TCP, no socket but a UNIX one, and no abstract socket or signal outside
    its own processes. Raises SandboxError when the kernel cannot, or when another thread exists."""
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError(missing_landlock())
    count = threads()
    if count != 1:
        raise SandboxError(f"the process already runs {count} threads; Landlock would leave all but one free")
    libc = _libc()
    ruleset, network_closed, scoped = _ruleset(libc, abi, close_network)
    missing: list[str] = []
    try:
        handled = fs_rights(abi)
        for rule in rules:
            if not _add_path_rule(libc, ruleset, rule, handled):
                missing.append(str(rule.path))
        if _prctl(libc, PR_SET_NO_NEW_PRIVS, 1) != 0:
            code = ctypes.get_errno()
            raise SandboxError(f"no_new_privs refused: {os.strerror(code)}")
        _syscall(libc, SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    except OSError as error:
        raise SandboxError(f"Landlock refused the ruleset: {error.strerror}") from None
    finally:
        os.close(ruleset)
    program = _seccomp_program(platform.machine(), allow_sockets=not close_network)
    seccomp = False
    if program is not None:
        try:
            _install_seccomp(libc, program)
            seccomp = True
        except OSError:  # a container's own seccomp profile may refuse a second filter: Landlock still holds
            seccomp = False
    return Applied(abi=abi, network_closed=network_closed, seccomp=seccomp, scoped=scoped, missing=tuple(missing))
