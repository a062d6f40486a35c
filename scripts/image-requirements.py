#!/usr/bin/env python3
"""What an image installs, as pip files, from pyproject.toml, the lock (constraints.txt) and model/requirements.txt.
Run by both Dockerfiles' source stage and by scripts/container-provision.sh (its wheelhouse); standard library only.

Writes into --out:
  harness.txt      the harness's dependencies and the extras named (--extra onnx: the CPU ONNX runtime)
  model.txt        model/requirements.txt as it is (empty when there is none)
  torch.txt        torch and torchvision at the lock's versions (Dockerfile.cpu installs them from PyTorch's index)
  constraints.txt  the lock, less what the model or the build chose itself: a package model/requirements.txt names
                   with a version (the model's own pin wins), one given --version NAME=VERSION (a build argument),
                   and with --base-torch the torch stack the base image already holds (torch, torchvision, triton,
                   nvidia-*, cuda-*), which the base image's tag pins
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
BASE_TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
CHECKOUT = Path(__file__).resolve().parents[1]  # the checkout this script is in (in an image's build: /src)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(line: str) -> tuple[str, bool] | None:
    """(normalized name, whether it gives a version) of a requirements line; None for comments, options, URLs."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-") or "://" in text or " @ " in text:
        return None
    match = NAME.match(text)
    if not match:
        return None
    rest = match.group(3).split(";", 1)[0].strip()
    return normalized(match.group(1)), bool(rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=CHECKOUT, help="the checkout (default: the one this script is in)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the four files")
    parser.add_argument("--extra", action="append", default=[], help="an extra of pyproject.toml to install too")
    parser.add_argument("--base-torch", action="store_true", help="the base image's torch stack stays unlocked")
    parser.add_argument("--version", action="append", default=[], metavar="NAME=VERSION", help="a build's own pin")
    args = parser.parse_args()

    if not all((args.root / name).is_file() for name in ("pyproject.toml", "constraints.txt")):
        sys.exit(f"image-requirements.py: error: {args.root} is not a checkout (pyproject.toml, constraints.txt)")
    project = tomllib.loads((args.root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    unknown = [name for name in args.extra if name not in extras]
    if unknown:
        sys.exit(f"build error: no extra {unknown} in pyproject.toml (it has {sorted(extras)})")
    harness = list(project["dependencies"]) + [line for name in args.extra for line in extras[name]]

    versions: dict[str, str] = {}
    for item in args.version:
        name, _, version = item.partition("=")
        if version.strip():  # an empty build argument means "the lock's"
            versions[normalized(name)] = version.strip()
    harness += [f"{name}=={version}" for name, version in versions.items()]
    chosen = set(versions)

    model_file = args.root / "model" / "requirements.txt"
    model = model_file.read_text(encoding="utf-8") if model_file.is_file() else ""
    chosen |= {name for name, versioned in filter(None, map(requirement, model.splitlines())) if versioned}

    lock = (args.root / "constraints.txt").read_text(encoding="utf-8").splitlines()
    kept: list[str] = []
    for line in lock:
        found = requirement(line)
        if found is None:
            continue
        name = found[0]
        if name in chosen or (args.base_torch and BASE_TORCH_STACK.match(name)):
            continue
        kept.append(line)
    torch = [
        f"{name}=={versions[name]}" if name in versions else line
        for line in lock
        if (found := requirement(line)) and (name := found[0]) in ("torch", "torchvision")
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harness.txt").write_text("\n".join(harness) + "\n", encoding="utf-8")
    (args.out / "model.txt").write_text(model, encoding="utf-8")
    (args.out / "torch.txt").write_text("\n".join(torch) + "\n", encoding="utf-8")
    (args.out / "constraints.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
