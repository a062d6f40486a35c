"""What the host gives this process, read without torch: its usable cores, glibc's malloc settings, the
decoders' CPU priority, and how long torch's OpenMP threads spin.

Torch-free on purpose: the head start (harness/pipeline/headstart.py) forks its decoders before torch is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import resource
from collections.abc import Mapping
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameter numbers (malloc.h)
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes: freed memory stays in the heap


def keep_freed_memory() -> bool:
    """Serve big blocks from the heap instead of fresh mmaps and never trim it: no page faults per batch.

    Measured by scripts/bench.py (docs/benchmarks.md): on the CPU, glibc handed the big activation blocks back to
    the kernel after every batch and faulted them in again on the next, so a run spent as much time in the kernel
    as in the model. The peak stays what one batch needs (freed blocks are reused, not added up). False where libc
    is not glibc.
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel once (glibc's malloc_trim), where start-up's one-off work
    (the fold's proof, an export) left them: the decoding workers fork after it, and every page still in the heap
    then counts again in each worker's memory. The batches' blocks are taken again once and kept from then on.
    False where libc is not glibc."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(function: str) -> Any:
    """One of glibc's malloc functions, or None where libc is not glibc (or has none of that name)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)
    except (OSError, AttributeError):
        return None


def yield_cores() -> None:
    """Put this decoder process at the lowest CPU priority (SCHED_IDLE; nice 19 where that is refused): it then
    runs on the cycles the model's threads leave, and never takes a core from one of them in mid-step.

    On the CPU the model's threads meet at a barrier after every operator, so a thread that lost its core to a
    decoder holds up the others, which spin meanwhile: measured in docs/benchmarks.md, the same work then took
    more CPU time. Inside a container (its own control group) the priority only ranks the run's own processes;
    outside one, other work on the host goes first too (decoder_priority normal where that matters).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a seccomp profile that refuses it
        with contextlib.suppress(OSError):
            os.nice(19)


def shorten_omp_spin(rounds: int | None, environ: Mapping[str, str]) -> bool:
    """Set how many rounds torch's OpenMP threads (libgomp) spin in a wait before they sleep, unless `rounds` is
    None or the user's `environ` sets GOMP_SPINCOUNT or OMP_WAIT_POLICY. Returns whether it did.

    libgomp reads it once, as torch loads it, so this must run before torch is imported. Its default spin
    (300,000 rounds) keeps a waiting thread's core from the idle-priority decoders, which run only when a core is
    free; a shorter one hands them the model threads' waits (docs/benchmarks.md).
    """
    if rounds is None or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(rounds)
    return True


OPEN_FILES_WANTED = 1 << 16  # a soft limit raised to no more than this where the hard limit is unlimited


def open_files_limit() -> int:
    """How many files this process may hold open, its soft limit raised first as far as the hard one allows (no
    privilege needed): the DataLoader holds a descriptor for every batch in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's), or the platform's word for it where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration, IndexError):
        return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (docker --cpus)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, int(quota + 0.999)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
