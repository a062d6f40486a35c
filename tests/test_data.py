"""What harness/data ships: the photos `harness check` runs by default (the shared originals, their licences and
classes), ImageNet's and ObjectNet's class names (the official files), and pyproject's package data taking them all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from harness.results.labels import imagenet_names, objectnet_names
from tests.helpers import REPO, shared_file

DATA = REPO / "harness" / "data"
PHOTOS = DATA / "photos"


def test_the_shipped_photos_are_the_shared_ones_with_their_licences_and_classes() -> None:
    shared = shared_file("sample-photos")
    labels = json.loads((PHOTOS / "labels.json").read_text())
    assert sorted(labels) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    for name in labels:
        assert name in (PHOTOS / "SOURCES.md").read_text()
        original = shared / name
        if original.exists():  # copied byte for byte
            assert (PHOTOS / name).read_bytes() == original.read_bytes()
        else:  # a PNG re-encoded as JPEG
            png = np.asarray(Image.open(original.with_suffix(".png")).convert("RGB"), dtype=float)
            jpeg = np.asarray(Image.open(PHOTOS / name).convert("RGB"), dtype=float)
            assert np.abs(png - jpeg).mean() < 3
    assert sum(p.stat().st_size for p in PHOTOS.iterdir()) < 400_000
    names = imagenet_names()
    assert [names[i] for i in labels["chelsea.jpg"]] == ["tabby", "tiger cat", "Egyptian cat"]


def test_the_shipped_class_names_are_the_official_files() -> None:
    folder = shared_file("objectnet-mappings")
    assert (DATA / "imagenet_classes.txt").read_bytes() == (folder / "imagenet_classes.txt").read_bytes()
    assert len(imagenet_names()) == 1000 and imagenet_names()[967] == "espresso"
    labels = sorted(json.loads((folder / "folder_to_objectnet_label.json").read_text()).values())
    assert objectnet_names() == labels
    assert {label: index for index, label in enumerate(objectnet_names())} == json.loads(
        (folder / "objectnet_id.json").read_text()
    )


def test_package_data_takes_every_shipped_file() -> None:
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missed = [p for p in shipped if p.suffix != ".py" and not any(p.match(g) for g in patterns["harness.data"])]
    assert not missed
