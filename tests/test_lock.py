"""The lock (constraints.txt) and the files each image installs from it (scripts/image-requirements.py): every
dependency pinned for both Pythons, inside pyproject.toml's ranges, torch the GPU base image's, and the model's and
the build's own pins taking precedence."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO

packaging = pytest.importorskip("packaging.requirements")
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
LOCK = REPO / "constraints.txt"
PYTHONS = ("3.11", "3.12")


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(python: str) -> dict[str, str]:
    """name -> version of the lock's lines that apply to `python`."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = packaging.Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"python_version": python}):
            assert requirement.name not in pins, f"{requirement.name} locked twice for Python {python}"
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name.lower()] = spec.version
    return pins


def _requirements() -> list[packaging.Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"]) + [
        line for extra in project["optional-dependencies"].values() for line in extra
    ]
    model = (REPO / "model" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    lines += [line for line in model if line.strip() and not line.startswith("#")]
    return [packaging.Requirement(line) for line in lines]


@pytest.mark.parametrize("python", PYTHONS)
def test_every_dependency_is_locked_inside_its_range(python: str) -> None:
    pins = _pins(python)
    for requirement in _requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement} is not in constraints.txt: run python3 scripts/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt has {name}=={pins[name]}, outside pyproject's {requirement}: run python3 scripts/lock.py"
        )


def test_the_locked_torch_is_the_gpu_base_images_and_the_header_says_how_to_refresh() -> None:
    lock = _script("lock")
    for python in PYTHONS:
        assert _pins(python)["torch"] == lock.base_image_torch()
    text = LOCK.read_text(encoding="utf-8")
    assert text.startswith(lock.HEADER.format(pythons=" and ".join(PYTHONS)))
    names = [line.split("==")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert names == sorted(names), "scripts/lock.py writes the names sorted"


def test_a_version_that_differs_between_the_pythons_gets_a_marked_line_each() -> None:
    merged = _script("lock").merged({"3.11": {"a": "1", "numpy": "2.4"}, "3.12": {"a": "1", "numpy": "2.5"}})
    assert merged == ["a==1", 'numpy==2.4 ; python_version == "3.11"', 'numpy==2.5 ; python_version == "3.12"']


def _image_files(tmp_path: Path, model: str, *options: str) -> dict[str, list[str]]:
    """scripts/image-requirements.py on a copy of the checkout whose model/requirements.txt is `model`."""
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copy(LOCK, root)
    (root / "model" / "requirements.txt").write_text(model, encoding="utf-8")
    out = tmp_path / "out"
    script = str(REPO / "scripts" / "image-requirements.py")
    subprocess.run([sys.executable, script, "--root", str(root), "--out", str(out), *options], check=True)
    return {p.stem: p.read_text(encoding="utf-8").splitlines() for p in out.iterdir()}


def _names(lines: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower() for line in lines if line}


def test_the_cpu_images_files_lock_everything_but_what_the_model_pins(tmp_path: Path) -> None:
    files = _image_files(tmp_path, "timm==0.9.16  # the model's own\nnumpy\n", "--extra", "onnx")
    assert "onnxruntime>=1.17" in files["harness"] and "onnxruntime-gpu" not in _names(files["harness"])
    assert files["model"] == ["timm==0.9.16  # the model's own", "numpy"]
    assert files["torch"] == [f"torch=={_pins('3.11')['torch']}", f"torchvision=={_pins('3.11')['torchvision']}"]
    locked = _names(files["constraints"])
    assert "timm" not in locked, "a model's pinned version wins over the lock"
    assert {"numpy", "torch", "onnxruntime", "pillow"} <= locked, "one named without a version stays locked"


def test_the_gpu_images_files_leave_the_base_images_torch_stack_and_take_a_build_arguments_version(
    tmp_path: Path,
) -> None:
    options = ["--extra", "onnx-gpu", "--base-torch", "--version", "onnxruntime-gpu=1.20.1", "--version", "timm="]
    files = _image_files(tmp_path, "", *options)
    locked = _names(files["constraints"])
    assert not {name for name in locked if re.match(r"(torch|torchvision|triton|nvidia-.*|cuda-.*)$", name)}
    assert {"numpy", "pillow", "timm"} <= locked, "an empty build argument keeps the lock's version"
    assert "onnxruntime-gpu" not in locked and "onnxruntime-gpu==1.20.1" in files["harness"]


def test_an_unknown_extra_stops_the_build(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        _image_files(tmp_path, "", "--extra", "onnx-gpus")
