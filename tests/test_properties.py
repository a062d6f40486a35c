"""Property and fuzz tests: any file name survives the CSV and `harness validate`; any bytes under an image name
cost one row."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.config import Preprocess
from harness.pipeline.decode_options import DecodeLimits, Decoding
from harness.pipeline.files import ImageFile, discover
from harness.pipeline.loader import ImageDataset
from harness.results.writer import AtomicCsvWriter
from harness.tools.validate import validate_predictions
from tests.helpers import SAMPLES, read_rows

# A Linux file name: any bytes but '/' and NUL, as the harness sees it after os.fsdecode (surrogateescape).
names = st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@given(st.lists(names, min_size=1, max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_file_name_round_trips_through_the_csv(raw_names: list[bytes]) -> None:
    keys = [os.fsdecode(name) for name in raw_names]
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "p.csv"
        with AtomicCsvWriter(output) as writer:
            for key in keys:
                writer.write([key, "1", "0.5", "-1", "0"])
            writer.commit()
        rows = read_rows(output)
    assert [row[0] for row in rows] == keys
    assert all(row[1:] == ["1", "0.5", "-1", "0"] for row in rows)


@given(st.sets(names.filter(lambda b: not b.startswith(b".")), min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_any_file_name_passes_harness_validate_against_its_folder(raw_names: set[bytes]) -> None:
    """Real files with those names, rows written as a run writes them: the scorer's checks find nothing wrong."""
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        for name in raw_names:
            with open(os.path.join(os.fsencode(images), name + b".png"), "wb") as f:
                f.write(b"")
        output = Path(folder) / "p.csv"
        with AtomicCsvWriter(output) as writer:
            for image in discover(images):
                writer.write([image.key, *["-1", "0"] * 5])
            writer.commit()
        rows, rejected, coverage = validate_predictions(output, images)
    assert (rows, rejected, coverage) == (len(raw_names), [], [])


SEEDS = [(SAMPLES / name).read_bytes() for name in ("coffee.png", "grace_hopper.jpg")]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real PNG/JPEG with bytes overwritten, cut or spliced: the decoder's hard cases."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, min(len(data) - 1, 2048)))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@given(damaged_images(), st.sampled_from([".png", ".jpg", ".tif", ".webp", ".bmp"]))
@settings(max_examples=200, deadline=None)
def test_random_bytes_never_crash_or_hang_the_decoder(data: bytes, extension: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{extension}"
        path.write_bytes(data)
        dataset = ImageDataset([ImageFile(str(path), path.name)], Decoding(Preprocess(), DecodeLimits(10_000_000, 5.0)))
        started = time.monotonic()
        index, tensor, error, _ = dataset[0]
        assert time.monotonic() - started < 6
    assert index == 0 and tensor.shape == (3, 224, 224)
    assert error == "" or ":" in error or error.isidentifier()  # decoded, or a one-line reason


# ---- --resume: the same CSV as one uninterrupted run, or refused; never a mix ----

RESUMABLE = """import os
import torch


class Stoppable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(int(os.environ.get("STOPPABLE_SEED", "0")))
        self.fc = torch.nn.Linear(3, 1000)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("STOPPABLE_AT") and self.calls > int(os.environ["STOPPABLE_AT"]):
            raise ValueError("stopped on purpose")
        return self.fc(x.float().mean((2, 3)))
"""
CHANGES = ("nothing", "a setting", "an image finished", "an image to come", "the model's code")


@given(
    batch=st.integers(1, 4),
    topk=st.integers(1, 5),
    softmax=st.booleans(),
    label_map=st.sampled_from(["none", "objectnet-legacy"]),
    stop_after=st.integers(1, 5),
    change=st.sampled_from(CHANGES),
)
@settings(max_examples=25, deadline=None)
@pytest.mark.slow
def test_a_resumed_run_is_the_uninterrupted_one_or_refused(
    batch: int, topk: int, softmax: bool, label_map: str, stop_after: int, change: str
) -> None:
    """Drawn settings, a drawn interruption point and a drawn change between the two runs: the resumed CSV is
    byte for byte what one uninterrupted run over the inputs as they are now writes, or the resume is refused
    (exit 2); a changed input is never mixed into finished rows."""
    topk = 5 if label_map == "objectnet-legacy" else topk
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = root / "model"
        model.mkdir()
        (model / "model.py").write_text(RESUMABLE)
        (model / "config.yaml").write_text("class_name: Stoppable\n")
        images = root / "in"
        images.mkdir()
        photos = [p for p in sorted(SAMPLES.iterdir()) if p.suffix in (".png", ".jpg")][:9]
        for index, photo in enumerate(photos):
            (images / f"{index}{photo.suffix}").write_bytes(photo.read_bytes())
        options = ["--batch-size", str(batch), "--topk", str(topk), "--softmax", str(softmax).lower()]
        options += ["--label-map", label_map, "--workers", "0", "--progress", "false", "--model-dir", str(model)]
        output = root / "out" / "p.csv"
        os.environ["STOPPABLE_AT"] = str(stop_after)
        try:
            stopped = main([str(images), str(output), *options])
        finally:
            del os.environ["STOPPABLE_AT"]
        assert stopped in (0, 4)
        if change == "a setting":
            options[options.index("--softmax") + 1] = str(not softmax).lower()
        elif change == "an image finished":
            (images / "0.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
        elif change == "an image to come":
            (images / "8.jpg").write_bytes((SAMPLES / "flower.jpg").read_bytes() + b"\0")
        elif change == "the model's code":
            (model / "model.py").write_text(RESUMABLE.replace('"0"', '"1"'))
        resumed = main([str(images), str(output), *options, "--resume"])
        if resumed == 2:  # refused: nothing was overwritten, and a fresh run is the way on
            assert change in ("a setting", "the model's code") and stopped == 4
            return
        reference = root / "ref" / "p.csv"
        assert resumed == 0 and main([str(images), str(reference), *options]) == 0
        assert output.read_bytes() == reference.read_bytes()
