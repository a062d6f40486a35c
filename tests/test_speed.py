"""The speed settings: JPEG draft mode keeps the model's answers, freed memory stays in the heap, the decoders run
at the lowest CPU priority, and torch's OpenMP threads spin less before they sleep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import harness.pipeline.headstart
import harness.pipeline.loader
from harness.config import Preprocess
from harness.pipeline.decode import decode
from harness.pipeline.decode_options import Decoding
from harness.pipeline.files import ImageFile, discover
from harness.pipeline.headstart import HeadStart
from harness.pipeline.host import keep_freed_memory, shorten_omp_spin
from harness.pipeline.loader import ImageDataset, make_loader
from harness.sources import build_config
from tests.helpers import REPO, SAMPLES


def big_framed_jpegs(folder: Path) -> Path:
    """Every sample photo as an ObjectNet-like JPEG: long side 1280 px, a 2 px red frame."""
    folder.mkdir()
    for path in sorted(SAMPLES.glob("*.*")):
        if path.suffix not in (".png", ".jpg"):
            continue
        image = Image.open(path).convert("RGB")
        scale = 1280 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        framed = Image.new("RGB", (image.width + 4, image.height + 4), (255, 0, 0))
        framed.paste(image, (2, 2))
        framed.save(folder / f"{path.stem}.jpg", quality=90)
    return folder


def test_draft_decodes_big_jpegs_smaller_but_never_below_the_resize(tmp_path: Path) -> None:
    folder = big_framed_jpegs(tmp_path / "big")
    for path in folder.iterdir():
        full = decode(str(path))
        drafted = decode(str(path), draft_to=256)
        assert min(drafted.size) >= 256
        assert drafted.width < full.width or min(full.size) < 512


def test_draft_strips_the_shrunken_frame(tmp_path: Path) -> None:
    folder = big_framed_jpegs(tmp_path / "big")
    path = str(folder / "astronaut.jpg")
    pre = Preprocess(jpeg_draft=True, input_size=256, resize_size=256)
    tensor = ImageDataset([ImageFile(path, "a")], Decoding(pre))[0][1]
    edge = tensor[:, 0, :].float().mean(1)  # top row, per channel: no red frame left
    assert edge[0] - edge[1:].mean() < 60


@pytest.mark.slow
def test_draft_keeps_top1_of_full_decoding_on_the_sample_photos(harness_run, tmp_path: Path) -> None:
    folder = big_framed_jpegs(tmp_path / "big")
    code_full, full = harness_run("--label-map", "none", "--topk", "1", images=folder, name="full.csv")
    code_draft, draft = harness_run("--label-map", "none", "--topk", "1", "--jpeg-draft", images=folder, name="d.csv")
    assert code_full == code_draft == 0 and len(full) == 19
    # Measured: 18 of 19 agree; grace_hopper flips between two near-tied classes (academic gown, mortarboard).
    agree = sum(d[:2] == f[:2] for d, f in zip(draft, full, strict=True))
    assert agree >= 18


def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory()


def _report_priority(*args: object) -> tuple[None, str, str]:
    """Stands in for decode_sample inside a decoder: the 'error' it returns names the process's scheduling policy."""
    return None, f"policy {os.sched_getscheduler(0)}", ""


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize(("priority", "policy"), [("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)])
def test_the_decoders_run_at_the_priority_asked_and_the_main_process_at_its_own(
    monkeypatch: pytest.MonkeyPatch, priority: str, policy: int
) -> None:
    """Both kinds of decoder: the DataLoader's workers and the head start's processes."""
    monkeypatch.setattr(harness.pipeline.loader, "decode_sample", _report_priority)
    monkeypatch.setattr(harness.pipeline.headstart, "decode_sample", _report_priority)
    config = build_config({"input_dir": str(SAMPLES), "batch_size": "4", "decoder_priority": priority}, {})
    files = discover(config.input_dir)
    dataset = ImageDataset(files, Decoding.of(config))
    loader = make_loader(dataset, 4, 2, 2, False, None, priority == "idle")
    seen = [error for batch in loader for error in batch.errors]
    head = HeadStart(config, files, Decoding.of(config), processes=1)
    try:
        for process in head._processes:  # to its limit: at least one chunk decoded
            process.join(timeout=60)
        head.stop(4)
        seen += [error for _, _, errors, _ in head.batches(timeout=30) for error in errors]
    finally:
        head.close()
    assert len(seen) > len(files) and set(seen) == {f"policy {policy}"}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


# Runs the harness in a fresh process and says what GOMP_SPINCOUNT held when torch was first imported (when libgomp
# reads it).
SPIN_AT_TORCH_IMPORT = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))
sys.meta_path.insert(0, Watch())
from harness.cli import main
code = main(sys.argv[1:])
print(f"exit {code}, GOMP_SPINCOUNT {seen[0]} as torch loaded")
"""


@pytest.mark.slow
def test_a_run_sets_the_omp_spin_before_torch_loads(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(SAMPLES.glob("*.png")), images)
    environ = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    command = [
        sys.executable,
        "-c",
        SPIN_AT_TORCH_IMPORT,
        str(images),
        str(tmp_path / "out.csv"),
        "--progress",
        "false",
    ]
    done = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert "exit 0, GOMP_SPINCOUNT 30000 as torch loaded" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("rounds", "environ", "expected"),
    [
        (30000, {}, "30000"),
        (500, {}, "500"),
        (None, {}, None),
        (30000, {"GOMP_SPINCOUNT": "7"}, None),
        (30000, {"OMP_WAIT_POLICY": "ACTIVE"}, None),
    ],
)
def test_the_omp_spin_is_set_unless_off_or_the_user_set_one(
    monkeypatch: pytest.MonkeyPatch, rounds: int | None, environ: dict[str, str], expected: str | None
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert shorten_omp_spin(rounds, environ) is (expected is not None)
    assert os.environ.get("GOMP_SPINCOUNT") == expected
