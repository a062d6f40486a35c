#!/usr/bin/env python3
"""Refreshes constraints.txt, the lock: the exact version of every package the harness (all its extras) and the
example model (model/requirements.txt) need, resolved with uv for Linux x86-64 on the two Pythons the images use.

    python3 scripts/lock.py             # add what is new, keep every version already locked
    python3 scripts/lock.py --upgrade   # take the newest versions the ranges allow
    python3 scripts/lock.py --upgrade-package numpy

torch is held to the release the GPU image's base image holds (Dockerfile's BASE_IMAGE tag), so the CPU image,
the GPU image and a checkout installed with the lock run the same torch; torchvision to the release locked now (the
one the base image ships beside that torch), even with --upgrade, unless `--upgrade-package torchvision`. A package
whose version differs between the two Pythons gets one line for each, behind an environment marker.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
PYTHONS = ("3.11", "3.12")  # Dockerfile.cpu's python:3.11-slim; Dockerfile's PyTorch image (Ubuntu 24.04)
PLATFORM = "x86_64-manylinux_2_36"  # glibc 2.36, Debian bookworm's: the older of the two images'
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(?:\s*;\s*(.+))?$")
HEADER = """\
# The lock: every package the harness (all extras) and model/requirements.txt need, at one exact version, resolved
# for Linux x86-64 on Python {pythons} (Dockerfile.cpu and Dockerfile's base image). torch is the GPU base image's.
# Written by scripts/lock.py (refresh: python3 scripts/lock.py [--upgrade]); do not edit by hand.
# Install with it: pip install -c constraints.txt -e '.[dev]'
"""


def base_image_torch() -> str:
    """The torch release in Dockerfile's default base image (pytorch/pytorch:VERSION-cudaX-cudnnY-runtime)."""
    found = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-", (REPO / "Dockerfile").read_text(), re.M)
    if not found:
        sys.exit("lock: cannot read the torch version from Dockerfile's BASE_IMAGE (pytorch/pytorch:VERSION-...)")
    return found.group(1)


def read_pins(path: Path, python: str | None = None) -> dict[str, str]:
    """name -> version of a lock file; with `python`, only the lines that apply to that Python."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if not match:
            continue
        name, version, marker = match.groups()
        if python is None or marker is None or marker == f'python_version == "{python}"':
            pins[name.lower()] = version
    return pins


def compile_for(python: str, held: dict[str, str], work: Path, upgrade: list[str]) -> dict[str, str]:
    """One resolution for one Python, preferring the versions already locked (uv keeps an output file's pins)."""
    output = work / f"py{python}.txt"
    if LOCK.is_file():
        output.write_text("".join(f"{n}=={v}\n" for n, v in read_pins(LOCK, python).items()), encoding="utf-8")
    pin = work / "held.txt"
    pin.write_text("".join(f"{name}=={version}\n" for name, version in held.items()), encoding="utf-8")
    command = [
        *uv(),
        "pip",
        "compile",
        str(REPO / "pyproject.toml"),
        str(REPO / "model" / "requirements.txt"),
        "--all-extras",
        "--python-version",
        python,
        "--python-platform",
        PLATFORM,
        "--constraint",
        str(pin),
        "--no-annotate",
        "--no-header",
        "--quiet",
        "--output-file",
        str(output),
        *upgrade,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"lock: uv could not resolve for Python {python}:\n{result.stderr.strip()}")
    return read_pins(output)


def uv() -> list[str]:
    if shutil.which("uv"):
        return ["uv"]
    sys.exit("lock: needs uv (pip install uv; the dev extra installs it)")


def merged(by_python: dict[str, dict[str, str]]) -> list[str]:
    """One line per package where every Python resolved the same version, else one marked line per Python."""
    lines: list[str] = []
    for name in sorted(set().union(*by_python.values())):
        versions = {python: pins.get(name) for python, pins in by_python.items()}
        if len(set(versions.values())) == 1:
            lines.append(f"{name}=={versions[PYTHONS[0]]}")
        else:
            lines += [f'{name}=={v} ; python_version == "{p}"' for p, v in versions.items() if v is not None]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="take the newest versions the ranges allow")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME", help="that package only")
    args = parser.parse_args()
    upgrade = ["--upgrade"] if args.upgrade else [f"--upgrade-package={name}" for name in args.upgrade_package]
    torch = base_image_torch()
    held = {"torch": torch}
    locked_torchvision = read_pins(LOCK).get("torchvision") if LOCK.is_file() else None
    if locked_torchvision and "torchvision" not in args.upgrade_package:
        held["torchvision"] = locked_torchvision
    with tempfile.TemporaryDirectory() as folder:
        by_python = {python: compile_for(python, held, Path(folder), upgrade) for python in PYTHONS}
    lines = merged(by_python)
    text = HEADER.format(pythons=" and ".join(PYTHONS)) + "\n".join(lines) + "\n"
    changed = not LOCK.is_file() or LOCK.read_text(encoding="utf-8") != text
    LOCK.write_text(text, encoding="utf-8")
    print(f"lock: {LOCK.name} {'written' if changed else 'unchanged'}: {len(lines)} pins, torch {torch}")


if __name__ == "__main__":
    main()
